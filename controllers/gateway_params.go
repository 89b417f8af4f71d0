package controllers

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"sort"
	"strings"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	"sigs.k8s.io/yaml"
)

// GatewayParameters are the deployment settings of an ingress gateway
// taken from ConfigMaps in Istio's gateway customization format: the
// GatewayClass's parametersRef (defaults for its Gateways) and the
// Gateway's spec.infrastructure.parametersRef (its own, winning field by
// field). Istio applies each key as an overlay on the object it generates;
// we honour a validated subset — replicas, the proxy container's
// resources, the Service's type, externalTrafficPolicy and annotations —
// and refuse anything else with a message, because an arbitrary overlay
// would let whoever writes the ConfigMap change the pod's service account,
// privileges or volumes, which Gateway authors are not otherwise allowed.
type GatewayParameters struct {
	Replicas              *int32
	Resources             *corev1.ResourceRequirements
	ServiceType           corev1.ServiceType
	ExternalTrafficPolicy corev1.ServiceExternalTrafficPolicy
	ServiceAnnotations    map[string]string
}

// The ConfigMap keys we read (Istio's names); its other keys
// (horizontalPodAutoscaler, podDisruptionBudget, serviceAccount) are
// refused.
const (
	paramsDeploymentKey = "deployment"
	paramsServiceKey    = "service"
)

// proxyContainerNames: Istio's container name, which users' ConfigMaps
// use, and ours.
var proxyContainerNames = []string{"istio-proxy", "gateway"}

type deploymentOverlay struct {
	Spec struct {
		Replicas *int32 `json:"replicas,omitempty"`
		Template struct {
			Spec struct {
				Containers []struct {
					Name      string                       `json:"name"`
					Resources *corev1.ResourceRequirements `json:"resources,omitempty"`
				} `json:"containers,omitempty"`
			} `json:"spec"`
		} `json:"template"`
	} `json:"spec"`
}

type serviceOverlay struct {
	Metadata struct {
		Annotations map[string]string `json:"annotations,omitempty"`
	} `json:"metadata"`
	Spec struct {
		Type                  corev1.ServiceType                  `json:"type,omitempty"`
		ExternalTrafficPolicy corev1.ServiceExternalTrafficPolicy `json:"externalTrafficPolicy,omitempty"`
	} `json:"spec"`
}

// ParseGatewayParameters reads a parameters ConfigMap; any field we do not
// honour is an error naming it (strict decoding), never silently ignored.
func ParseGatewayParameters(cm *corev1.ConfigMap) (GatewayParameters, error) {
	var p GatewayParameters
	var unknown []string
	for k := range cm.Data {
		if k != paramsDeploymentKey && k != paramsServiceKey {
			unknown = append(unknown, k)
		}
	}
	if len(unknown) > 0 || len(cm.BinaryData) > 0 {
		sort.Strings(unknown)
		return p, fmt.Errorf("keys %v are not supported (only %q and %q)", append(unknown, slices.Sorted(maps.Keys(cm.BinaryData))...), paramsDeploymentKey, paramsServiceKey)
	}
	if y, ok := cm.Data[paramsDeploymentKey]; ok {
		var d deploymentOverlay
		if err := yaml.UnmarshalStrict([]byte(y), &d); err != nil {
			return p, fmt.Errorf("%s: %w (supported: spec.replicas, spec.template.spec.containers[name=istio-proxy].resources)", paramsDeploymentKey, err)
		}
		if r := d.Spec.Replicas; r != nil && *r < 0 {
			return p, fmt.Errorf("%s: spec.replicas %d is negative", paramsDeploymentKey, *r)
		}
		p.Replicas = d.Spec.Replicas
		for _, c := range d.Spec.Template.Spec.Containers {
			if !slices.Contains(proxyContainerNames, c.Name) {
				return p, fmt.Errorf("%s: container %q: only the proxy container (%s) can be configured", paramsDeploymentKey, c.Name, strings.Join(proxyContainerNames, " or "))
			}
			if err := checkResources(c.Resources); err != nil {
				return p, fmt.Errorf("%s: container %s: %w", paramsDeploymentKey, c.Name, err)
			}
			p.Resources = c.Resources
		}
	}
	if y, ok := cm.Data[paramsServiceKey]; ok {
		var s serviceOverlay
		if err := yaml.UnmarshalStrict([]byte(y), &s); err != nil {
			return p, fmt.Errorf("%s: %w (supported: metadata.annotations, spec.type, spec.externalTrafficPolicy)", paramsServiceKey, err)
		}
		switch s.Spec.Type {
		case "", corev1.ServiceTypeLoadBalancer, corev1.ServiceTypeNodePort, corev1.ServiceTypeClusterIP:
		default:
			return p, fmt.Errorf("%s: spec.type %q must be LoadBalancer, NodePort or ClusterIP", paramsServiceKey, s.Spec.Type)
		}
		switch s.Spec.ExternalTrafficPolicy {
		case "", corev1.ServiceExternalTrafficPolicyCluster, corev1.ServiceExternalTrafficPolicyLocal:
		default:
			return p, fmt.Errorf("%s: spec.externalTrafficPolicy %q must be Cluster or Local", paramsServiceKey, s.Spec.ExternalTrafficPolicy)
		}
		p.ServiceType, p.ExternalTrafficPolicy, p.ServiceAnnotations = s.Spec.Type, s.Spec.ExternalTrafficPolicy, s.Metadata.Annotations
	}
	return p, nil
}

// checkResources refuses requests above limits (the Deployment would be
// refused by the API server, with the error only in our logs).
func checkResources(r *corev1.ResourceRequirements) error {
	if r == nil {
		return nil
	}
	for name, req := range r.Requests {
		if lim, ok := r.Limits[name]; ok && req.Cmp(lim) > 0 {
			return fmt.Errorf("resources: %s request %s is above its limit %s", name, req.String(), lim.String())
		}
	}
	return nil
}

// over returns p with every field o sets replacing p's.
func (p GatewayParameters) over(o GatewayParameters) GatewayParameters {
	if o.Replicas != nil {
		p.Replicas = o.Replicas
	}
	if o.Resources != nil {
		p.Resources = o.Resources
	}
	if o.ServiceType != "" {
		p.ServiceType = o.ServiceType
	}
	if o.ExternalTrafficPolicy != "" {
		p.ExternalTrafficPolicy = o.ExternalTrafficPolicy
	}
	if len(o.ServiceAnnotations) > 0 {
		p.ServiceAnnotations = mergeLabels(p.ServiceAnnotations, o.ServiceAnnotations)
	}
	return p
}

// readParameters reads and parses ConfigMap ns/name; a missing ConfigMap
// is an invalid reference.
func readParameters(ctx context.Context, r client.Reader, ns, name string) (GatewayParameters, bool, error) {
	cm := &corev1.ConfigMap{}
	if err := r.Get(ctx, client.ObjectKey{Namespace: ns, Name: name}, cm); apierrors.IsNotFound(err) {
		return GatewayParameters{}, false, fmt.Errorf("parameters ConfigMap %s/%s not found", ns, name)
	} else if err != nil {
		return GatewayParameters{}, true, err // transient: retried
	}
	p, err := ParseGatewayParameters(cm)
	if err != nil {
		return p, false, fmt.Errorf("parameters ConfigMap %s/%s: %w", ns, name, err)
	}
	return p, false, nil
}

// ClassParameters reads a GatewayClass's parameters (zero without a
// parametersRef). transient is true for an API error to retry, false for
// a reference that is invalid until someone changes it.
func ClassParameters(ctx context.Context, r client.Reader, gc *gwv1.GatewayClass) (p GatewayParameters, transient bool, err error) {
	if gc == nil || gc.Spec.ParametersRef == nil {
		return GatewayParameters{}, false, nil
	}
	ref := gc.Spec.ParametersRef
	if ref.Group != "" || ref.Kind != "ConfigMap" || ref.Namespace == nil || *ref.Namespace == "" {
		return GatewayParameters{}, false, fmt.Errorf("GatewayClass %s: parametersRef must name a ConfigMap (group \"\") and its namespace", gc.Name)
	}
	return readParameters(ctx, r, string(*ref.Namespace), ref.Name)
}

// ingressParameters are the class's parameters overlaid with the
// Gateway's own (spec.infrastructure.parametersRef: a ConfigMap of the
// Gateway's namespace).
func ingressParameters(ctx context.Context, r client.Reader, gw *gwv1.Gateway) (GatewayParameters, bool, error) {
	gc := &gwv1.GatewayClass{}
	if err := r.Get(ctx, client.ObjectKey{Name: string(gw.Spec.GatewayClassName)}, gc); apierrors.IsNotFound(err) {
		gc = nil
	} else if err != nil {
		return GatewayParameters{}, true, err
	}
	p, transient, err := ClassParameters(ctx, r, gc)
	if err != nil {
		return p, transient, fmt.Errorf("class %s: %w", gw.Spec.GatewayClassName, err)
	}
	inf := gw.Spec.Infrastructure
	if inf == nil || inf.ParametersRef == nil {
		return p, false, nil
	}
	ref := inf.ParametersRef
	if ref.Group != "" || ref.Kind != "ConfigMap" {
		return p, false, fmt.Errorf("spec.infrastructure.parametersRef to %s.%s %s is not supported: use a ConfigMap (group \"\") in the Gateway's namespace", ref.Kind, ref.Group, ref.Name)
	}
	own, transient, err := readParameters(ctx, r, gw.Namespace, ref.Name)
	if err != nil {
		return p, transient, err
	}
	return p.over(own), false, nil
}

// uses reports whether the parameters come from any ConfigMap (their
// edits are picked up by a periodic re-read: the operator caches only its
// own ConfigMaps).
func usesParameters(gw *gwv1.Gateway, gc *gwv1.GatewayClass) bool {
	return gw.Spec.Infrastructure != nil && gw.Spec.Infrastructure.ParametersRef != nil || gc != nil && gc.Spec.ParametersRef != nil
}

// apply sets the parameters on the gateway's proxy.
func (p GatewayParameters) apply(w *Waypoint) {
	if p.Replicas != nil {
		w.Replicas = *p.Replicas
	}
	if p.Resources != nil {
		w.Resources = *p.Resources
	}
	if w.Ingress == nil {
		return
	}
	// The Gateway's own service-type annotation wins over parameters.
	if p.ServiceType != "" && w.Ingress.Gateway.Annotations[AnnotationServiceType] == "" {
		w.Ingress.ServiceType = p.ServiceType
	}
	w.Ingress.ExternalTrafficPolicy = p.ExternalTrafficPolicy
	w.Ingress.ServiceAnnotations = p.ServiceAnnotations
}

package controllers

import (
	"fmt"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
	"github.com/ambientmesh/ambient/controllers/proxyauth"
	"github.com/ambientmesh/ambient/controllers/waypointbind"
)

// Labels and annotations of waypoints, as Istio spells them so tools
// (istioctl, kiali, the discovery controller) recognise them.
const (
	LabelGatewayManaged      = proxyauth.WaypointDeploymentLabel
	GatewayManagedValue      = proxyauth.WaypointDeploymentValue
	LabelIstioGatewayName    = "istio.io/gateway-name"
	LabelGatewayName         = waypointbind.GatewayNameLabel
	LabelGatewayClassName    = "gateway.networking.k8s.io/gateway-class-name"
	LabelWaypointFor         = waypointbind.WaypointForLabel
	LabelWaypointName        = waypointbind.WaypointNameLabel
	LabelDataplaneMode       = "istio.io/dataplane-mode"
	AnnotationForServiceAcct = waypointbind.ForServiceAccountAnnotation
	WaypointGatewayClass     = waypointbind.GatewayClass
)

// Waypoint is what a waypoint is, whoever declared it: a WaypointPolicy or
// a Gateway API Gateway of class istio-waypoint. DesiredWaypoint turns it
// into the same objects either way.
type Waypoint struct {
	Name, Namespace string
	// ForServiceAccount is set for a service-account waypoint.
	ForServiceAccount string
	TrafficType       meshv1.TrafficType
	Replicas          int32
	Image             string
	Resources         corev1.ResourceRequirements
	Transport         meshv1.HBONETransport
	LogLevel          meshv1.LogLevel
	// Owner is the declaring object; its deletion removes the waypoint.
	Owner metav1.OwnerReference
	// Ingress is set for an ingress gateway (a Gateway of class istio): the
	// same L7 proxy, serving the Gateway's listeners (ingress_gateway.go).
	Ingress *Ingress
}

// WaypointFromPolicy fills mesh-wide defaults into a WaypointPolicy.
func WaypointFromPolicy(wp *meshv1.WaypointPolicy, mesh *meshv1.AmbientMesh, d Defaults) Waypoint {
	w := Waypoint{
		Name: wp.Name, Namespace: wp.Namespace,
		TrafficType: wp.Spec.TrafficType,
		Replicas:    ptr.Deref(wp.Spec.Replicas, 1),
		Owner:       *metav1.NewControllerRef(wp, meshv1.GroupVersion.WithKind("WaypointPolicy")),
	}
	if wp.Spec.Scope == meshv1.ScopeServiceAccount {
		w.ForServiceAccount = wp.Spec.ServiceAccount
	}
	w.applyMeshDefaults(mesh, d)
	if wp.Spec.Resources != nil {
		w.Resources = *wp.Spec.Resources
	}
	if wp.Spec.Transport != "" {
		w.Transport = wp.Spec.Transport
	}
	return w
}

// WaypointFromGateway reads an Istio-style waypoint Gateway:
// gatewayClassName istio-waypoint, label istio.io/waypoint-for (default
// service, as Istio) and annotation istio.io/for-service-account.
func WaypointFromGateway(gw *gwv1.Gateway, mesh *meshv1.AmbientMesh, d Defaults) (Waypoint, error) {
	if gw.Spec.GatewayClassName != WaypointGatewayClass {
		return Waypoint{}, fmt.Errorf("gateway %s/%s has class %q, not %q", gw.Namespace, gw.Name, gw.Spec.GatewayClassName, WaypointGatewayClass)
	}
	traffic := meshv1.TrafficType(gw.Labels[LabelWaypointFor])
	switch traffic {
	case "":
		traffic = meshv1.TrafficService
	case meshv1.TrafficService, meshv1.TrafficWorkload, meshv1.TrafficAll, meshv1.TrafficNone:
	default:
		return Waypoint{}, fmt.Errorf("gateway %s/%s: label %s=%q must be service, workload, all or none", gw.Namespace, gw.Name, LabelWaypointFor, traffic)
	}
	w := Waypoint{
		Name: gw.Name, Namespace: gw.Namespace, TrafficType: traffic, Replicas: 1,
		ForServiceAccount: gw.Annotations[AnnotationForServiceAcct],
		Owner:             *metav1.NewControllerRef(gw, gwv1.SchemeGroupVersion.WithKind("Gateway")),
	}
	w.applyMeshDefaults(mesh, d)
	return w, nil
}

func (w *Waypoint) applyMeshDefaults(mesh *meshv1.AmbientMesh, d Defaults) {
	w.Image = mesh.Spec.Waypoint.Image
	if w.Image == "" {
		w.Image = d.WaypointImage
	}
	w.Resources = resourcesOr(mesh.Spec.Waypoint.Resources, waypointResources)
	w.Transport = mesh.Spec.Ztunnel.Transport
	w.LogLevel = mesh.Spec.Ztunnel.LogLevel
}

func (w *Waypoint) labels() map[string]string {
	if w.Ingress != nil {
		return w.Ingress.labels(w.Name)
	}
	l := map[string]string{
		LabelManagedBy:        ManagedByValue,
		LabelPartOf:           "ambient",
		LabelComponent:        "waypoint",
		LabelGatewayManaged:   GatewayManagedValue,
		LabelIstioGatewayName: w.Name,
		LabelGatewayName:      w.Name,
		LabelGatewayClassName: WaypointGatewayClass,
		LabelWaypointName:     w.Name,
		LabelWaypointFor:      string(w.TrafficType),
	}
	return l
}

// ObjectName names the proxy's ServiceAccount, Deployment and Service:
// the waypoint's own name, or for an ingress gateway <gateway>-istio as
// Istio names them (the seeds read Service httpbin-gateway-istio).
func (w *Waypoint) ObjectName() string {
	if w.Ingress != nil {
		return proxyauth.IngressObjectName(w.Name)
	}
	return w.Name
}

func (w *Waypoint) meta() metav1.ObjectMeta {
	m := metav1.ObjectMeta{
		Name: w.ObjectName(), Namespace: w.Namespace, Labels: w.labels(),
		OwnerReferences: []metav1.OwnerReference{w.Owner},
	}
	if w.ForServiceAccount != "" {
		m.Annotations = map[string]string{AnnotationForServiceAcct: w.ForServiceAccount}
	}
	if w.Ingress != nil {
		_, m.Annotations = w.Ingress.infrastructure()
	}
	return m
}

// DesiredWaypoint returns the waypoint's ServiceAccount, Deployment and
// Service (HBONE on 15008), all named after the waypoint.
func DesiredWaypoint(w Waypoint, mesh *meshv1.AmbientMesh) (*corev1.ServiceAccount, *appsv1.Deployment, *corev1.Service) {
	sa := &corev1.ServiceAccount{ObjectMeta: w.meta(), AutomountServiceAccountToken: ptr.To(false)}
	return sa, w.deployment(mesh), w.service()
}

func (w *Waypoint) deployment(mesh *meshv1.AmbientMesh) *appsv1.Deployment {
	dep := w.waypointDeployment(mesh)
	if w.Ingress != nil {
		w.Ingress.adapt(&dep.Spec.Template.Spec)
	}
	return dep
}

func (w *Waypoint) waypointDeployment(mesh *meshv1.AmbientMesh) *appsv1.Deployment {
	vols, mounts := proxyVolumes()
	env := append(proxyEnv(mesh, w.Transport, w.LogLevel),
		corev1.EnvVar{Name: "WAYPOINT_NAME", Value: w.Name},
		fieldEnv("SERVICE_ACCOUNT", "spec.serviceAccountName"),
		// The control plane's root namespace (the mesh namespace): its
		// policies are mesh-wide for the waypoint exactly as for ztunnel.
		corev1.EnvVar{Name: "ROOT_NAMESPACE", Value: meshRootNamespace(mesh)},
		corev1.EnvVar{Name: "CLUSTER_DOMAIN", Value: clusterDomain(mesh)},
	)
	ports := []corev1.ContainerPort{
		{Name: "hbone", ContainerPort: hbonePort, Protocol: corev1.ProtocolTCP},
		{Name: "http-metrics", ContainerPort: proxyMetricsPort, Protocol: corev1.ProtocolTCP},
		{Name: "status-port", ContainerPort: proxyReadinessPort, Protocol: corev1.ProtocolTCP},
	}
	if w.Transport == meshv1.TransportHTTP3 {
		ports = append(ports, corev1.ContainerPort{Name: "hbone-quic", ContainerPort: hbonePort, Protocol: corev1.ProtocolUDP})
	}
	podLabels := mergeLabels(w.labels(), map[string]string{LabelDataplaneMode: "none"})
	selector := w.selector()
	return &appsv1.Deployment{
		ObjectMeta: w.meta(),
		Spec: appsv1.DeploymentSpec{
			Replicas: ptr.To(w.Replicas),
			Selector: selector,
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: podLabels, Annotations: mergeLabels(w.podAnnotations(), map[string]string{meshRedirectionLabel: "disabled"})},
				Spec: corev1.PodSpec{
					ServiceAccountName:            w.ObjectName(),
					AutomountServiceAccountToken:  ptr.To(false),
					TerminationGracePeriodSeconds: ptr.To[int64](30),
					// Admitted where the namespace enforces the restricted
					// Pod Security profile (checked in envtest).
					SecurityContext:           restrictedPodSecurity(),
					TopologySpreadConstraints: spreadConstraints(selector),
					Volumes:                   vols,
					Containers: []corev1.Container{{
						Name: "waypoint", Image: w.Image, ImagePullPolicy: corev1.PullIfNotPresent,
						Env: env, Ports: ports, Resources: w.Resources, VolumeMounts: mounts,
						ReadinessProbe: &corev1.Probe{
							ProbeHandler:  corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/healthz/ready", Port: intstr.FromInt32(proxyReadinessPort)}},
							PeriodSeconds: 5, FailureThreshold: 3,
						},
						SecurityContext: &corev1.SecurityContext{
							AllowPrivilegeEscalation: ptr.To(false),
							ReadOnlyRootFilesystem:   ptr.To(true),
							RunAsNonRoot:             ptr.To(true),
							RunAsUser:                ptr.To[int64](1337),
							RunAsGroup:               ptr.To[int64](1337),
							Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
						},
					}},
				},
			},
		},
	}
}

// selector selects the proxy's pods: its Deployment's, its disruption
// budget's and (as a string) its scale subresource's.
func (w *Waypoint) selector() *metav1.LabelSelector {
	return &metav1.LabelSelector{MatchLabels: map[string]string{LabelGatewayName: w.Name}}
}

// DisruptionBudget is the waypoint's PodDisruptionBudget, wanted only
// while it runs more than one replica: with one, any budget either blocks
// every node drain or allows the outage anyway.
func (w *Waypoint) DisruptionBudget() (pdb *policyv1.PodDisruptionBudget, wanted bool) {
	return disruptionBudget(w.meta(), w.selector()), w.Replicas > 1
}

// podAnnotations: an ingress gateway's pods carry its Gateway's
// infrastructure annotations too.
func (w *Waypoint) podAnnotations() map[string]string {
	if w.Ingress == nil {
		return nil
	}
	_, a := w.Ingress.infrastructure()
	return a
}

func (w *Waypoint) service() *corev1.Service {
	if w.Ingress != nil {
		return w.Ingress.service(w.meta(), w.Name)
	}
	ports := []corev1.ServicePort{
		{Name: "mesh", Port: hbonePort, TargetPort: intstr.FromInt32(hbonePort), Protocol: corev1.ProtocolTCP, AppProtocol: ptr.To("all")},
		{Name: "status-port", Port: proxyReadinessPort, TargetPort: intstr.FromInt32(proxyReadinessPort), Protocol: corev1.ProtocolTCP},
	}
	if w.Transport == meshv1.TransportHTTP3 {
		ports = append(ports, corev1.ServicePort{Name: "mesh-quic", Port: hbonePort, TargetPort: intstr.FromInt32(hbonePort), Protocol: corev1.ProtocolUDP})
	}
	return &corev1.Service{
		ObjectMeta: w.meta(),
		Spec: corev1.ServiceSpec{
			Type:     corev1.ServiceTypeClusterIP,
			Selector: map[string]string{LabelGatewayName: w.Name},
			Ports:    ports,
		},
	}
}

// meshRootNamespace is Istio's root namespace of the mesh: the mesh
// namespace, as the control plane treats it (controllers/discovery).
func meshRootNamespace(mesh *meshv1.AmbientMesh) string { return mesh.Spec.Namespace }

// clusterDomain is the cluster's DNS domain (AmbientMesh spec, defaulted by
// the API server).
func clusterDomain(mesh *meshv1.AmbientMesh) string {
	if mesh.Spec.ClusterDomain == "" {
		return "cluster.local"
	}
	return mesh.Spec.ClusterDomain
}

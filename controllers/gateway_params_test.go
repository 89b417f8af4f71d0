package controllers

import (
	"context"
	"fmt"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
)

// Istio's gateway customization format: what we honour, and what we
// refuse with a message naming the field.
func TestParseGatewayParameters(t *testing.T) {
	for _, c := range []struct {
		name string
		data map[string]string
		want string // error substring; "" for valid
		chk  func(GatewayParameters) bool
	}{
		{"replicas and resources", map[string]string{"deployment": `
spec:
  replicas: 3
  template:
    spec:
      containers:
      - name: istio-proxy
        resources: {requests: {cpu: 100m, memory: 64Mi}, limits: {memory: 128Mi}}
`}, "", func(p GatewayParameters) bool {
			return *p.Replicas == 3 && p.Resources.Requests.Cpu().String() == "100m" && p.Resources.Limits.Memory().String() == "128Mi"
		}},
		{"service", map[string]string{"service": `
metadata: {annotations: {metallb.universe.tf/address-pool: edge}}
spec: {type: NodePort, externalTrafficPolicy: Local}
`}, "", func(p GatewayParameters) bool {
			return p.ServiceType == corev1.ServiceTypeNodePort && p.ExternalTrafficPolicy == corev1.ServiceExternalTrafficPolicyLocal &&
				p.ServiceAnnotations["metallb.universe.tf/address-pool"] == "edge"
		}},
		{"empty", nil, "", func(p GatewayParameters) bool { return p.Replicas == nil && p.Resources == nil && p.ServiceType == "" }},
		{"unsupported key", map[string]string{"horizontalPodAutoscaler": "spec: {minReplicas: 2}"}, "horizontalPodAutoscaler", nil},
		{"pod field", map[string]string{"deployment": "spec: {template: {spec: {serviceAccountName: admin}}}"}, "serviceAccountName", nil},
		{"container field", map[string]string{"deployment": "spec: {template: {spec: {containers: [{name: istio-proxy, securityContext: {privileged: true}}]}}}"}, "securityContext", nil},
		{"other container", map[string]string{"deployment": "spec: {template: {spec: {containers: [{name: sidecar}]}}}"}, `container "sidecar"`, nil},
		{"negative replicas", map[string]string{"deployment": "spec: {replicas: -1}"}, "negative", nil},
		{"bad quantity", map[string]string{"deployment": "spec: {template: {spec: {containers: [{name: istio-proxy, resources: {requests: {cpu: lots}}}]}}}"}, "deployment", nil},
		{"request above limit", map[string]string{"deployment": "spec: {template: {spec: {containers: [{name: istio-proxy, resources: {requests: {cpu: 2}, limits: {cpu: 1}}}]}}}"}, "above its limit", nil},
		{"service type", map[string]string{"service": "spec: {type: ExternalName}"}, "ExternalName", nil},
		{"traffic policy", map[string]string{"service": "spec: {externalTrafficPolicy: Nearest}"}, "Nearest", nil},
		{"service field", map[string]string{"service": "spec: {selector: {app: other}}"}, "selector", nil},
		{"not yaml", map[string]string{"service": "spec: ["}, "service", nil},
	} {
		p, err := ParseGatewayParameters(&corev1.ConfigMap{Data: c.data})
		switch {
		case c.want == "" && err != nil:
			t.Errorf("%s: %v", c.name, err)
		case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want)):
			t.Errorf("%s: error %v, want one naming %q", c.name, err, c.want)
		case c.chk != nil && !c.chk(p):
			t.Errorf("%s: parsed %+v", c.name, p)
		}
	}
}

func paramsConfigMap(t *testing.T, ns, name string, data map[string]string) *corev1.ConfigMap {
	t.Helper()
	cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}, Data: data}
	if err := k8s.Create(context.Background(), cm); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = k8s.Delete(context.Background(), cm) })
	return cm
}

func waitGatewayAccepted(t *testing.T, ns, name string, status metav1.ConditionStatus, reason, msg string) {
	t.Helper()
	eventually(t, fmt.Sprintf("Gateway %s/%s Accepted=%s %s", ns, name, status, reason), func() error {
		gw := &gwv1.Gateway{}
		if err := k8s.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: name}, gw); err != nil {
			return err
		}
		c := meta.FindStatusCondition(gw.Status.Conditions, string(gwv1.GatewayConditionAccepted))
		if c == nil || c.Status != status || c.Reason != reason || c.ObservedGeneration != gw.Generation || !strings.Contains(c.Message, msg) {
			return fmt.Errorf("Accepted %+v", c)
		}
		return nil
	})
}

// TestIngressGatewayParameters: a class's parametersRef ConfigMap gives
// its Gateways' defaults (replicas, resources, Service type), a Gateway's
// spec.infrastructure.parametersRef overrides them field by field, and its
// infrastructure labels and annotations are set on what is created for
// it; invalid parameters (class or Gateway) are a status condition naming
// the problem, never a crash or a silent default.
func TestIngressGatewayParameters(t *testing.T) {
	ctx := context.Background()
	const sys, ns, class = "gw-params-sys", "gw-params", "params-class"
	createNamespace(t, sys)
	createNamespace(t, ns)
	newMesh(t, "gw-params", "mesh-gw-params", nil)
	t.Cleanup(func() { _ = k8s.DeleteAllOf(ctx, &gwv1.Gateway{}, client.InNamespace(ns)) })
	paramsConfigMap(t, sys, "class-defaults", map[string]string{
		"deployment": `
spec:
  replicas: 2
  template:
    spec:
      containers:
      - name: istio-proxy
        resources: {requests: {cpu: 50m, memory: 32Mi}, limits: {memory: 96Mi}}
`,
		"service": "spec: {type: NodePort}",
	})
	paramsConfigMap(t, ns, "own", map[string]string{
		"deployment": "spec: {replicas: 3}",
		"service":    "metadata: {annotations: {metallb.universe.tf/address-pool: edge}}\nspec: {externalTrafficPolicy: Local}",
	})
	paramsConfigMap(t, ns, "bad", map[string]string{"deployment": "spec: {template: {spec: {hostNetwork: true}}}"})
	createClass(t, class, WaypointControllerName, func(gc *gwv1.GatewayClass) {
		gc.Spec.ParametersRef = &gwv1.ParametersReference{Kind: "ConfigMap", Name: "class-defaults", Namespace: ptr.To(gwv1.Namespace(sys))}
	})
	waitClassCondition(t, class, metav1.ConditionTrue, gwv1.GatewayClassReasonAccepted)

	// A Gateway with only the class's parameters.
	plain := seedsIngressGateway(ns)
	plain.Name, plain.Spec.GatewayClassName = "plain", class
	if err := k8s.Create(ctx, plain); err != nil {
		t.Fatal(err)
	}
	dep := &appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "plain-istio"}}
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "plain-istio"}}
	eventually(t, "class defaults applied", func() error {
		if err := k8s.Get(ctx, client.ObjectKeyFromObject(dep), dep); err != nil {
			return err
		}
		if err := k8s.Get(ctx, client.ObjectKeyFromObject(svc), svc); err != nil {
			return err
		}
		res := dep.Spec.Template.Spec.Containers[0].Resources
		if ptr.Deref(dep.Spec.Replicas, 0) != 2 || res.Requests.Cpu().String() != "50m" || res.Limits.Memory().String() != "96Mi" || svc.Spec.Type != corev1.ServiceTypeNodePort {
			return fmt.Errorf("replicas %d resources %+v service %s", ptr.Deref(dep.Spec.Replicas, 0), res, svc.Spec.Type)
		}
		return nil
	})

	// A Gateway with its own parameters and infrastructure metadata.
	own := seedsIngressGateway(ns)
	own.Name, own.Spec.GatewayClassName = "own", class
	own.Spec.Infrastructure = &gwv1.GatewayInfrastructure{
		Labels:        map[gwv1.LabelKey]gwv1.LabelValue{"team": "edge", LabelGatewayName: "spoofed"},
		Annotations:   map[gwv1.AnnotationKey]gwv1.AnnotationValue{"example.com/owner": "edge-team"},
		ParametersRef: &gwv1.LocalParametersReference{Group: "", Kind: "ConfigMap", Name: "own"},
	}
	if err := k8s.Create(ctx, own); err != nil {
		t.Fatal(err)
	}
	dep = &appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "own-istio"}}
	svc = &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "own-istio"}}
	eventually(t, "gateway parameters over the class's", func() error {
		if err := k8s.Get(ctx, client.ObjectKeyFromObject(dep), dep); err != nil {
			return err
		}
		if err := k8s.Get(ctx, client.ObjectKeyFromObject(svc), svc); err != nil {
			return err
		}
		res := dep.Spec.Template.Spec.Containers[0].Resources
		if ptr.Deref(dep.Spec.Replicas, 0) != 3 || res.Requests.Cpu().String() != "50m" || svc.Spec.Type != corev1.ServiceTypeNodePort ||
			svc.Spec.ExternalTrafficPolicy != corev1.ServiceExternalTrafficPolicyLocal || svc.Annotations["metallb.universe.tf/address-pool"] != "edge" {
			return fmt.Errorf("replicas %d resources %+v service %s/%s %v", ptr.Deref(dep.Spec.Replicas, 0), res, svc.Spec.Type, svc.Spec.ExternalTrafficPolicy, svc.Annotations)
		}
		return nil
	})
	for what, m := range map[string]metav1.ObjectMeta{"deployment": dep.ObjectMeta, "service": svc.ObjectMeta, "pod template": dep.Spec.Template.ObjectMeta} {
		if m.Labels["team"] != "edge" || m.Labels[LabelGatewayName] != "own" || m.Annotations["example.com/owner"] != "edge-team" {
			t.Errorf("%s labels %v annotations %v: want the infrastructure's, ours winning a clash", what, m.Labels, m.Annotations)
		}
	}
	waitGatewayAccepted(t, ns, "own", metav1.ConditionTrue, string(gwv1.GatewayReasonAccepted), "")

	// Parameters we refuse: a condition naming the field; the objects
	// applied before stay as they were.
	patchGateway := func(name string, mutate func(*gwv1.Gateway)) {
		t.Helper()
		gw := &gwv1.Gateway{}
		if err := k8s.Get(ctx, client.ObjectKey{Namespace: ns, Name: name}, gw); err != nil {
			t.Fatal(err)
		}
		p := client.MergeFrom(gw.DeepCopy())
		mutate(gw)
		if err := k8s.Patch(ctx, gw, p); err != nil {
			t.Fatal(err)
		}
	}
	patchGateway("own", func(gw *gwv1.Gateway) { gw.Spec.Infrastructure.ParametersRef.Name = "bad" })
	waitGatewayAccepted(t, ns, "own", metav1.ConditionFalse, string(gwv1.GatewayReasonInvalidParameters), "hostNetwork")
	if err := k8s.Get(ctx, client.ObjectKeyFromObject(dep), dep); err != nil || ptr.Deref(dep.Spec.Replicas, 0) != 3 || dep.Spec.Template.Spec.HostNetwork {
		t.Errorf("deployment changed under invalid parameters: %v %+v", err, dep.Spec)
	}
	patchGateway("own", func(gw *gwv1.Gateway) { gw.Spec.Infrastructure.ParametersRef.Name = "missing" })
	waitGatewayAccepted(t, ns, "own", metav1.ConditionFalse, string(gwv1.GatewayReasonInvalidParameters), "not found")
	patchGateway("own", func(gw *gwv1.Gateway) {
		gw.Spec.Infrastructure.ParametersRef = &gwv1.LocalParametersReference{Group: "example.com", Kind: "GatewayConfig", Name: "own"}
	})
	waitGatewayAccepted(t, ns, "own", metav1.ConditionFalse, string(gwv1.GatewayReasonInvalidParameters), "not supported")

	// A class whose ConfigMap is invalid is not accepted, and says why.
	const badClass = "params-class-bad"
	paramsConfigMap(t, sys, "class-bad", map[string]string{"deployment": "spec: {template: {spec: {containers: [{name: istio-proxy, resources: {requests: {cpu: 2}, limits: {cpu: 1}}}]}}}"})
	createClass(t, badClass, WaypointControllerName, func(gc *gwv1.GatewayClass) {
		gc.Spec.ParametersRef = &gwv1.ParametersReference{Kind: "ConfigMap", Name: "class-bad", Namespace: ptr.To(gwv1.Namespace(sys))}
	})
	gc := waitClassCondition(t, badClass, metav1.ConditionFalse, gwv1.GatewayClassReasonInvalidParameters)
	if c := meta.FindStatusCondition(gc.Status.Conditions, string(gwv1.GatewayClassConditionStatusAccepted)); !strings.Contains(c.Message, "above its limit") {
		t.Errorf("class condition %q does not say why", c.Message)
	}
	ofBad := seedsIngressGateway(ns)
	ofBad.Name, ofBad.Spec.GatewayClassName = "of-bad-class", badClass
	if err := k8s.Create(ctx, ofBad); err != nil {
		t.Fatal(err)
	}
	waitGatewayAccepted(t, ns, "of-bad-class", metav1.ConditionFalse, string(gwv1.GatewayReasonInvalidParameters), "above its limit")
	if err := k8s.Get(ctx, client.ObjectKey{Namespace: ns, Name: "of-bad-class-istio"}, &appsv1.Deployment{}); err == nil {
		t.Error("a Gateway of a class with invalid parameters was deployed")
	}
}

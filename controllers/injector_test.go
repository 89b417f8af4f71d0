package controllers

import (
	"cmp"
	"context"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/ambientmesh/ambient/proxylib/discovery/selection"
)

func injectionNamespace(t *testing.T, name string, labels map[string]string) {
	t.Helper()
	ctx := context.Background()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}
	if err := k8s.Create(ctx, ns); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	// envtest runs no controller-manager: the pods' service account.
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: name, Name: "default"}}
	if err := k8s.Create(ctx, sa); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
}

type podCase struct {
	name, ns                 string
	labels, annotations      map[string]string
	hostNetwork              bool
	initContainer            string // an init container the pod brings
	wantInjected             bool
	wantRefused              string // substring of the refusal; "" = admitted
	wantInitEnv              map[string]string
	wantExcludedFromCapture  bool
	wantHBONEInDiscoveryView bool
}

func createTestPod(t *testing.T, tc podCase) (*corev1.Pod, error) {
	t.Helper()
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: tc.name, Namespace: tc.ns, Labels: tc.labels, Annotations: tc.annotations},
		Spec: corev1.PodSpec{HostNetwork: tc.hostNetwork, Containers: []corev1.Container{{Name: "app", Image: "app",
			Ports: []corev1.ContainerPort{{ContainerPort: 8080}}}}},
	}
	if tc.initContainer != "" {
		pod.Spec.InitContainers = []corev1.Container{{Name: tc.initContainer, Image: "setup"}}
	}
	err := k8s.Create(context.Background(), pod)
	if err == nil {
		t.Cleanup(func() { _ = k8s.Delete(context.Background(), pod, client.GracePeriodSeconds(0)) })
	}
	return pod, err
}

func checkPod(t *testing.T, tc podCase, pod *corev1.Pod, err error) {
	t.Helper()
	if tc.wantRefused != "" {
		if err == nil || !strings.Contains(err.Error(), tc.wantRefused) {
			t.Fatalf("create: %v, want refused with %q", err, tc.wantRefused)
		}
		// Never half-applied: the refused pod does not exist.
		if gerr := k8s.Get(context.Background(), client.ObjectKeyFromObject(pod), &corev1.Pod{}); !apierrors.IsNotFound(gerr) {
			t.Fatalf("refused pod exists: %v", gerr)
		}
		return
	}
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	_, status := pod.Annotations[SidecarStatusAnnotation]
	if !tc.wantInjected {
		if status || len(pod.Spec.InitContainers) != 0 {
			t.Fatalf("pod was injected: %v %v", pod.Annotations, pod.Spec.InitContainers)
		}
		return
	}
	if got := pod.Annotations[DefaultContainerAnnotation]; got != pod.Spec.Containers[0].Name {
		t.Errorf("default container %q, want the app's %q (kubectl exec/logs)", got, pod.Spec.Containers[0].Name)
	}
	wantInit := 2
	if tc.initContainer != "" {
		wantInit = 3 // the app's own runs after the sidecar started
	}
	if !status || len(pod.Spec.InitContainers) != wantInit || pod.Spec.InitContainers[wantInit-1].Name != cmp.Or(tc.initContainer, SidecarName) {
		t.Fatalf("pod not injected: annotations %v, init containers %+v", pod.Annotations, pod.Spec.InitContainers)
	}
	initC, proxyC := pod.Spec.InitContainers[0], pod.Spec.InitContainers[1]
	if initC.Name != SidecarInitName || initC.Image != testDefaults.SidecarImage || !slices.Equal(initC.Args, []string{"init"}) || initC.RestartPolicy != nil {
		t.Errorf("redirection init container: %+v", initC)
	}
	if caps := initC.SecurityContext.Capabilities; !slices.Equal(caps.Add, []corev1.Capability{"NET_ADMIN"}) || !slices.Equal(caps.Drop, []corev1.Capability{"ALL"}) {
		t.Errorf("init container capabilities %+v, want NET_ADMIN only", caps)
	}
	if proxyC.Name != SidecarName || proxyC.RestartPolicy == nil || *proxyC.RestartPolicy != corev1.ContainerRestartPolicyAlways {
		t.Errorf("sidecar is not a native sidecar container: %+v", proxyC)
	}
	sc := proxyC.SecurityContext
	if *sc.RunAsUser != 1337 || !*sc.RunAsNonRoot || len(sc.Capabilities.Add) != 0 || *sc.AllowPrivilegeEscalation {
		t.Errorf("sidecar security context %+v", sc)
	}
	// The app containers get no capability (nor anything else).
	for _, c := range pod.Spec.Containers {
		if c.SecurityContext != nil && c.SecurityContext.Capabilities != nil && len(c.SecurityContext.Capabilities.Add) > 0 {
			t.Errorf("container %s got capabilities %v", c.Name, c.SecurityContext.Capabilities.Add)
		}
	}
	env := envMap(proxyC.Env)
	if env["XDS_ADDRESS"] != "ambient-controlplane.inject-mesh.svc:15010" || env["CA_ADDRESS"] != "ambient-controlplane.inject-mesh.svc:15012" || env["TRUST_DOMAIN"] != "cluster.local" {
		t.Errorf("sidecar env %v", env)
	}
	initEnv := envMap(initC.Env)
	for k, v := range tc.wantInitEnv {
		if initEnv[k] != v {
			t.Errorf("init env %s = %q, want %q (all: %v)", k, initEnv[k], v, initEnv)
		}
	}
	// The node agent leaves the pod alone; discovery advertises HBONE.
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: pod.Namespace, Labels: map[string]string{"istio.io/dataplane-mode": "ambient"}}}
	if captured, why := selection.Decide(selection.Config{}, ns, pod); captured || why != selection.ReasonSidecar {
		t.Errorf("ambient capture decision %v (%s), want left alone", captured, why)
	}
	if !selection.HBONESidecar(pod) {
		t.Error("discovery would not advertise HBONE for the injected pod")
	}
}

// TestSidecarInjection: the mutating webhook as installed (selectors of
// config/webhook/sidecar_injector.yaml, failurePolicy Fail) against a real
// API server: refused while no AmbientMesh exists, then injection by
// namespace label or pod opt-in, Istio's opt-outs, exclusions passed to the
// redirection, bad annotations refused.
func TestSidecarInjection(t *testing.T) {
	injectionNamespace(t, "inj-on", map[string]string{InjectionNamespaceLabel: "enabled"})
	injectionNamespace(t, "inj-off", nil)
	injectionNamespace(t, "inj-disabled", map[string]string{InjectionNamespaceLabel: "disabled"})

	t.Run("no mesh", func(t *testing.T) {
		for _, tc := range []podCase{
			{name: "nomesh-ns", ns: "inj-on", wantRefused: "no AmbientMesh is installed"},
			{name: "nomesh-label", ns: "inj-off", labels: map[string]string{InjectLabel: "true"}, wantRefused: "no AmbientMesh is installed"},
			{name: "nomesh-optout", ns: "inj-on", labels: map[string]string{InjectLabel: "false"}},
			{name: "nomesh-plain", ns: "inj-off"},
		} {
			t.Run(tc.name, func(t *testing.T) {
				pod, err := createTestPod(t, tc)
				checkPod(t, tc, pod, err)
			})
		}
	})

	newMesh(t, "inject", "inject-mesh", nil)
	eventually(t, "mesh exists", exists(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "inject-mesh"}}))
	injectionNamespace(t, "inject-mesh", nil) // its service account
	tests := []podCase{
		{name: "namespace-label", ns: "inj-on", wantInjected: true},
		{name: "pod-label", ns: "inj-off", labels: map[string]string{InjectLabel: "true"}, wantInjected: true},
		{name: "pod-label-false", ns: "inj-on", labels: map[string]string{InjectLabel: "false"}},
		{name: "pod-annotation-false", ns: "inj-on", annotations: map[string]string{InjectLabel: "false"}},
		{name: "pod-annotation-true", ns: "inj-on", annotations: map[string]string{InjectLabel: "true"}, wantInjected: true},
		{name: "plain", ns: "inj-off"},
		{name: "namespace-disabled", ns: "inj-disabled", labels: map[string]string{InjectLabel: "true"}},
		{name: "host-network", ns: "inj-on", hostNetwork: true},
		{name: "exclusions", ns: "inj-on", annotations: map[string]string{
			"traffic.sidecar.istio.io/excludeOutboundPorts":    "3306,6379",
			"traffic.sidecar.istio.io/excludeInboundPorts":     "9090",
			"traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.96.0.0/12"},
			wantInjected: true, wantInitEnv: map[string]string{"SIDECAR_UID": "1337", "EXCLUDE_OUTBOUND_PORTS": "3306,6379",
				"EXCLUDE_INBOUND_PORTS": "9090", "EXCLUDE_OUTBOUND_IP_RANGES": "10.96.0.0/12"}},
		{name: "bad-exclusion", ns: "inj-on", annotations: map[string]string{"traffic.sidecar.istio.io/excludeOutboundPorts": "mysql"},
			wantRefused: "excludeOutboundPorts"},
		{name: "taken-name", ns: "inj-off", labels: map[string]string{InjectLabel: "true"}, initContainer: "istio-proxy",
			wantRefused: "already has istio-proxy"},
		{name: "app-init-container", ns: "inj-on", initContainer: "setup", wantInjected: true},
		// The mesh's own namespace never gets sidecars, and its pods start.
		{name: "mesh-namespace", ns: "inject-mesh", labels: map[string]string{InjectLabel: "true"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			pod, err := createTestPod(t, tc)
			checkPod(t, tc, pod, err)
		})
	}
}

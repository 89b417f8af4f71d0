package selection

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func TestDecide(t *testing.T) {
	ambientNS := func(name string) *corev1.Namespace {
		return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{DataplaneModeLabel: DataplaneModeAmbient}}}
	}
	pod := func(ns string, mut func(*corev1.Pod)) *corev1.Pod {
		p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "p", Namespace: ns}}
		if mut != nil {
			mut(p)
		}
		return p
	}
	cfg := Config{MeshNamespace: "ambient-system", ExcludedNamespaces: []string{"legacy"}}
	tests := []struct {
		name   string
		ns     *corev1.Namespace
		pod    *corev1.Pod
		want   bool
		reason Reason
	}{
		{"ambient namespace, plain pod", ambientNS("app"), pod("app", nil), true, Captured},
		{"namespace without label", &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "app"}}, pod("app", nil), false, ReasonNamespaceNotAmbient},
		{"namespace label other value", &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "app", Labels: map[string]string{DataplaneModeLabel: "sidecar"}}}, pod("app", nil), false, ReasonNamespaceNotAmbient},
		{"unknown namespace", nil, pod("app", nil), false, ReasonNamespaceNotAmbient},
		{"kube-system even if labelled", ambientNS("kube-system"), pod("kube-system", nil), false, ReasonSystemNamespace},
		{"mesh namespace even if labelled", ambientNS("ambient-system"), pod("ambient-system", nil), false, ReasonMeshNamespace},
		{"excluded namespace even if labelled", ambientNS("legacy"), pod("legacy", nil), false, ReasonExcluded},
		{"pod opts out by label", ambientNS("app"), pod("app", func(p *corev1.Pod) { p.Labels = map[string]string{DataplaneModeLabel: DataplaneModeNone} }), false, ReasonPodOptOut},
		{"sidecar status annotation wins", ambientNS("app"), pod("app", func(p *corev1.Pod) { p.Annotations = map[string]string{SidecarStatusAnnotation: "{}"} }), false, ReasonSidecar},
		{"empty sidecar status still a sidecar", ambientNS("app"), pod("app", func(p *corev1.Pod) { p.Annotations = map[string]string{SidecarStatusAnnotation: ""} }), false, ReasonSidecar},
		{"redirection disabled", ambientNS("app"), pod("app", func(p *corev1.Pod) { p.Annotations = map[string]string{RedirectionAnnotation: RedirectionDisabled} }), false, ReasonRedirectionOff},
		{"redirection enabled annotation keeps capture", ambientNS("app"), pod("app", func(p *corev1.Pod) { p.Annotations = map[string]string{RedirectionAnnotation: RedirectionEnabled} }), true, Captured},
		{"host network", ambientNS("app"), pod("app", func(p *corev1.Pod) { p.Spec.HostNetwork = true }), false, ReasonHostNetwork},
		{"pod label ambient does not override namespace", &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "app"}}, pod("app", func(p *corev1.Pod) { p.Labels = map[string]string{DataplaneModeLabel: DataplaneModeAmbient} }), false, ReasonNamespaceNotAmbient},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, reason := Decide(cfg, tt.ns, tt.pod)
			if got != tt.want || reason != tt.reason {
				t.Fatalf("Decide = %v (%s), want %v (%s)", got, reason, tt.want, tt.reason)
			}
		})
	}
}

func TestCaptureDNS(t *testing.T) {
	for _, tc := range []struct {
		mesh       bool
		annotation *string
		want       bool
	}{
		{false, nil, false},
		{true, nil, true},
		{false, ptr("true"), true},
		{true, ptr("false"), false},
		{false, ptr("TRUE"), true}, // strconv.ParseBool, as Istio
		{true, ptr("0"), false},
		{true, ptr("yes"), true}, // unparsable: the mesh's setting
		{false, ptr("yes"), false},
		{true, ptr(""), true},
	} {
		p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "p"}}
		if tc.annotation != nil {
			p.Annotations = map[string]string{DNSCaptureAnnotation: *tc.annotation}
		}
		if got := CaptureDNS(tc.mesh, p); got != tc.want {
			t.Errorf("mesh %t, annotation %v: CaptureDNS = %t, want %t", tc.mesh, tc.annotation, got, tc.want)
		}
	}
}

func ptr(s string) *string { return &s }

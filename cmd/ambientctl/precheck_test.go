package main

import (
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kversion "k8s.io/apimachinery/pkg/version"
)

func TestPrecheckChecks(t *testing.T) {
	node := func(name string, conds ...corev1.NodeCondition) corev1.Node {
		return corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}, Status: corev1.NodeStatus{Conditions: conds}}
	}
	ready := corev1.NodeCondition{Type: corev1.NodeReady, Status: corev1.ConditionTrue}
	noCNI := corev1.NodeCondition{Type: corev1.NodeReady, Status: corev1.ConditionFalse,
		Message: "container runtime network not ready: NetworkReady=false reason:NetworkPluginNotReady message:Network plugin returns error: cni plugin not initialized"}
	deploy := func(ns, name string) appsv1.Deployment {
		return appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
	}
	ds := func(ns, name string) appsv1.DaemonSet {
		return appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
	}
	for _, tc := range []struct {
		name string
		got  checkResult
		want string
	}{
		{"current Kubernetes", checkKubeVersion(&kversion.Info{Major: "1", Minor: "36", GitVersion: "v1.36.3"}), "pass"},
		{"provider minor with +", checkKubeVersion(&kversion.Info{Major: "1", Minor: "31+", GitVersion: "v1.31.2-eks"}), "pass"},
		{"old Kubernetes", checkKubeVersion(&kversion.Info{Major: "1", Minor: "28", GitVersion: "v1.28.0"}), "fail"},
		{"nodes with a network", checkCNI([]corev1.Node{node("a", ready), node("b", ready)}), "pass"},
		{"a node without CNI", checkCNI([]corev1.Node{node("a", ready), node("b", noCNI)}), "fail"},
		{"no nodes", checkCNI(nil), "fail"},
		{"only our mesh", checkIstioConflict([]appsv1.Deployment{deploy("ambient-system", "ambient-controller-manager")}, []appsv1.DaemonSet{ds("ambient-system", "ztunnel")}, "ambient-system"), "pass"},
		{"istiod installed", checkIstioConflict([]appsv1.Deployment{deploy("istio-system", "istiod")}, nil, "ambient-system"), "fail"},
		{"Istio's ztunnel", checkIstioConflict(nil, []appsv1.DaemonSet{ds("istio-system", "ztunnel")}, "ambient-system"), "fail"},
		{"kernel modules are not visible", kernelModulesCheck(), "skipped"},
	} {
		if tc.got.Result != tc.want {
			t.Errorf("%s: %+v, want %s", tc.name, tc.got, tc.want)
		}
	}
	var b strings.Builder
	if err := writePrecheck(&b, []checkResult{checkCNI(nil)}, "json"); err != nil || !strings.Contains(b.String(), `"result": "fail"`) {
		t.Errorf("-o json: %v\n%s", err, b.String())
	}
}

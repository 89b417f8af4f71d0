package main

import (
	"context"
	"github.com/spf13/pflag"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/ambientmesh/ambient/proxylib/meshgraph"
)

// TestKubeSource runs the dashboard's cluster source against a real API
// server (envtest, with the Istio security CRDs): it finds the proxies the
// operator runs, names the ones it cannot read, and returns the
// AuthorizationPolicies with the labels of the workloads they may select.
func TestKubeSource(t *testing.T) {
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		if _, err := os.Stat("../../bin/k8s/1.36.3/kube-apiserver"); err != nil {
			if os.Getenv("CI") == "true" {
				t.Fatal("envtest binaries missing (make envtest)")
			}
			t.Skip("envtest binaries missing (make envtest)")
		}
		abs, _ := filepath.Abs("../../bin/k8s/1.36.3")
		t.Setenv("KUBEBUILDER_ASSETS", abs)
	}
	env := &envtest.Environment{CRDDirectoryPaths: []string{"../../config/crd/bases", "../../controllers/controlplane/testdata/crds"}, ErrorIfCRDPathMissing: true}
	if _, err := env.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = env.Stop() })
	user, err := env.ControlPlane.AddUser(envtest.User{Name: "admin", Groups: []string{"system:masters"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	kc, err := user.KubeConfig()
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(path, kc, 0o600); err != nil {
		t.Fatal(err)
	}
	o := options{kube: newConfigFlags(pflag.NewFlagSet("test", pflag.ContinueOnError))}
	o.kube.KubeConfig = &path
	k, err := newKube(o)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, ns := range []string{"ambient-system", "demo"} {
		if err := k.c.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}); err != nil {
			t.Fatal(err)
		}
	}
	yes := true
	pod := func(ns, name string, labels map[string]string, owner string, phase corev1.PodPhase) {
		t.Helper()
		p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: labels},
			Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "c", Image: "x"}}}}
		if owner != "" {
			p.OwnerReferences = []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "ReplicaSet", Name: owner, UID: "1", Controller: &yes}}
		}
		if err := k.c.Create(ctx, p); err != nil {
			t.Fatal(err)
		}
		p.Status.Phase = phase
		if err := k.c.Status().Update(ctx, p); err != nil {
			t.Fatal(err)
		}
	}
	proxy := func(component string) map[string]string {
		return map[string]string{"app.kubernetes.io/managed-by": "ambient-operator", "app.kubernetes.io/component": component}
	}
	pod("ambient-system", "ztunnel-a", proxy("ztunnel"), "", corev1.PodRunning)
	pod("ambient-system", "ztunnel-b", proxy("ztunnel"), "", corev1.PodPending)
	pod("ambient-system", "ambient-node-agent-a", proxy("node-agent"), "", corev1.PodRunning)
	pod("demo", "echo-v1-7c9d-x", map[string]string{"app": "echo", "version": "v1", "pod-template-hash": "7c9d"}, "echo-v1-7c9d", corev1.PodRunning)
	for _, ap := range []string{
		`{"apiVersion":"security.istio.io/v1","kind":"AuthorizationPolicy","metadata":{"namespace":"demo","name":"allow-echo"},"spec":{"selector":{"matchLabels":{"app":"echo"}},"rules":[{}]}}`,
		`{"apiVersion":"security.istio.io/v1","kind":"AuthorizationPolicy","metadata":{"namespace":"demo","name":"deny-at-waypoint"},"spec":{"action":"DENY","targetRefs":[{"kind":"Service","group":"","name":"echo"}],"rules":[{}]}}`,
	} {
		var u unstructured.Unstructured
		if err := u.UnmarshalJSON([]byte(ap)); err != nil {
			t.Fatal(err)
		}
		if err := k.c.Create(ctx, &u); err != nil {
			t.Fatal(err)
		}
	}
	src := &kubeSource{k: k, timeout: 20 * time.Second}

	root, policies, workloads, err := src.Policies(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if root != defaultMeshNamespace {
		t.Errorf("root namespace %q, want %q (no AmbientMesh)", root, defaultMeshNamespace)
	}
	wantPolicies := []meshgraph.Policy{
		{Namespace: "demo", Name: "allow-echo", Selector: map[string]string{"app": "echo"}},
		{Namespace: "demo", Name: "deny-at-waypoint", Action: "DENY", TargetRefs: []meshgraph.Ref{{Kind: "Service", Name: "echo"}}},
	}
	if !reflect.DeepEqual(policies, wantPolicies) {
		t.Errorf("policies %+v\nwant %+v", policies, wantPolicies)
	}
	if len(workloads) != 1 || workloads[0].Name != "echo-v1" || workloads[0].Labels["app"] != "echo" {
		t.Errorf("workloads %+v, want echo-v1 with its labels", workloads)
	}
	y, err := src.PolicyYAML(ctx, "demo", "allow-echo")
	if err != nil || !strings.Contains(string(y), "app: echo") || strings.Contains(string(y), "managedFields") {
		t.Errorf("policy YAML: %v\n%s", err, y)
	}
	if _, err := src.PolicyYAML(ctx, "demo", "nope"); err == nil {
		t.Error("a missing policy gives no error")
	}

	// No kubelet here: the running ztunnel cannot be read, and is named;
	// the pending one and the node agent are not scraped at all.
	snap, errs := src.Scrape(ctx)
	if len(snap.Scrapes) != 0 || len(errs) != 1 || !strings.Contains(errs[0], "ambient-system/ztunnel-a") || !strings.Contains(errs[0], ":15020/metrics") {
		t.Errorf("scrape: %d scrapes, errors %q; want one error naming ztunnel-a's :15020/metrics", len(snap.Scrapes), errs)
	}
}

package observability

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	"sigs.k8s.io/yaml"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
	"github.com/ambientmesh/ambient/controllers"
)

const configDir = "../../config"

// kustomize builds dir with the repository's bin/kustomize and returns the
// objects, as generic maps.
func kustomize(t *testing.T, dir string) []map[string]any {
	t.Helper()
	bin, err := filepath.Abs("../../bin/kustomize")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(bin); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("bin/kustomize missing: %v", err)
		}
		t.Skip("bin/kustomize not built (make tools)")
	}
	var stderr bytes.Buffer
	cmd := exec.Command(bin, "build", dir)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("kustomize build %s: %v\n%s", dir, err, stderr.String())
	}
	var objs []map[string]any
	for _, doc := range strings.Split(string(out), "\n---\n") {
		var o map[string]any
		if err := yaml.Unmarshal([]byte(doc), &o); err != nil {
			t.Fatalf("kustomize build %s: %v", dir, err)
		}
		if o != nil {
			objs = append(objs, o)
		}
	}
	return objs
}

func find(objs []map[string]any, kind, name string) map[string]any {
	for _, o := range objs {
		md, _ := o["metadata"].(map[string]any)
		if o["kind"] == kind && md["name"] == name {
			return o
		}
	}
	return nil
}

// decode converts part of a generic object into a typed one.
func decode(t *testing.T, in any, out any) {
	t.Helper()
	raw, err := json.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(raw, out); err != nil {
		t.Fatal(err)
	}
}

// monitor is what matters of a ServiceMonitor or PodMonitor here.
type monitor struct {
	Spec struct {
		NamespaceSelector struct {
			Any bool `json:"any"`
		} `json:"namespaceSelector"`
		Selector            metav1.LabelSelector    `json:"selector"`
		Endpoints           []struct{ Port string } `json:"endpoints"`
		PodMetricsEndpoints []struct{ Port string } `json:"podMetricsEndpoints"`
	} `json:"spec"`
}

func (m monitor) ports() []string {
	var out []string
	for _, e := range append(m.Spec.Endpoints, m.Spec.PodMetricsEndpoints...) {
		out = append(out, e.Port)
	}
	return out
}

// target is an object a monitor may scrape: its labels and port names.
type target struct {
	labels map[string]string
	ports  []string
}

func podTarget(spec corev1.PodTemplateSpec) target {
	tg := target{labels: spec.Labels}
	for _, c := range spec.Spec.Containers {
		for _, p := range c.Ports {
			tg.ports = append(tg.ports, p.Name)
		}
	}
	return tg
}

// desiredPods are the pod templates the operator really renders, from its
// own rendering code.
func desiredPods(t *testing.T) map[string]corev1.PodTemplateSpec {
	t.Helper()
	mesh := &meshv1.AmbientMesh{ObjectMeta: metav1.ObjectMeta{Name: "default", UID: "00000000-0000-0000-0000-000000000001"}}
	mesh.Spec.Namespace = "ambient-system"
	mesh.Spec.TrustDomain = "cluster.local"
	mesh.Spec.CA.RootCertTTL = metav1.Duration{Duration: 24 * time.Hour}
	d := controllers.Defaults{ZtunnelImage: "z", NodeAgentImage: "n", WaypointImage: "w", OperatorNamespace: "ambient-system"}
	deployment := func(w controllers.Waypoint, err error) *appsv1.Deployment {
		if err != nil {
			t.Fatal(err)
		}
		_, dep, _ := controllers.DesiredWaypoint(w, mesh)
		return dep
	}
	waypointGW := &gwv1.Gateway{ObjectMeta: metav1.ObjectMeta{Namespace: "app", Name: "waypoint"},
		Spec: gwv1.GatewaySpec{GatewayClassName: controllers.WaypointGatewayClass,
			Listeners: []gwv1.Listener{{Name: "mesh", Port: 15008, Protocol: "HBONE"}}}}
	ingressGW := &gwv1.Gateway{ObjectMeta: metav1.ObjectMeta{Namespace: "app", Name: "gateway"},
		Spec: gwv1.GatewaySpec{GatewayClassName: controllers.IngressGatewayClass,
			Listeners: []gwv1.Listener{{Name: "http", Port: 80, Protocol: gwv1.HTTPProtocolType}}}}
	return map[string]corev1.PodTemplateSpec{
		"ztunnel":         controllers.DesiredZtunnel(mesh, d).Spec.Template,
		"node agent":      controllers.DesiredNodeAgent(mesh, d).Spec.Template,
		"waypoint":        deployment(controllers.WaypointFromGateway(waypointGW, mesh, d)).Spec.Template,
		"ingress gateway": deployment(controllers.IngressFromGateway(ingressGW, mesh, d)).Spec.Template,
	}
}

// desiredTargets are the pods the operator renders (desiredPods) and the
// manager's Service from config/.
func desiredTargets(t *testing.T, managerService map[string]any) map[string]target {
	t.Helper()
	var svc corev1.Service
	decode(t, managerService, &svc)
	svcTarget := target{labels: svc.Labels}
	for _, p := range svc.Spec.Ports {
		svcTarget.ports = append(svcTarget.ports, p.Name)
	}
	out := map[string]target{"manager service": svcTarget}
	for name, spec := range desiredPods(t) {
		out[name] = podTarget(spec)
	}
	return out
}

// TestPrometheusComponent: config/prometheus builds, alone and added to
// config/default, and its monitors select exactly the pods and Service the
// operator deploys, on ports those expose; Prometheus may read the
// manager's HTTPS metrics.
func TestPrometheusComponent(t *testing.T) {
	component := kustomize(t, filepath.Join(configDir, "prometheus"))
	if len(component) != 4 {
		t.Errorf("component renders %d objects, want the 3 monitors and the binding", len(component))
	}
	overlay := t.TempDir()
	base, _ := filepath.Abs(configDir)
	rel := func(dir string) string {
		r, err := filepath.Rel(overlay, filepath.Join(base, dir))
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	kust := "resources: [" + rel("default") + "]\ncomponents: [" + rel("prometheus") + "]\n"
	if err := os.WriteFile(filepath.Join(overlay, "kustomization.yaml"), []byte(kust), 0o644); err != nil {
		t.Fatal(err)
	}
	installed := kustomize(t, overlay)
	managerSvc := find(installed, "Service", "ambient-controller-manager-metrics-service")
	if managerSvc == nil {
		t.Fatal("config/default has no manager metrics Service")
	}
	targets := desiredTargets(t, managerSvc)

	tests := []struct {
		kind, name string
		scrapes    []string // targets it must select, on a port they have
		ignores    []string
	}{
		{"ServiceMonitor", "manager", []string{"manager service"}, []string{"ztunnel", "waypoint"}},
		{"PodMonitor", "ztunnel", []string{"ztunnel"}, []string{"node agent", "waypoint", "ingress gateway"}},
		{"PodMonitor", "waypoint", []string{"waypoint", "ingress gateway"}, []string{"ztunnel", "node agent"}},
	}
	for _, tc := range tests {
		t.Run(tc.kind+"/"+tc.name, func(t *testing.T) {
			obj := find(installed, tc.kind, tc.name)
			if obj == nil {
				t.Fatalf("%s %s not rendered", tc.kind, tc.name)
			}
			var m monitor
			decode(t, obj, &m)
			sel, err := metav1.LabelSelectorAsSelector(&m.Spec.Selector)
			if err != nil || sel.Empty() {
				t.Fatalf("selector %+v: %v", m.Spec.Selector, err)
			}
			if !m.Spec.NamespaceSelector.Any {
				t.Error("targets live in the operator's, the mesh's and the applications' namespaces: namespaceSelector.any must be true")
			}
			for _, name := range tc.scrapes {
				tg := targets[name]
				if !sel.Matches(labels.Set(tg.labels)) {
					t.Errorf("does not select the %s (labels %v)", name, tg.labels)
				}
				for _, p := range m.ports() {
					if !slices.Contains(tg.ports, p) {
						t.Errorf("port %q: the %s exposes %v", p, name, tg.ports)
					}
				}
			}
			for _, name := range tc.ignores {
				if sel.Matches(labels.Set(targets[name].labels)) {
					t.Errorf("selects the %s too", name)
				}
			}
		})
	}

	// The binding grants the ClusterRole config/default ships for /metrics.
	var binding rbacv1.ClusterRoleBinding
	decode(t, find(installed, "ClusterRoleBinding", "prometheus-metrics-reader"), &binding)
	var role rbacv1.ClusterRole
	decode(t, find(installed, "ClusterRole", binding.RoleRef.Name), &role)
	if len(role.Rules) == 0 || !slices.Contains(role.Rules[0].NonResourceURLs, "/metrics") || !slices.Contains(role.Rules[0].Verbs, "get") {
		t.Errorf("binding refers to ClusterRole %q with rules %+v, want get /metrics", binding.RoleRef.Name, role.Rules)
	}
}

// TestGrafanaConfigMap: config/grafana builds into the sidecar-labelled
// ConfigMap carrying every dashboard file.
func TestGrafanaConfigMap(t *testing.T) {
	objs := kustomize(t, filepath.Join(configDir, "grafana"))
	var cm corev1.ConfigMap
	decode(t, find(objs, "ConfigMap", "ambient-grafana-dashboards"), &cm)
	if cm.Labels["grafana_dashboard"] != "1" {
		t.Errorf("labels %v: the Grafana sidecar looks for grafana_dashboard=1", cm.Labels)
	}
	for file := range loadDashboards(t) {
		if cm.Data[file] == "" {
			t.Errorf("%s is not in the ConfigMap", file)
		}
	}
}

package observability

import (
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/prometheus/prometheus/config"
	_ "github.com/prometheus/prometheus/discovery/kubernetes" // kubernetes_sd_configs
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/model/relabel"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

const labPrometheus = "../lab/manifests/prometheus/prometheus.yaml"

var unsafeLabelChars = regexp.MustCompile(`[^a-zA-Z0-9_]`)

// sdTargets are the targets Prometheus' kubernetes_sd (role pod) makes of a
// pod: one per container port, with its meta labels.
func sdTargets(ns, name, node string, spec corev1.PodTemplateSpec) []labels.Labels {
	var out []labels.Labels
	for _, c := range spec.Spec.Containers {
		for _, p := range c.Ports {
			m := map[string]string{
				"__meta_kubernetes_namespace":               ns,
				"__meta_kubernetes_pod_name":                name,
				"__meta_kubernetes_pod_node_name":           node,
				"__meta_kubernetes_pod_container_port_name": p.Name,
				"__meta_kubernetes_pod_container_name":      c.Name,
				"__address__":                               "10.0.0.1:" + strconv.Itoa(int(p.ContainerPort)),
				"job":                                       "",
			}
			for k, v := range spec.Labels {
				m["__meta_kubernetes_pod_label_"+unsafeLabelChars.ReplaceAllString(k, "_")] = v
			}
			out = append(out, labels.FromMap(m))
		}
	}
	return out
}

// TestLabPrometheusConfig: the lab's plain Prometheus (no Operator) scrapes
// what the config/prometheus monitors scrape: its configuration loads with
// Prometheus' own loader, and each job's relabeling, run by Prometheus' own
// relabel code over the targets service discovery makes of the pods the
// operator renders, keeps exactly the right pod and port and sets the job
// (and node/gateway) labels the dashboards use.
func TestLabPrometheusConfig(t *testing.T) {
	raw, err := os.ReadFile(labPrometheus)
	if err != nil {
		t.Fatal(err)
	}
	var promYAML string
	var manager *appsv1.Deployment
	for _, doc := range strings.Split(string(raw), "\n---\n") {
		var cm corev1.ConfigMap
		if err := yaml.Unmarshal([]byte(doc), &cm); err != nil {
			t.Fatal(err)
		}
		if cm.Kind == "ConfigMap" {
			promYAML = cm.Data["prometheus.yml"]
		}
	}
	cfg, err := config.Load(promYAML, nil)
	if err != nil {
		t.Fatalf("prometheus.yml does not load: %v", err)
	}
	jobs := map[string]*config.ScrapeConfig{}
	for _, sc := range cfg.ScrapeConfigs {
		jobs[sc.JobName] = sc
	}

	// The operator's own renderings, and the manager Deployment of config/.
	installed := kustomize(t, configDir+"/default")
	for _, o := range installed {
		if o["kind"] == "Deployment" {
			manager = &appsv1.Deployment{}
			decode(t, o, manager)
		}
	}
	if manager == nil {
		t.Fatal("config/default renders no manager Deployment")
	}
	pods := desiredPods(t)
	pods["manager"] = manager.Spec.Template

	tests := []struct {
		job      string
		keeps    map[string]string // pod -> port it is scraped on
		jobLabel map[string]string // pod -> job label after relabeling
		extra    map[string][2]string
	}{
		{job: "ztunnel", keeps: map[string]string{"ztunnel": "15020"}, jobLabel: map[string]string{"ztunnel": "ztunnel"},
			extra: map[string][2]string{"ztunnel": {"node", "node-a"}}},
		{job: "waypoint", keeps: map[string]string{"waypoint": "15020", "ingress gateway": "15020"},
			jobLabel: map[string]string{"waypoint": "waypoint", "ingress gateway": "ingress-gateway"},
			extra:    map[string][2]string{"waypoint": {"gateway", "waypoint"}}},
		{job: "ambient-manager", keeps: map[string]string{"manager": "8443"}, jobLabel: map[string]string{"manager": "ambient-manager"}},
	}
	for _, tc := range tests {
		t.Run(tc.job, func(t *testing.T) {
			sc := jobs[tc.job]
			if sc == nil {
				t.Fatalf("no job %s", tc.job)
			}
			if tc.job == "ambient-manager" && (sc.Scheme != "https" || sc.HTTPClientConfig.Authorization == nil) {
				t.Errorf("manager job: scheme %q, authorization %v; the manager serves HTTPS to authenticated callers", sc.Scheme, sc.HTTPClientConfig.Authorization)
			}
			for name, spec := range pods {
				kept := 0
				for _, tg := range sdTargets("ns", name, "node-a", spec) {
					lb := labels.NewBuilder(tg)
					lb.Set("job", tc.job)
					if !relabel.ProcessBuilder(lb, sc.RelabelConfigs...) {
						continue
					}
					kept++
					got := lb.Labels()
					port, ok := tc.keeps[name]
					if !ok {
						t.Errorf("scrapes the %s (%v)", name, got)
						continue
					}
					if !strings.HasSuffix(got.Get("__address__"), ":"+port) {
						t.Errorf("%s scraped at %s, want port %s", name, got.Get("__address__"), port)
					}
					if j := got.Get("job"); j != tc.jobLabel[name] {
						t.Errorf("%s: job %q, want %q", name, j, tc.jobLabel[name])
					}
					if e, ok := tc.extra[name]; ok && got.Get(e[0]) != e[1] {
						t.Errorf("%s: label %s=%q, want %q", name, e[0], got.Get(e[0]), e[1])
					}
				}
				if _, want := tc.keeps[name]; want && kept != 1 {
					t.Errorf("%s: %d targets kept, want 1", name, kept)
				}
			}
		})
	}
}

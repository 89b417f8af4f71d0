package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	"github.com/ambientmesh/ambient/controllers"
	"github.com/ambientmesh/ambient/hack/pin"
)

const root = "../.."

func readYAML(t *testing.T, path string) map[string]any {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]any{}
	if err := yaml.Unmarshal(data, &m); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return m
}

func get(m map[string]any, path ...string) any {
	var cur any = m
	for _, p := range path {
		mm, ok := cur.(map[string]any)
		if !ok {
			return nil
		}
		cur = mm[p]
	}
	return cur
}

// TestCommittedBundleIsValid checks the committed bundle against what OLM
// requires of a registry+v1 bundle (operator-sdk's validator cannot be
// fetched here).
func TestCommittedBundleIsValid(t *testing.T) {
	csv := readYAML(t, filepath.Join(root, "bundle/manifests/ambient-operator.clusterserviceversion.yaml"))
	if csv["apiVersion"] != "operators.coreos.com/v1alpha1" || csv["kind"] != "ClusterServiceVersion" {
		t.Fatalf("not a CSV: %v %v", csv["apiVersion"], csv["kind"])
	}
	for _, p := range [][]string{
		{"metadata", "name"}, {"spec", "displayName"}, {"spec", "description"}, {"spec", "version"},
		{"spec", "provider", "name"}, {"spec", "install", "strategy"}, {"spec", "minKubeVersion"},
		{"metadata", "annotations", "alm-examples"}, {"metadata", "annotations", "containerImage"},
	} {
		if v, _ := get(csv, p...).(string); v == "" {
			t.Errorf("CSV lacks %s", strings.Join(p, "."))
		}
	}
	if !strings.HasSuffix(get(csv, "metadata", "name").(string), ".v"+get(csv, "spec", "version").(string)) {
		t.Errorf("CSV name %v does not end in .v<version>", get(csv, "metadata", "name"))
	}
	var examples []map[string]any
	if err := json.Unmarshal([]byte(get(csv, "metadata", "annotations", "alm-examples").(string)), &examples); err != nil || len(examples) != 2 {
		t.Errorf("alm-examples must be a JSON list of both kinds: %v", err)
	}
	modes := map[string]bool{}
	for _, m := range get(csv, "spec", "installModes").([]any) {
		mm := m.(map[string]any)
		modes[mm["type"].(string)] = mm["supported"].(bool)
	}
	if len(modes) != 4 || !modes["AllNamespaces"] {
		t.Errorf("installModes must list all four types and support AllNamespaces: %v", modes)
	}
	if get(csv, "spec", "install", "strategy") != "deployment" {
		t.Error("install strategy must be deployment")
	}
	deps, _ := get(csv, "spec", "install", "spec", "deployments").([]any)
	if len(deps) != 1 || get(deps[0].(map[string]any), "name") == "" || get(deps[0].(map[string]any), "spec", "template", "spec", "containers") == nil {
		t.Fatalf("install strategy needs the manager deployment: %v", deps)
	}
	if args := strings.Join(toStrings(get(deps[0].(map[string]any), "spec", "template", "spec", "containers").([]any)[0].(map[string]any)["args"]), " "); !strings.Contains(args, "--webhook-self-signed=false") {
		t.Errorf("under OLM the webhook certificate comes from OLM: args %s", args)
	}
	cp, _ := get(csv, "spec", "install", "spec", "clusterPermissions").([]any)
	if len(cp) != 1 || get(cp[0].(map[string]any), "serviceAccountName") == "" {
		t.Fatalf("clusterPermissions: %v", cp)
	}
	if !strings.Contains(mustJSON(t, cp), `"secrets"`) || !strings.Contains(mustJSON(t, cp), `"ambientmeshes"`) {
		t.Error("clusterPermissions do not carry the manager role from config/rbac")
	}
	if p, _ := get(csv, "spec", "install", "spec", "permissions").([]any); len(p) != 1 {
		t.Errorf("permissions (leader election) missing: %v", p)
	}

	// Owned CRDs are exactly the bundle's CRD files, which equal config/crd.
	owned, _ := get(csv, "spec", "customresourcedefinitions", "owned").([]any)
	bases, _ := filepath.Glob(filepath.Join(root, "config/crd/bases/*.yaml"))
	if len(owned) != len(bases) || len(bases) == 0 {
		t.Fatalf("owned CRDs %d, config/crd has %d", len(owned), len(bases))
	}
	for _, o := range owned {
		om := o.(map[string]any)
		for _, k := range []string{"name", "version", "kind", "displayName", "description"} {
			if s, _ := om[k].(string); s == "" {
				t.Errorf("owned CRD %v lacks %s", om["name"], k)
			}
		}
	}
	for _, base := range bases {
		want := readYAML(t, base)
		got := readYAML(t, filepath.Join(root, "bundle/manifests", filepath.Base(base)))
		// Kustomize adds the part-of label; the definition itself must be identical.
		for _, p := range [][]string{{"spec"}, {"metadata", "name"}, {"metadata", "annotations"}} {
			if !reflect.DeepEqual(get(want, p...), get(got, p...)) {
				t.Errorf("bundle CRD %s: %s differs from config/crd: run make bundle", filepath.Base(base), strings.Join(p, "."))
			}
		}
	}

	// Webhooks: one definition per webhook of config/webhook, same paths.
	vwc := readYAML(t, filepath.Join(root, "config/webhook/manifests.yaml"))
	defs, _ := get(csv, "spec", "webhookdefinitions").([]any)
	whs, _ := vwc["webhooks"].([]any)
	if len(defs) != len(whs) {
		t.Fatalf("webhookdefinitions %d, config/webhook %d", len(defs), len(whs))
	}
	for i, d := range defs {
		dm := d.(map[string]any)
		if dm["type"] != "ValidatingAdmissionWebhook" || dm["webhookPath"] != get(whs[i].(map[string]any), "clientConfig", "service", "path") || dm["deploymentName"] != get(deps[0].(map[string]any), "name") {
			t.Errorf("webhook definition %d: %v", i, dm)
		}
	}

	ann := readYAML(t, filepath.Join(root, "bundle/metadata/annotations.yaml"))
	for k, v := range bundleAnnotations() {
		if get(ann, "annotations", k) != v {
			t.Errorf("annotations.yaml %s = %v, want %s", k, get(ann, "annotations", k), v)
		}
	}
	df, err := os.ReadFile(filepath.Join(root, "bundle.Dockerfile"))
	if err != nil || !strings.Contains(string(df), "COPY bundle/manifests /manifests/") {
		t.Errorf("bundle.Dockerfile: %v", err)
	}
}

// TestBundleIsCurrent regenerates the bundle and compares it with the
// committed one (what `make gen-check` enforces).
func TestBundleIsCurrent(t *testing.T) {
	kustomize, err := filepath.Abs(filepath.Join(root, "bin/kustomize"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(kustomize); err != nil {
		t.Skip("bin/kustomize not built (make tools)")
	}
	out := t.TempDir()
	cmd := exec.Command("go", "run", ".", "-kustomize", kustomize, "-input", filepath.Join(root, "config/manifests"), "-out", out)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("generate: %v\n%s", err, b)
	}
	files, _ := filepath.Glob(filepath.Join(out, "bundle/*/*"))
	if len(files) == 0 {
		t.Fatal("nothing generated")
	}
	for _, f := range files {
		rel, _ := filepath.Rel(out, f)
		got, _ := os.ReadFile(f)
		want, err := os.ReadFile(filepath.Join(root, rel))
		if err != nil || string(got) != string(want) {
			t.Errorf("%s is stale: run make bundle", rel)
		}
	}
}

func toStrings(v any) []string {
	var out []string
	for _, x := range v.([]any) {
		out = append(out, x.(string))
	}
	return out
}

func mustJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// A release bundle (-images images.json) names every image by digest: the
// manager container, containerImage, RELATED_IMAGE_* for each component
// the operator deploys (what OLM rewrites when mirroring) and
// spec.relatedImages. The development bundle names them by tag, with the
// same variables.
func TestReleaseBundlePinsDigests(t *testing.T) {
	kustomize, _ := filepath.Abs(filepath.Join(root, "bin/kustomize"))
	if _, err := os.Stat(kustomize); err != nil {
		t.Skip("bin/kustomize not built (make tools)")
	}
	dir := t.TempDir()
	digest := func(c byte) string { return "sha256:" + strings.Repeat(string(c), 64) }
	built := []pin.Built{{Name: "manager", Repository: "reg.example/mesh/manager", Digest: digest('0')}}
	want := map[string]string{"manager": "reg.example/mesh/manager@" + digest('0')}
	for i, n := range controllers.DeployedComponents {
		b := pin.Built{Name: n, Repository: "reg.example/mesh/" + n, Digest: digest("abcd"[i])}
		built = append(built, b)
		want[n] = b.Ref()
	}
	data, _ := json.Marshal(built)
	images := filepath.Join(dir, "images.json")
	if err := os.WriteFile(images, data, 0o644); err != nil {
		t.Fatal(err)
	}
	o := options{Version: "9.9.9", Image: "ignored/manager:tag", Kustomize: kustomize, Input: filepath.Join(root, "config/manifests"), OutDir: dir, ImagesFile: images}
	if err := run(o); err != nil {
		t.Fatal(err)
	}
	csv := readYAML(t, filepath.Join(dir, "bundle/manifests/ambient-operator.clusterserviceversion.yaml"))
	if bad := pin.Unpinned(csv); len(bad) > 0 {
		t.Errorf("CSV names images by tag: %v", bad)
	}
	if get(csv, "metadata", "annotations", "containerImage") != want["manager"] {
		t.Errorf("containerImage %v", get(csv, "metadata", "annotations", "containerImage"))
	}
	related := map[string]string{}
	for _, r := range get(csv, "spec", "relatedImages").([]any) {
		related[r.(map[string]any)["name"].(string)] = r.(map[string]any)["image"].(string)
	}
	deps := get(csv, "spec", "install", "spec", "deployments").([]any)
	c := get(deps[0].(map[string]any), "spec", "template", "spec", "containers").([]any)[0].(map[string]any)
	env := map[string]string{}
	for _, e := range c["env"].([]any) {
		if v, ok := e.(map[string]any)["value"].(string); ok {
			env[e.(map[string]any)["name"].(string)] = v
		}
	}
	if c["image"] != want["manager"] || related["manager"] != want["manager"] {
		t.Errorf("manager image %v, related %v", c["image"], related["manager"])
	}
	for _, n := range controllers.DeployedComponents {
		if env[controllers.RelatedImageEnv(n)] != want[n] || related[n] != want[n] {
			t.Errorf("%s: env %q related %q, want %q", n, env[controllers.RelatedImageEnv(n)], related[n], want[n])
		}
	}
}

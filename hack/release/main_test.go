package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/random"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"

	"github.com/ambientmesh/ambient/controllers"
	"github.com/ambientmesh/ambient/hack/pin"
)

const root = "../.."

// fixture writes an OCI layout with one index per component and an
// images.json naming them (what make images leaves in bin/images).
func fixture(t *testing.T, names []string) (string, map[string]string) {
	t.Helper()
	dir := t.TempDir()
	p, err := layout.Write(filepath.Join(dir, "oci"), empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	var built []pin.Built
	want := map[string]string{}
	for _, n := range names {
		idx, err := random.Index(64, 1, 2)
		if err != nil {
			t.Fatal(err)
		}
		if err := p.AppendIndex(idx); err != nil {
			t.Fatal(err)
		}
		d, _ := idx.Digest()
		b := pin.Built{Name: n, Repository: "registry.example/mesh/" + n, Tag: "v1", Digest: d.String()}
		built = append(built, b)
		want[n] = b.Ref()
	}
	data, _ := json.Marshal(built)
	if err := os.WriteFile(filepath.Join(dir, "images.json"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	return dir, want
}

func testOptions(t *testing.T, dir string) options {
	kustomize, _ := filepath.Abs(filepath.Join(root, "bin/kustomize"))
	if _, err := os.Stat(kustomize); err != nil {
		t.Skip("needs bin/kustomize (make tools)")
	}
	return options{images: filepath.Join(dir, "images.json"), layout: filepath.Join(dir, "oci"), kustomize: kustomize,
		input: filepath.Join(root, "config/default"), out: filepath.Join(dir, "dist/install.yaml")}
}

// The release manifest names every image by digest, each the digest of
// the built index: the manager's container and RELATED_IMAGE_* for every
// component the operator deploys. Before, dist/install.yaml (make
// build-installer) named the manager by tag and no component at all.
func TestReleaseInstallPinnedToDigests(t *testing.T) {
	dir, want := fixture(t, append([]string{"manager", "ambientctl"}, controllers.DeployedComponents...))
	o := testOptions(t, dir)
	if err := run(o); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(o.out)
	if err != nil {
		t.Fatal(err)
	}
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(data), 4096)
	seen := map[string]string{}
	objects := 0
	for {
		obj := map[string]any{}
		if err := dec.Decode(&obj); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		objects++
		if bad := pin.Unpinned(obj); len(bad) > 0 {
			t.Errorf("%v names images by tag: %v", obj["kind"], bad)
		}
		if obj["kind"] != "Deployment" {
			continue
		}
		c := obj["spec"].(map[string]any)["template"].(map[string]any)["spec"].(map[string]any)["containers"].([]any)[0].(map[string]any)
		seen["manager"] = c["image"].(string)
		for _, e := range c["env"].([]any) {
			em := e.(map[string]any)
			for _, n := range controllers.DeployedComponents {
				if em["name"] == controllers.RelatedImageEnv(n) {
					seen[n] = em["value"].(string)
				}
			}
		}
	}
	if objects < 10 {
		t.Fatalf("only %d objects rendered", objects)
	}
	for _, n := range append([]string{"manager"}, controllers.DeployedComponents...) {
		if seen[n] != want[n] || !strings.Contains(seen[n], "@sha256:") {
			t.Errorf("%s: install.yaml has %q, built %q", n, seen[n], want[n])
		}
	}
}

// A digest that is not in the built layout, or a component images.json
// lacks, is refused rather than written.
func TestReleaseRefusesWhatWasNotBuilt(t *testing.T) {
	dir, _ := fixture(t, append([]string{"manager"}, controllers.DeployedComponents...))
	o := testOptions(t, dir)
	other, _ := fixture(t, []string{"manager"})
	o.layout = filepath.Join(other, "oci")
	if err := run(o); err == nil || !strings.Contains(err.Error(), "is not an image index") {
		t.Fatalf("digests outside the layout: %v", err)
	}
	dir, _ = fixture(t, []string{"manager", "ztunnel"})
	if err := run(testOptions(t, dir)); err == nil || !strings.Contains(err.Error(), "no digest for ambient-cni") {
		t.Fatalf("missing component: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "dist/install.yaml")); err == nil {
		t.Fatal("install.yaml written despite the error")
	}
}

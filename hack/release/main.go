// Command release writes dist/install.yaml for a release: the operator's
// manifests (kustomize build config/default) with the manager's image and
// RELATED_IMAGE_* for every component it deploys pinned to the digests
// `make images` recorded, refusing any image named by tag, and checking
// each pinned digest is an index of the built OCI layout.
package main

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/yaml"

	"github.com/ambientmesh/ambient/hack/kustomize"
	"github.com/ambientmesh/ambient/hack/pin"
)

type options struct {
	images, kustomize, input, out, layout string
}

func main() {
	o := options{}
	flag.StringVar(&o.images, "images", "bin/images/images.json", "images.json of make images")
	flag.StringVar(&o.layout, "layout", "", "OCI layout the digests must be in (default: oci/ next to -images)")
	flag.StringVar(&o.kustomize, "kustomize", "bin/kustomize", "kustomize binary")
	flag.StringVar(&o.input, "input", "config/default", "kustomize directory to render")
	flag.StringVar(&o.out, "out", "dist/install.yaml", "file to write")
	flag.Parse()
	if o.layout == "" {
		o.layout = filepath.Join(filepath.Dir(o.images), "oci")
	}
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "release:", err)
		os.Exit(1)
	}
}

func run(o options) error {
	images, err := pin.FromFile(o.images)
	if err != nil {
		return err
	}
	objs, err := kustomize.Build(o.kustomize, o.input)
	if err != nil {
		return err
	}
	out, err := render(objs, images)
	if err != nil {
		return err
	}
	if err := inLayout(out, o.layout); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(o.out), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(o.out, out, 0o644); err != nil {
		return err
	}
	fmt.Printf("wrote %s (manager %s)\n", o.out, images.Manager)
	return nil
}

// render pins the operator's Deployment and refuses the result if any
// image in it is still named by tag.
func render(objs []*unstructured.Unstructured, images pin.Images) ([]byte, error) {
	var docs [][]byte
	pinned := 0
	for _, u := range objs {
		obj := u.Object
		if obj["kind"] == "Deployment" {
			spec, _ := obj["spec"].(map[string]any)
			if err := images.SetOnDeployment(spec); err != nil {
				return nil, err
			}
			pinned++
		}
		if bad := pin.Unpinned(obj); len(bad) > 0 {
			return nil, fmt.Errorf("%s %s names images by tag: %s", u.GetKind(), u.GetName(), strings.Join(bad, ", "))
		}
		b, err := yaml.Marshal(obj)
		if err != nil {
			return nil, err
		}
		docs = append(docs, b)
	}
	if pinned != 1 {
		return nil, fmt.Errorf("want one operator Deployment, found %d", pinned)
	}
	return bytes.Join(docs, []byte("---\n")), nil
}

var digestIn = regexp.MustCompile(`@(sha256:[0-9a-f]{64})`)

// inLayout checks every digest the manifest names is an index the build
// wrote: a release never points at something not built.
func inLayout(manifest []byte, dir string) error {
	idx, err := layout.ImageIndexFromPath(dir)
	if err != nil {
		return err
	}
	m, err := idx.IndexManifest()
	if err != nil {
		return err
	}
	have := map[v1.Hash]bool{}
	for _, d := range m.Manifests {
		have[d.Digest] = true
	}
	for _, match := range digestIn.FindAllSubmatch(manifest, -1) {
		h, err := v1.NewHash(string(match[1]))
		if err != nil {
			return err
		}
		if !have[h] {
			return fmt.Errorf("%s is not an image index in %s", h, dir)
		}
	}
	return nil
}

// Package pin is how a release names images: the digests `make images`
// recorded in images.json, set on the operator's Deployment (its own image
// and RELATED_IMAGE_* for the components it deploys), and the check that a
// rendered manifest names images only by digest.
package pin

import (
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"regexp"
	"slices"
	"sort"
	"strings"

	"github.com/ambientmesh/ambient/controllers"
)

// Built is one component's image as images.json records it (hack/images
// writes it): the index digest a release pins and each platform's
// manifest digest.
type Built struct {
	Name       string            `json:"name"`
	Repository string            `json:"repository"`
	Tag        string            `json:"tag"`
	Digest     string            `json:"digest"`
	Platforms  map[string]string `json:"platforms"`
}

// Ref is the image by digest.
func (b Built) Ref() string { return b.Repository + "@" + b.Digest }

// Images are the operator's image and its components' (cmd name → image).
type Images struct {
	Manager    string
	Components map[string]string
}

// FromTag names every image <registry>/<name>:<tag> after the manager's
// image (a development bundle).
func FromTag(manager string) Images {
	repo, tag := manager, "latest"
	if i := strings.LastIndex(manager, ":"); i > strings.LastIndex(manager, "/") {
		repo, tag = manager[:i], manager[i+1:]
	}
	registry := repo[:strings.LastIndex(repo, "/")+1]
	im := Images{Manager: manager, Components: map[string]string{}}
	for _, c := range controllers.DeployedComponents {
		im.Components[c] = registry + c + ":" + tag
	}
	return im
}

// FromFile names every image by the digest images.json records; each
// deployed component and the manager must be there.
func FromFile(path string) (Images, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return Images{}, fmt.Errorf("%w (run make images)", err)
	}
	var built []Built
	if err := json.Unmarshal(data, &built); err != nil {
		return Images{}, fmt.Errorf("%s: %w", path, err)
	}
	byName := map[string]Built{}
	for _, b := range built {
		byName[b.Name] = b
	}
	im := Images{Components: map[string]string{}}
	for _, n := range append([]string{"manager"}, controllers.DeployedComponents...) {
		b, ok := byName[n]
		if !ok || !digestRef.MatchString(b.Ref()) {
			return Images{}, fmt.Errorf("%s: no digest for %s", path, n)
		}
		if n == "manager" {
			im.Manager = b.Ref()
		} else {
			im.Components[n] = b.Ref()
		}
	}
	return im, nil
}

// SetOnDeployment sets the manager container's image and one
// RELATED_IMAGE_* variable per component (replacing any already there) in
// a Deployment spec.
func (im Images) SetOnDeployment(spec map[string]any) error {
	tmpl, _ := spec["template"].(map[string]any)
	podSpec, _ := tmpl["spec"].(map[string]any)
	containers, _ := podSpec["containers"].([]any)
	for _, c := range containers {
		cm, _ := c.(map[string]any)
		if cm == nil || cm["name"] != "manager" {
			continue
		}
		cm["image"] = im.Manager
		var env []any
		for _, e := range asList(cm["env"]) {
			if n, _ := e.(map[string]any)["name"].(string); !strings.HasPrefix(n, "RELATED_IMAGE_") {
				env = append(env, e)
			}
		}
		for _, n := range im.names() {
			env = append(env, map[string]any{"name": controllers.RelatedImageEnv(n), "value": im.Components[n]})
		}
		cm["env"] = env
		return nil
	}
	return fmt.Errorf("no manager container in the Deployment")
}

// Related lists the images as a CSV's spec.relatedImages.
func (im Images) Related() []any {
	out := []any{map[string]any{"name": "manager", "image": im.Manager}}
	for _, n := range im.names() {
		out = append(out, map[string]any{"name": n, "image": im.Components[n]})
	}
	return out
}

func (im Images) names() []string {
	names := make([]string, 0, len(im.Components))
	for n := range im.Components {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

var digestRef = regexp.MustCompile(`^[a-z0-9.:/_-]+@sha256:[0-9a-f]{64}$`)

// Unpinned lists every image an object tree names not by digest: "image"
// fields and RELATED_IMAGE_* values.
func Unpinned(obj any) []string {
	var bad []string
	var walk func(any)
	walk = func(v any) {
		switch t := v.(type) {
		case map[string]any:
			if s, ok := t["image"].(string); ok && !digestRef.MatchString(s) {
				bad = append(bad, s)
			}
			if n, _ := t["name"].(string); strings.HasPrefix(n, "RELATED_IMAGE_") {
				if s, _ := t["value"].(string); !digestRef.MatchString(s) {
					bad = append(bad, n+"="+s)
				}
			}
			for _, k := range slices.Sorted(maps.Keys(t)) {
				walk(t[k])
			}
		case []any:
			for _, e := range t {
				walk(e)
			}
		}
	}
	walk(obj)
	return bad
}

func asList(v any) []any {
	l, _ := v.([]any)
	return l
}

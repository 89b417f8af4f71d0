package pin

import (
	"slices"
	"testing"
)

func TestUnpinned(t *testing.T) {
	d := "sha256:" + "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	obj := map[string]any{"spec": map[string]any{"containers": []any{
		map[string]any{"image": "reg.example/a@" + d, "env": []any{
			map[string]any{"name": "RELATED_IMAGE_X", "value": "reg.example/x:v1"},
			map[string]any{"name": "RELATED_IMAGE_Y", "value": "reg.example/y@" + d},
			map[string]any{"name": "OTHER", "value": "not:an-image"},
		}},
		map[string]any{"image": "reg.example/b:v1"},
		map[string]any{"image": "reg.example/c@sha256:short"},
		// A CRD schema property called "image" is not an image.
		map[string]any{"image": map[string]any{"type": "string"}},
	}}}
	got := Unpinned(obj)
	want := []string{"RELATED_IMAGE_X=reg.example/x:v1", "reg.example/b:v1", "reg.example/c@sha256:short"}
	slices.Sort(got)
	if !slices.Equal(got, want) {
		t.Fatalf("Unpinned = %q, want %q", got, want)
	}
}

func TestFromTag(t *testing.T) {
	im := FromTag("reg.example:5000/mesh/manager:v2")
	if im.Components["ztunnel"] != "reg.example:5000/mesh/ztunnel:v2" || im.Components["ambient-cni"] != "reg.example:5000/mesh/ambient-cni:v2" {
		t.Fatalf("components %v", im.Components)
	}
}

package main

import "testing"

// The operator takes component images from RELATED_IMAGE_* (a release's
// digests, or OLM's mirror under disconnected mirroring) unless a flag
// names one. Before, the variables were ignored and the tag built from
// -image-registry was deployed, which a disconnected cluster cannot pull.
func TestComponentImage(t *testing.T) {
	env := map[string]string{
		"RELATED_IMAGE_ZTUNNEL":     "mirror.local/ambient/ztunnel@sha256:1111",
		"RELATED_IMAGE_AMBIENT_CNI": "mirror.local/ambient/ambient-cni@sha256:2222",
	}
	for _, tc := range []struct {
		name, flag, component, want string
	}{
		{"env names the image", "", "ztunnel", "mirror.local/ambient/ztunnel@sha256:1111"},
		{"dashes become underscores", "", "ambient-cni", "mirror.local/ambient/ambient-cni@sha256:2222"},
		{"flag wins over env", "my/ztunnel:1", "ztunnel", "my/ztunnel:1"},
		{"neither: registry and version", "", "waypoint", "reg.example/waypoint:0.1.0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := componentImage(tc.flag, tc.component, "reg.example", "0.1.0", func(k string) string { return env[k] })
			if got != tc.want {
				t.Errorf("componentImage = %q, want %q", got, tc.want)
			}
		})
	}
}

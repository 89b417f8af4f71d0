// Package loggingtest gives the binaries' tests the log levels the API
// accepts, read from the generated CRDs, so a level added to the API is
// tested against every binary without editing the tests.
package loggingtest

import (
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"testing"

	"sigs.k8s.io/yaml"
)

// APILevels returns every value of every `logLevel` enum in the CRDs under
// config/crd/bases.
func APILevels(t testing.TB) []string {
	t.Helper()
	_, file, _, _ := runtime.Caller(0)
	root := filepath.Join(filepath.Dir(file), "../../..")
	crds, err := filepath.Glob(filepath.Join(root, "config/crd/bases/*.yaml"))
	if err != nil || len(crds) == 0 {
		t.Fatalf("no CRDs under %s/config/crd/bases: %v", root, err)
	}
	seen := map[string]bool{}
	for _, f := range crds {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var doc any
		if err := yaml.Unmarshal(b, &doc); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		collect(doc, seen)
	}
	if len(seen) == 0 {
		t.Fatal("no logLevel enum in the CRDs")
	}
	var out []string
	for l := range seen {
		out = append(out, l)
	}
	sort.Strings(out)
	return out
}

// collect walks an OpenAPI schema and records the enum of every property
// named logLevel.
func collect(n any, seen map[string]bool) {
	switch v := n.(type) {
	case map[string]any:
		if props, ok := v["properties"].(map[string]any); ok {
			if ll, ok := props["logLevel"].(map[string]any); ok {
				if enum, ok := ll["enum"].([]any); ok {
					for _, e := range enum {
						if s, ok := e.(string); ok {
							seen[s] = true
						}
					}
				}
			}
		}
		for _, c := range v {
			collect(c, seen)
		}
	case []any:
		for _, c := range v {
			collect(c, seen)
		}
	}
}

// AcceptsAPILevels fails t for every level the CRDs admit that start (a
// binary's logger constructor) refuses: such a level would make the binary
// exit, and its pod crash-loop.
func AcceptsAPILevels(t *testing.T, start func(level string) error) {
	t.Helper()
	levels := APILevels(t)
	for _, l := range levels {
		if err := start(l); err != nil {
			t.Errorf("log level %q: %v", l, err)
		}
	}
	t.Logf("checked %v", levels)
}

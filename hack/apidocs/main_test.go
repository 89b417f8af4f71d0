package main

import (
	"bytes"
	"os"
	"strings"
	"testing"
)

func TestRenderRealAPI(t *testing.T) {
	p, err := load("../../api/v1alpha1")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(p.Roots, ",") != "AmbientMesh,WaypointPolicy" {
		t.Fatalf("roots %v", p.Roots)
	}
	var out bytes.Buffer
	if err := render(&out, p); err != nil {
		t.Fatal(err)
	}
	doc := out.String()
	for _, want := range []string{
		"## AmbientMesh", "scope: Cluster", "## WaypointPolicy", "scope: Namespaced",
		"| `trustDomain` | `string` |", "`cluster.local`", // default marker
		"one of HTTP2, HTTP3", // enum from the field's named type
		"spec.ca.workloadCertTTL must be shorter than spec.ca.rootCertTTL", // type-level CEL
		"[CASpec](#caspec)", "### WaypointPolicyStatus",
	} {
		if !strings.Contains(doc, want) {
			t.Errorf("reference lacks %q", want)
		}
	}
	// The committed reference is current (make generate rewrites it).
	committed, err := os.ReadFile("../../docs/api-reference.md")
	if err != nil {
		t.Fatal(err)
	}
	if string(committed) != doc {
		t.Error("docs/api-reference.md is stale: run make generate")
	}
}

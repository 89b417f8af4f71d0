// Package envcontract holds a binary to the environment the operator gives
// it: every variable the operator sets on the container is read by the
// binary, and the binary reads nothing else but what it declares optional.
package envcontract

import (
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"

	"github.com/ambientmesh/ambient/proxylib/envconfig"
)

// RuntimeEnv are read by the Go runtime itself, not by the binary's code.
var RuntimeEnv = []string{"GOMEMLIMIT", "GOGC", "GOMAXPROCS", "GODEBUG"}

// Check parses c's environment and args with parse (the binary's own flag
// parsing) and fails t on every broken side of the contract. It returns
// the environment the operator set (field references as "fieldRef:<path>").
func Check(t *testing.T, c corev1.Container, parse func(args []string, e *envconfig.Env) error, optional ...string) map[string]string {
	t.Helper()
	set := map[string]string{}
	for _, v := range c.Env {
		set[v.Name] = v.Value
		if v.ValueFrom != nil && v.ValueFrom.FieldRef != nil {
			set[v.Name] = "fieldRef:" + v.ValueFrom.FieldRef.FieldPath
		}
	}
	e := envconfig.FromMap(set)
	if err := parse(c.Args, e); err != nil {
		t.Fatalf("container %s: the operator's environment and args %v: %v", c.Name, c.Args, err)
	}
	read := e.Read()
	for name := range set {
		if !slices.Contains(read, name) && !slices.Contains(RuntimeEnv, name) {
			t.Errorf("the operator sets %s on container %s, which never reads it", name, c.Name)
		}
	}
	for _, name := range read {
		if _, ok := set[name]; !ok && !slices.Contains(optional, name) {
			t.Errorf("container %s reads %s, which the operator does not set and which is not declared optional", c.Name, name)
		}
	}
	return set
}

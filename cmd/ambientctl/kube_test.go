package main

import (
	"os"
	"path/filepath"
	"testing"
)

// The connection flags are kubectl's: --context picks the context, whose
// namespace is the default; -n overrides it; --kubeconfig names the file.
func TestKubeconfigFlagsAsKubectl(t *testing.T) {
	path := filepath.Join(t.TempDir(), "kubeconfig")
	kc := `apiVersion: v1
kind: Config
current-context: a
clusters:
- name: ca
  cluster: {server: "https://127.0.0.1:1"}
- name: cb
  cluster: {server: "https://127.0.0.2:2"}
users:
- name: u
  user: {token: t}
contexts:
- name: a
  context: {cluster: ca, user: u, namespace: ns-a}
- name: b
  context: {cluster: cb, user: u, namespace: ns-b}
- name: nons
  context: {cluster: ca, user: u}
`
	if err := os.WriteFile(path, []byte(kc), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		args           []string
		wantHost, want string
	}{
		{[]string{"--kubeconfig", path, "status"}, "https://127.0.0.1:1", "ns-a"},
		{[]string{"status", "--kubeconfig", path, "--context", "b"}, "https://127.0.0.2:2", "ns-b"},
		{[]string{"--kubeconfig", path, "--context", "b", "-n", "x", "status"}, "https://127.0.0.2:2", "x"},
		{[]string{"--kubeconfig=" + path, "--context=nons", "status"}, "https://127.0.0.1:1", "default"},
		{[]string{"--kubeconfig", path, "--cluster", "cb", "status"}, "https://127.0.0.2:2", "ns-a"},
		{[]string{"--kubeconfig", path, "--server", "https://127.0.0.3:3", "status"}, "https://127.0.0.3:3", "ns-a"},
	}
	for _, tt := range tests {
		inv, err := parseArgs(tt.args)
		if err != nil {
			t.Fatalf("%q: %v", tt.args, err)
		}
		k, err := newKube(inv.opts)
		if err != nil {
			t.Fatalf("%q: %v", tt.args, err)
		}
		if k.cfg.Host != tt.wantHost || k.namespace != tt.want {
			t.Errorf("%q: host %s namespace %s, want %s %s", tt.args, k.cfg.Host, k.namespace, tt.wantHost, tt.want)
		}
	}
	inv, err := parseArgs([]string{"--kubeconfig", path, "--context", "nosuch", "status"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := newKube(inv.opts); err == nil {
		t.Error("unknown --context: no error")
	}
	// kubectl's --cache-dir would do nothing here: refused, not ignored.
	if _, err := parseArgs([]string{"--cache-dir", t.TempDir(), "status"}); err == nil {
		t.Error("--cache-dir accepted though nothing uses it")
	}
}

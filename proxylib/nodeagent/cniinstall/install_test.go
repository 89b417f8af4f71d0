package cniinstall

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
)

const bridgeList = `{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"bridge","bridge":"cni0"},{"type":"portmap","capabilities":{"portMappings":true}}]}`
const bridgeConf = `{"cniVersion":"0.4.0","name":"k8s","type":"bridge","bridge":"cni0"}`

func plugins(t *testing.T, path string) []string {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var c struct {
		Plugins []map[string]any `json:"plugins"`
	}
	if err := json.Unmarshal(b, &c); err != nil {
		t.Fatal(err)
	}
	var types []string
	for _, p := range c.Plugins {
		types = append(types, p["type"].(string))
	}
	return types
}

func TestInstallConfig(t *testing.T) {
	tests := []struct {
		name     string
		files    map[string]string
		wantFile string
		want     []string
	}{
		{"conflist gets ambient last", map[string]string{"10-k8s.conflist": bridgeList, "99-other.conflist": bridgeList}, "10-k8s.conflist", []string{"bridge", "portmap", PluginType}},
		{"single conf becomes conflist", map[string]string{"10-k8s.conf": bridgeConf}, "10-k8s.conflist", []string{"bridge", PluginType}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			for n, c := range tc.files {
				os.WriteFile(filepath.Join(dir, n), []byte(c), 0o644)
			}
			plugin := map[string]any{"agentSocket": "/var/run/ambient/cni.sock"}
			changed, err := InstallConfig(dir, plugin)
			if err != nil || !changed {
				t.Fatalf("install: changed=%v err=%v", changed, err)
			}
			got := plugins(t, filepath.Join(dir, tc.wantFile))
			if len(got) != len(tc.want) {
				t.Fatalf("plugins %v, want %v", got, tc.want)
			}
			for i := range got {
				if got[i] != tc.want[i] {
					t.Fatalf("plugins %v, want %v", got, tc.want)
				}
			}
			if changed, err := InstallConfig(dir, plugin); err != nil || changed {
				t.Fatalf("second install changed=%v err=%v, want a no-op", changed, err)
			}
			plugin["meshNamespace"] = "x"
			if changed, _ := InstallConfig(dir, plugin); !changed {
				t.Fatal("new settings not written")
			}
			if got := plugins(t, filepath.Join(dir, tc.wantFile)); len(got) != len(tc.want) {
				t.Fatalf("refresh duplicated the entry: %v", got)
			}
		})
	}
}

func TestInstallConfigWaitsForNetworkPlugin(t *testing.T) {
	if _, err := InstallConfig(t.TempDir(), map[string]any{}); err != ErrNoConfig {
		t.Fatalf("empty dir: %v, want ErrNoConfig", err)
	}
}

func TestInstallBinary(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	os.WriteFile(src, []byte("#!/bin/sh\n"), 0o600)
	bin := t.TempDir()
	if err := InstallBinary(src, bin); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(filepath.Join(bin, PluginType))
	if err != nil || st.Mode().Perm() != 0o755 {
		t.Fatalf("installed binary: %v %v", st, err)
	}
}

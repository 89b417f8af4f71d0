package nodeagent

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/go-logr/logr"

	"github.com/ambientmesh/ambient/proxylib/nodeagent/cniinstall"
)

const flannelConflist = `{"name":"cbr0","cniVersion":"0.3.1","plugins":[{"type":"flannel","delegate":{"hairpinMode":true}},{"type":"portmap","capabilities":{"portMappings":true}}]}`

func chainOf(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var c struct{ Plugins []struct{ Type string } }
	if err := json.Unmarshal(b, &c); err != nil {
		t.Fatal(err)
	}
	var types []string
	for _, p := range c.Plugins {
		types = append(types, p.Type)
	}
	return types
}

// TestInstallCNIOnceUnderHostRoot: on a host file system laid out as k3s,
// an agent with CNI_HOST_ROOT and no directories finds k3s' directories,
// installs the binary and chains in; after flannel rewrites its conflist
// the next pass chains in again; a k3s upgrade moving data/current gets the
// binary too.
func TestInstallCNIOnceUnderHostRoot(t *testing.T) {
	root := t.TempDir()
	for _, d := range []string{"etc/cni/net.d", "opt/cni/bin", "var/lib/rancher/k3s/agent/etc/cni/net.d", "var/lib/rancher/k3s/data/v1/bin", "var/lib/rancher/k3s/data/v2/bin"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	current := filepath.Join(root, "var/lib/rancher/k3s/data/current")
	if err := os.Symlink("/var/lib/rancher/k3s/data/v1", current); err != nil {
		t.Fatal(err)
	}
	exe := filepath.Join(t.TempDir(), "agent")
	if err := os.WriteFile(exe, []byte("#!/bin/true\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	o := Options{CNIHostRoot: root, PluginConf: map[string]any{"agentSocket": "/var/run/ambient/cni.sock"}, Log: logr.Discard()}

	if ok, _ := installCNIOnce(o, exe, ""); ok {
		t.Fatal("installed before the network plugin wrote any configuration")
	}
	conf := filepath.Join(root, "var/lib/rancher/k3s/agent/etc/cni/net.d/10-flannel.conflist")
	if err := os.WriteFile(conf, []byte(flannelConflist), 0o644); err != nil {
		t.Fatal(err)
	}
	ok, bin := installCNIOnce(o, exe, "")
	if !ok || bin != filepath.Join(root, "var/lib/rancher/k3s/data/v1/bin") {
		t.Fatalf("installCNIOnce = %v, %s", ok, bin)
	}
	if _, err := os.Stat(filepath.Join(bin, cniinstall.PluginType)); err != nil {
		t.Fatal(err)
	}
	if got := chainOf(t, conf); !slices.Equal(got, []string{"flannel", "portmap", cniinstall.PluginType}) {
		t.Fatalf("chain %v", got)
	}
	if _, err := os.Stat(filepath.Join(root, "opt/cni/bin", cniinstall.PluginType)); err == nil {
		t.Fatal("binary also put in the standard directory")
	}

	// flannel restarts and rewrites its file without us.
	if err := os.WriteFile(conf, []byte(flannelConflist), 0o644); err != nil {
		t.Fatal(err)
	}
	if ok, _ := installCNIOnce(o, exe, bin); !ok || !slices.Contains(chainOf(t, conf), cniinstall.PluginType) {
		t.Fatalf("not chained in again after the rewrite: %v", chainOf(t, conf))
	}

	// k3s upgrade: data/current now points at v2.
	if err := os.Remove(current); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/var/lib/rancher/k3s/data/v2", current); err != nil {
		t.Fatal(err)
	}
	if ok, bin2 := installCNIOnce(o, exe, bin); !ok || bin2 != filepath.Join(root, "var/lib/rancher/k3s/data/v2/bin") {
		t.Fatalf("after the upgrade: %v %s", ok, bin2)
	}
	if _, err := os.Stat(filepath.Join(root, "var/lib/rancher/k3s/data/v2/bin", cniinstall.PluginType)); err != nil {
		t.Fatal(err)
	}
}

// TestCNIDirsExplicitUnderHostRoot: directories given (the mesh's confDir,
// binDir or a fixed platform) are host paths under the root, not detected.
func TestCNIDirsExplicitUnderHostRoot(t *testing.T) {
	root := t.TempDir()
	tests := []struct {
		name              string
		o                 Options
		wantConf, wantBin string
		wantErr           bool
	}{
		{"no root: paths as given", Options{CNIConfDir: "/host/etc/cni/net.d", CNIBinDir: "/host/opt/cni/bin"}, "/host/etc/cni/net.d", "/host/opt/cni/bin", false},
		{"root with both given", Options{CNIHostRoot: root, CNIConfDir: "/etc/kubernetes/cni/net.d", CNIBinDir: "/var/lib/cni/bin"},
			filepath.Join(root, "etc/kubernetes/cni/net.d"), filepath.Join(root, "var/lib/cni/bin"), false},
		{"root, nothing to detect", Options{CNIHostRoot: root}, "", "", true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			conf, bin, err := tc.o.cniDirs()
			if (err != nil) != tc.wantErr || conf != tc.wantConf || bin != tc.wantBin {
				t.Fatalf("cniDirs = %s, %s, %v", conf, bin, err)
			}
		})
	}
}

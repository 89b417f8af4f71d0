package cniinstall

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// hostFS lays out a fake host root: files (path -> content), dirs, and
// symlinks (path -> target, absolute targets meaning host paths).
type hostFS struct {
	files    map[string]string
	dirs     []string
	symlinks map[string]string
}

func (h hostFS) build(t *testing.T) string {
	t.Helper()
	root := t.TempDir()
	for _, d := range h.dirs {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for p, c := range h.files {
		if err := os.MkdirAll(filepath.Dir(filepath.Join(root, p)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(root, p), []byte(c), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for p, target := range h.symlinks {
		if err := os.MkdirAll(filepath.Dir(filepath.Join(root, p)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(target, filepath.Join(root, p)); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

const flannelList = `{"name":"cbr0","cniVersion":"0.3.1","plugins":[{"type":"flannel","delegate":{"hairpinMode":true}},{"type":"portmap","capabilities":{"portMappings":true}}]}`

func TestDetect(t *testing.T) {
	tests := []struct {
		name     string
		host     hostFS
		want     string // platform; "" = ErrNoConfig
		wantConf string // resolved under root
		wantBin  string // resolved under root
	}{
		{"standard", hostFS{files: map[string]string{"/etc/cni/net.d/10-flannel.conflist": flannelList}, dirs: []string{"/opt/cni/bin"}},
			"standard", "/etc/cni/net.d", "/opt/cni/bin"},
		{"nothing written yet", hostFS{dirs: []string{"/etc/cni/net.d", "/opt/cni/bin"}}, "", "", ""},
		{"k3s with an empty /etc/cni/net.d; current is an absolute symlink", hostFS{
			files:    map[string]string{"/var/lib/rancher/k3s/agent/etc/cni/net.d/10-flannel.conflist": flannelList},
			dirs:     []string{"/etc/cni/net.d", "/opt/cni/bin", "/var/lib/rancher/k3s/data/abc123/bin"},
			symlinks: map[string]string{"/var/lib/rancher/k3s/data/current": "/var/lib/rancher/k3s/data/abc123"}},
			"k3s", "/var/lib/rancher/k3s/agent/etc/cni/net.d", "/var/lib/rancher/k3s/data/abc123/bin"},
		{"microk8s; current is a relative symlink", hostFS{
			files:    map[string]string{"/var/snap/microk8s/7589/args/cni-network/10-calico.conflist": bridgeList},
			dirs:     []string{"/var/snap/microk8s/7589/opt/cni/bin"},
			symlinks: map[string]string{"/var/snap/microk8s/current": "7589"}},
			"microk8s", "/var/snap/microk8s/7589/args/cni-network", "/var/snap/microk8s/7589/opt/cni/bin"},
		{"openshift: multus in /etc/kubernetes/cni/net.d, plugins in /var/lib/cni/bin", hostFS{
			files: map[string]string{
				"/etc/kubernetes/cni/net.d/00-multus.conf":        `{"cniVersion":"0.3.1","name":"multus-cni-network","type":"multus-shim"}`,
				"/run/multus/cni/net.d/10-ovn-kubernetes.conf":    `{"cniVersion":"0.4.0","name":"ovn-kubernetes","type":"ovn-k8s-cni-overlay"}`,
				"/etc/cni/net.d/87-podman-bridge.conflist":        bridgeList,
				"/var/lib/cni/bin/.keep":                          "",
				"/etc/kubernetes/cni/net.d/whereabouts.d/.keep":   "",
				"/etc/kubernetes/cni/net.d/README-not-config.txt": "",
			},
			dirs: []string{"/opt/cni/bin"}},
			"openshift", "/etc/kubernetes/cni/net.d", "/var/lib/cni/bin"},
		{"config but no binary dir is not a layout", hostFS{files: map[string]string{"/var/lib/rancher/k3s/agent/etc/cni/net.d/10-flannel.conflist": flannelList}},
			"", "", ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			root := tc.host.build(t)
			l, err := Detect(root)
			if tc.want == "" {
				if !errors.Is(err, ErrNoConfig) {
					t.Fatalf("Detect = %+v, %v; want ErrNoConfig", l, err)
				}
				return
			}
			if err != nil || l.Platform != tc.want {
				t.Fatalf("Detect = %+v, %v; want %s %s", l, err, tc.want, tc.wantConf)
			}
			bin, err := InRoot(root, l.BinDir)
			if err != nil || bin != filepath.Join(root, tc.wantBin) {
				t.Fatalf("bin dir %s (%v), want %s", bin, err, filepath.Join(root, tc.wantBin))
			}
			conf, _ := InRoot(root, l.ConfDir)
			if conf != filepath.Join(root, tc.wantConf) {
				t.Fatalf("conf dir %s, want %s", conf, filepath.Join(root, tc.wantConf))
			}
		})
	}
}

func TestInRootStaysInRoot(t *testing.T) {
	root := hostFS{dirs: []string{"/etc"}, symlinks: map[string]string{"/etc/escape": "../../../../../tmp", "/etc/loop": "/etc/loop"}}.build(t)
	got, err := InRoot(root, "/etc/escape/x")
	if err != nil || got != filepath.Join(root, "tmp/x") {
		t.Fatalf("InRoot = %s, %v; want %s", got, err, filepath.Join(root, "tmp/x"))
	}
	if _, err := InRoot(root, "/etc/loop/x"); err == nil {
		t.Fatal("a symlink loop must be an error")
	}
	if _, err := InRoot(root, "relative/path"); err == nil {
		t.Fatal("a relative host path must be an error")
	}
}

func TestInstallConfigMultus(t *testing.T) {
	const thin = `{"cniVersion":"0.3.1","name":"multus-cni-network","type":"multus","kubeconfig":"/etc/cni/net.d/multus.d/multus.kubeconfig",
	  "delegates":[{"cniVersion":"0.3.1","name":"cbr0","plugins":[{"type":"flannel"},{"type":"portmap"}]}]}`
	const thinSingle = `{"cniVersion":"0.3.1","name":"multus-cni-network","type":"multus","delegates":[{"cniVersion":"0.3.1","name":"k8s","type":"bridge"}]}`
	const shim = `{"cniVersion":"0.3.1","name":"multus-cni-network","type":"multus-shim","socketDir":"/host/run/multus/"}`
	tests := []struct {
		name     string
		host     hostFS
		confDir  string
		wantFile string // host path whose plugin types are checked
		want     []string
		delegate bool // the chain is multus' inline delegates[0]
	}{
		{"thin multus: inline delegate list", hostFS{files: map[string]string{"/etc/cni/net.d/00-multus.conf": thin, "/etc/cni/net.d/10-flannel.conflist": flannelList}},
			"/etc/cni/net.d", "/etc/cni/net.d/00-multus.conf", []string{"flannel", "portmap", PluginType}, true},
		{"thin multus: inline single delegate becomes a list", hostFS{files: map[string]string{"/etc/cni/net.d/00-multus.conf": thinSingle}},
			"/etc/cni/net.d", "/etc/cni/net.d/00-multus.conf", []string{"bridge", PluginType}, true},
		{"multus-shim: the next configuration in its directory", hostFS{files: map[string]string{"/etc/cni/net.d/00-multus.conf": shim, "/etc/cni/net.d/10-flannel.conflist": flannelList}},
			"/etc/cni/net.d", "/etc/cni/net.d/10-flannel.conflist", []string{"flannel", "portmap", PluginType}, false},
		{"openshift: multus-shim alone, delegate in /run/multus/cni/net.d (a .conf)", hostFS{files: map[string]string{
			"/etc/kubernetes/cni/net.d/00-multus.conf":     shim,
			"/run/multus/cni/net.d/10-ovn-kubernetes.conf": `{"cniVersion":"0.4.0","name":"ovn-kubernetes","type":"ovn-k8s-cni-overlay"}`}},
			"/etc/kubernetes/cni/net.d", "/run/multus/cni/net.d/10-ovn-kubernetes.conflist", []string{"ovn-k8s-cni-overlay", PluginType}, false},
		{"clusterNetwork as the daemon's /host path", hostFS{files: map[string]string{
			"/etc/cni/net.d/00-multus.conf":           `{"cniVersion":"0.3.1","name":"multus","type":"multus-shim","clusterNetwork":"/host/etc/cni/net.d/20-calico.conflist"}`,
			"/etc/cni/net.d/10-flannel.conflist":      flannelList,
			"/etc/cni/net.d/20-calico.conflist":       `{"cniVersion":"0.3.1","name":"k8s-pod-network","plugins":[{"type":"calico"}]}`,
			"/etc/cni/multus/net.d/99-other.conflist": bridgeList}},
			"/etc/cni/net.d", "/etc/cni/net.d/20-calico.conflist", []string{"calico", PluginType}, false},
		{"clusterNetwork as a network name", hostFS{files: map[string]string{
			"/etc/cni/net.d/00-multus.conf":            `{"cniVersion":"0.3.1","name":"multus","type":"multus","clusterNetwork":"k8s-pod-network"}`,
			"/etc/cni/net.d/10-flannel.conflist":       flannelList,
			"/etc/cni/multus/net.d/20-calico.conflist": `{"cniVersion":"0.3.1","name":"k8s-pod-network","plugins":[{"type":"calico"}]}`}},
			"/etc/cni/net.d", "/etc/cni/multus/net.d/20-calico.conflist", []string{"calico", PluginType}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			root := tc.host.build(t)
			plugin := map[string]any{"agentSocket": "/var/run/ambient/cni.sock"}
			changed, err := InstallConfigIn(root, filepath.Join(root, tc.confDir), plugin)
			if err != nil || !changed {
				t.Fatalf("install: changed=%v err=%v", changed, err)
			}
			types := func() []string {
				if tc.delegate {
					return delegateTypes(t, filepath.Join(root, tc.wantFile))
				}
				return plugins(t, filepath.Join(root, tc.wantFile))
			}
			if got := types(); !slices.Equal(got, tc.want) {
				t.Fatalf("chain %v, want %v", got, tc.want)
			}
			// Multus' own file is never turned into a list.
			if c, err := readConf(filepath.Join(root, tc.confDir, "00-multus.conf")); err != nil || !isMultus(c) || c["plugins"] != nil {
				t.Fatalf("multus config changed shape: %v %v", c, err)
			}
			if changed, err := InstallConfigIn(root, filepath.Join(root, tc.confDir), plugin); err != nil || changed {
				t.Fatalf("second install: changed=%v err=%v (want no change)", changed, err)
			}
			if err := UninstallConfigIn(root, filepath.Join(root, tc.confDir)); err != nil {
				t.Fatal(err)
			}
			if got := types(); slices.Equal(got, tc.want) || len(got) != len(tc.want)-1 {
				t.Fatalf("after uninstall chain %v", got)
			}
		})
	}
}

func delegateTypes(t *testing.T, path string) []string {
	t.Helper()
	c, err := readConf(path)
	if err != nil {
		t.Fatal(err)
	}
	d := c["delegates"].([]any)[0].(map[string]any)
	var types []string
	for _, p := range d["plugins"].([]any) {
		types = append(types, p.(map[string]any)["type"].(string))
	}
	return types
}

package cniinstall

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Layout is where a Kubernetes distribution keeps the CNI network
// configuration its container runtime reads and the plugin binaries, as
// paths on the host.
type Layout struct {
	Platform        string
	ConfDir, BinDir string
}

// KnownLayouts are tried in order by Detect: the distributions' own
// directories first, the standard ones last (a k3s or OpenShift node may
// also have an empty or stale /etc/cni/net.d).
var KnownLayouts = []Layout{
	// OpenShift: multus' configuration, read by CRI-O; plugins in /var/lib/cni/bin.
	{"openshift", "/etc/kubernetes/cni/net.d", "/var/lib/cni/bin"},
	{"k3s", "/var/lib/rancher/k3s/agent/etc/cni/net.d", "/var/lib/rancher/k3s/data/current/bin"},
	{"microk8s", "/var/snap/microk8s/current/args/cni-network", "/var/snap/microk8s/current/opt/cni/bin"},
	{"standard", "/etc/cni/net.d", "/opt/cni/bin"},
}

// Detect returns the first known layout whose configuration directory, on
// the host file system mounted at root, holds a network configuration and
// whose binary directory exists. ErrNoConfig: none has one yet (the
// cluster's network plugin has not started).
func Detect(root string) (Layout, error) {
	for _, l := range KnownLayouts {
		conf, err := InRoot(root, l.ConfDir)
		if err != nil {
			continue
		}
		if _, err := PrimaryConfig(conf); err != nil {
			continue
		}
		if fi, err := statIn(root, l.BinDir); err != nil || !fi.IsDir() {
			continue
		}
		return l, nil
	}
	return Layout{}, ErrNoConfig
}

func statIn(root, hostPath string) (os.FileInfo, error) {
	p, err := InRoot(root, hostPath)
	if err != nil {
		return nil, err
	}
	return os.Stat(p)
}

// InRoot maps a host path to where it is under root (the host's / mounted
// in this container), following symlinks as the host would: an absolute
// target (k3s' data/current) is resolved under root too, never against
// the container's own file system. Components that do not exist yet are
// kept as they are. root "" means this is the host.
func InRoot(root, hostPath string) (string, error) {
	if root == "" || root == "/" {
		return filepath.Clean(hostPath), nil
	}
	if !filepath.IsAbs(hostPath) {
		return "", fmt.Errorf("%q is not an absolute host path", hostPath)
	}
	resolved := "/"
	rest := strings.Split(strings.Trim(filepath.Clean(hostPath), "/"), "/")
	for hops := 0; len(rest) > 0; {
		name := rest[0]
		rest = rest[1:]
		if name == "" || name == "." {
			continue
		}
		if name == ".." {
			resolved = filepath.Dir(resolved)
			continue
		}
		next := filepath.Join(resolved, name)
		target, err := os.Readlink(filepath.Join(root, next))
		switch {
		case err == nil:
			if hops++; hops > 40 {
				return "", fmt.Errorf("%s: too many symlinks", hostPath)
			}
			if !filepath.IsAbs(target) {
				target = filepath.Join(resolved, target)
			}
			resolved = "/"
			rest = append(strings.Split(strings.Trim(filepath.Clean(target), "/"), "/"), rest...)
		case errors.Is(err, os.ErrNotExist):
			// Keep it (and the rest) as written: it may be created later.
			resolved = filepath.Join(append([]string{next}, rest...)...)
			rest = nil
		default: // not a symlink (EINVAL) or unreadable: a plain component
			resolved = next
		}
	}
	return filepath.Join(root, resolved), nil
}

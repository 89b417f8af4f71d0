package cniinstall

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
)

// Multus is the runtime's only configuration on OpenShift and wherever it
// is installed: it calls the cluster network (its delegate) for every pod's
// default interface, then any additional networks. Chaining after multus
// itself would also run our plugin for pods whose default network is not
// the cluster's; chaining into the delegate runs it exactly where the
// cluster network is set up, as a plugin chained there directly would be.

// MultusDelegateDirs are where multus keeps the cluster network it
// delegates to when its own configuration names none: OpenShift's
// (/run/multus/cni/net.d, written by the network operator), then multus'
// own default configuration directory.
var MultusDelegateDirs = []string{"/run/multus/cni/net.d", "/etc/cni/multus/net.d"}

func isMultus(conf map[string]any) bool {
	t, _ := conf["type"].(string)
	return t == "multus" || t == "multus-shim"
}

// chainIntoDelegate: multus (thin plugin) carries the cluster network
// inline as delegates[0]; our plugin is chained into it, in place.
func chainIntoDelegate(path string, conf map[string]any, delegates []any, plugin map[string]any) (bool, error) {
	first, ok := delegates[0].(map[string]any)
	if !ok {
		return false, fmt.Errorf("%s: multus delegates[0] is not an object", path)
	}
	before := normalize(first)
	out, _, _, _ := withPlugin(first, plugin)
	if reflect.DeepEqual(before, normalize(out)) {
		return false, nil
	}
	delegates[0] = out
	conf["delegates"] = delegates
	data, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		return false, err
	}
	return true, writeAtomic(path, data)
}

// multusTarget finds the file of the cluster network a multus-shim
// (thick) or auto-configured multus delegates to: its clusterNetwork (a
// path, with or without the daemon's /host prefix, or a network name),
// else the first other configuration beside it, else the primary one in
// MultusDelegateDirs. Paths are host paths under root.
func multusTarget(root, confDir, self string, conf map[string]any) (string, error) {
	dirs := []string{confDir}
	for _, d := range MultusDelegateDirs {
		if p, err := InRoot(root, d); err == nil {
			dirs = append(dirs, p)
		}
	}
	if cn, _ := conf["clusterNetwork"].(string); cn != "" {
		if filepath.IsAbs(cn) {
			for _, hp := range []string{cn, strings.TrimPrefix(cn, "/host")} {
				if p, err := InRoot(root, hp); err == nil && isFile(p) {
					return p, nil
				}
			}
			return "", fmt.Errorf("multus clusterNetwork %s: no such file on the host", cn)
		}
		for _, d := range dirs {
			if p := configNamed(d, cn, self); p != "" {
				return p, nil
			}
		}
		return "", fmt.Errorf("multus clusterNetwork %q: no network configuration of that name in %v", cn, dirs)
	}
	for _, d := range dirs {
		if p := firstOther(d, self); p != "" {
			return p, nil
		}
	}
	return "", ErrNoConfig
}

func isFile(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.Mode().IsRegular()
}

// configFiles are dir's network configurations in the runtime's order.
func configFiles(dir string) []string {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil
	}
	var out []string
	for _, e := range entries {
		ext := filepath.Ext(e.Name())
		if !e.IsDir() && !strings.HasPrefix(e.Name(), ".") && (ext == ".conflist" || ext == ".conf" || ext == ".json") {
			out = append(out, filepath.Join(dir, e.Name()))
		}
	}
	slices.Sort(out)
	return out
}

// firstOther: the first configuration in dir that is not multus'.
func firstOther(dir, self string) string {
	for _, p := range configFiles(dir) {
		if p == self {
			continue
		}
		if c, err := readConf(p); err == nil && !isMultus(c) {
			return p
		}
	}
	return ""
}

func configNamed(dir, name, self string) string {
	for _, p := range configFiles(dir) {
		if p == self {
			continue
		}
		if c, err := readConf(p); err == nil && c["name"] == name && !isMultus(c) {
			return p
		}
	}
	return ""
}

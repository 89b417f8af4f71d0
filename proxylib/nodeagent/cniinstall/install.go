// Package cniinstall puts the ambient-cni plugin on the host: the binary
// into the CNI bin dir and a chained entry at the end of the cluster's
// primary network configuration (the first file containerd/CRI-O read).
package cniinstall

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
)

// PluginType is the plugin's "type" (its binary name).
const PluginType = "ambient-cni"

// ErrNoConfig means the cluster's network plugin has not written its
// configuration yet.
var ErrNoConfig = errors.New("no CNI network configuration found yet")

// InstallBinary copies src (normally /proc/self/exe) to binDir/ambient-cni
// atomically, so a runtime never executes a half-written file.
func InstallBinary(src, binDir string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	tmp, err := os.CreateTemp(binDir, ".ambient-cni-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := io.Copy(tmp, in); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(0o755); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), filepath.Join(binDir, PluginType))
}

// PrimaryConfig returns the configuration file the runtime uses: the first
// *.conflist / *.conf / *.json in lexical order.
func PrimaryConfig(confDir string) (string, error) {
	if _, err := os.Stat(confDir); err != nil {
		return "", err
	}
	files := configFiles(confDir)
	if len(files) == 0 {
		return "", ErrNoConfig
	}
	return files[0], nil
}

// InstallConfig appends (or refreshes) plugin as the last entry of the
// primary configuration. A single-plugin .conf is rewritten as a .conflist
// of the same base name. It reports whether a file changed.
func InstallConfig(confDir string, plugin map[string]any) (bool, error) {
	return InstallConfigIn("", confDir, plugin)
}

// InstallConfigIn is InstallConfig with the host's file system mounted at
// root (confDir is a path under it). When the primary configuration is
// multus', the plugin is chained into the cluster network multus delegates
// to (see multusTarget), so every pod's default interface goes through it.
func InstallConfigIn(root, confDir string, plugin map[string]any) (bool, error) {
	path, err := PrimaryConfig(confDir)
	if err != nil {
		return false, err
	}
	conf, err := readConf(path)
	if err != nil {
		return false, err
	}
	if !isMultus(conf) {
		return chainInto(path, conf, plugin)
	}
	if ds, ok := conf["delegates"].([]any); ok && len(ds) > 0 {
		return chainIntoDelegate(path, conf, ds, plugin)
	}
	target, err := multusTarget(root, confDir, path, conf)
	if err != nil {
		return false, err
	}
	tconf, err := readConf(target)
	if err != nil {
		return false, err
	}
	return chainInto(target, tconf, plugin)
}

func readConf(path string) (map[string]any, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var conf map[string]any
	if err := json.Unmarshal(raw, &conf); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return conf, nil
}

// withPlugin returns conf as a plugin list ending with plugin (replacing
// an earlier entry of ours), and whether conf was a list already.
func withPlugin(conf, plugin map[string]any) (out map[string]any, list, kept []any, isList bool) {
	plugin = clonePlugin(plugin)
	plugin["type"] = PluginType
	list, isList = conf["plugins"].([]any)
	out = conf
	if !isList { // single plugin config: wrap it
		out = map[string]any{"cniVersion": conf["cniVersion"], "name": conf["name"]}
		list = []any{conf}
	}
	kept = withoutPlugin(list)
	kept = append(kept, plugin)
	out["plugins"] = kept
	return out, list, kept, isList
}

func withoutPlugin(list []any) []any {
	var kept []any
	for _, p := range list {
		if m, ok := p.(map[string]any); ok && m["type"] == PluginType {
			continue
		}
		kept = append(kept, p)
	}
	return kept
}

// chainInto writes conf (read from path) with plugin chained last.
func chainInto(path string, conf, plugin map[string]any) (bool, error) {
	out, list, kept, isList := withPlugin(conf, plugin)
	if isList && reflect.DeepEqual(normalize(list), normalize(kept)) {
		return false, nil
	}
	data, err := json.MarshalIndent(out, "", "  ")
	if err != nil {
		return false, err
	}
	dst := path
	if !isList {
		dst = strings.TrimSuffix(path, filepath.Ext(path)) + ".conflist"
	}
	if err := writeAtomic(dst, data); err != nil {
		return false, err
	}
	if dst != path {
		return true, os.Remove(path)
	}
	return true, nil
}

// normalize round-trips through JSON so typed and decoded values compare.
func normalize(v any) any {
	b, _ := json.Marshal(v)
	var out any
	_ = json.Unmarshal(b, &out)
	return out
}

func clonePlugin(p map[string]any) map[string]any {
	out := make(map[string]any, len(p)+1)
	for k, v := range p {
		out[k] = v
	}
	return out
}

func writeAtomic(path string, data []byte) error {
	tmp := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".tmp")
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// UninstallConfig removes the plugin's entry from every configuration in
// confDir (the mesh is being uninstalled: new pods must start normally).
func UninstallConfig(confDir string) error {
	return UninstallConfigIn("", confDir)
}

// UninstallConfigIn is UninstallConfig with the host mounted at root; it
// also cleans the multus delegate directories (MultusDelegateDirs) and
// multus' inline delegates.
func UninstallConfigIn(root, confDir string) error {
	dirs := []string{confDir}
	for _, d := range MultusDelegateDirs {
		if p, err := InRoot(root, d); err == nil && p != confDir {
			dirs = append(dirs, p)
		}
	}
	var errs []error
	for _, dir := range dirs {
		for _, path := range configFiles(dir) {
			errs = append(errs, unchain(path))
		}
	}
	return errors.Join(errs...)
}

// unchain removes our entry from one configuration file, if it has one.
func unchain(path string) error {
	conf, err := readConf(path)
	if err != nil {
		return nil // not ours to judge
	}
	changed := false
	if list, ok := conf["plugins"].([]any); ok {
		if kept := withoutPlugin(list); len(kept) != len(list) {
			conf["plugins"], changed = kept, true
		}
	}
	if ds, ok := conf["delegates"].([]any); ok && isMultus(conf) && len(ds) > 0 {
		if d, ok := ds[0].(map[string]any); ok {
			if list, ok := d["plugins"].([]any); ok {
				if kept := withoutPlugin(list); len(kept) != len(list) {
					d["plugins"], changed = kept, true
				}
			}
		}
	}
	if !changed {
		return nil
	}
	out, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		return err
	}
	return writeAtomic(path, out)
}

// UninstallBinary removes the plugin binary.
func UninstallBinary(binDir string) error {
	err := os.Remove(filepath.Join(binDir, PluginType))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return err
}

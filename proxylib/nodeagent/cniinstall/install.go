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
	"slices"
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
	entries, err := os.ReadDir(confDir)
	if err != nil {
		return "", err
	}
	var names []string
	for _, e := range entries {
		ext := filepath.Ext(e.Name())
		if !e.IsDir() && !strings.HasPrefix(e.Name(), ".") && (ext == ".conflist" || ext == ".conf" || ext == ".json") {
			names = append(names, e.Name())
		}
	}
	if len(names) == 0 {
		return "", ErrNoConfig
	}
	slices.Sort(names)
	return filepath.Join(confDir, names[0]), nil
}

// InstallConfig appends (or refreshes) plugin as the last entry of the
// primary configuration. A single-plugin .conf is rewritten as a .conflist
// of the same base name. It reports whether a file changed.
func InstallConfig(confDir string, plugin map[string]any) (bool, error) {
	path, err := PrimaryConfig(confDir)
	if err != nil {
		return false, err
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		return false, err
	}
	var conf map[string]any
	if err := json.Unmarshal(raw, &conf); err != nil {
		return false, fmt.Errorf("%s: %w", path, err)
	}
	plugin = clonePlugin(plugin)
	plugin["type"] = PluginType
	list, isList := conf["plugins"].([]any)
	if !isList { // single plugin config: wrap it
		single := conf
		conf = map[string]any{"cniVersion": single["cniVersion"], "name": single["name"]}
		list = []any{single}
	}
	var kept []any
	for _, p := range list {
		if m, ok := p.(map[string]any); ok && m["type"] == PluginType {
			continue
		}
		kept = append(kept, p)
	}
	kept = append(kept, plugin)
	if isList && reflect.DeepEqual(normalize(list), normalize(kept)) {
		return false, nil
	}
	conf["plugins"] = kept
	out, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		return false, err
	}
	dst := path
	if !isList {
		dst = strings.TrimSuffix(path, filepath.Ext(path)) + ".conflist"
	}
	if err := writeAtomic(dst, out); err != nil {
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
	entries, err := os.ReadDir(confDir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if filepath.Ext(e.Name()) != ".conflist" {
			continue
		}
		path := filepath.Join(confDir, e.Name())
		raw, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		var conf map[string]any
		if json.Unmarshal(raw, &conf) != nil {
			continue
		}
		list, _ := conf["plugins"].([]any)
		var kept []any
		for _, p := range list {
			if m, ok := p.(map[string]any); ok && m["type"] == PluginType {
				continue
			}
			kept = append(kept, p)
		}
		if len(kept) == len(list) {
			continue
		}
		conf["plugins"] = kept
		out, err := json.MarshalIndent(conf, "", "  ")
		if err != nil {
			return err
		}
		if err := writeAtomic(path, out); err != nil {
			return err
		}
	}
	return nil
}

// UninstallBinary removes the plugin binary.
func UninstallBinary(binDir string) error {
	err := os.Remove(filepath.Join(binDir, PluginType))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return err
}

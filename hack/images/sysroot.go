package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
)

// toolRoot is the Debian root fs an image of arch takes its hostTools
// from: the build machine's own for its architecture (the lab's path, no
// download), otherwise a sysroot of the tools' Debian packages for arch,
// fetched once with apt-get into cacheDir (bin/sysroot/<arch>) and reused.
// apt-get runs on private state directories: the machine's package
// database, sources and keys are read, never changed, and apt verifies the
// packages against the signed archive index as for any install.
func toolRoot(cmdName, arch, cacheDir string) (string, error) {
	if len(hostTools[cmdName]) == 0 || arch == runtime.GOARCH {
		return "/", nil
	}
	var pkgs []string
	for _, t := range hostTools[cmdName] {
		pkgs = append(pkgs, t.packages...)
	}
	sort.Strings(pkgs)
	dir := filepath.Join(cacheDir, arch)
	root := filepath.Join(dir, "root")
	stamp := filepath.Join(dir, "packages")
	want := strings.Join(pkgs, "\n") + "\n"
	if b, err := os.ReadFile(stamp); err == nil && string(b) == want {
		return root, nil
	}
	if err := fetchSysroot(dir, root, arch, pkgs); err != nil {
		return "", fmt.Errorf("%s image for %s needs Debian packages %s: %w", cmdName, arch, strings.Join(pkgs, " "), err)
	}
	return root, os.WriteFile(stamp, []byte(want), 0o644)
}

func fetchSysroot(dir, root, arch string, pkgs []string) error {
	if err := os.RemoveAll(dir); err != nil {
		return err
	}
	state := filepath.Join(dir, "apt")
	debs := filepath.Join(dir, "debs")
	for _, d := range []string{filepath.Join(state, "lists", "partial"), filepath.Join(state, "cache", "archives", "partial"), debs, root} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	apt := func(args ...string) error {
		cmd := exec.Command("apt-get", append([]string{"-q",
			"-o", "Dir::State::Lists=" + filepath.Join(state, "lists"),
			"-o", "Dir::Cache=" + filepath.Join(state, "cache"),
			"-o", "Dir::State::status=/dev/null",
			"-o", "APT::Architecture=" + arch, "-o", "APT::Architectures=" + arch,
			"-o", "Debug::NoLocking=1", "-o", "APT::Sandbox::User=root"}, args...)...)
		cmd.Dir = debs
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("apt-get %s: %v: %s", args[0], err, lastLines(out, 5))
		}
		return nil
	}
	if err := apt("update"); err != nil {
		return err
	}
	if err := apt(append([]string{"download"}, pkgs...)...); err != nil {
		return err
	}
	files, err := filepath.Glob(filepath.Join(debs, "*.deb"))
	if err != nil || len(files) != len(pkgs) {
		return fmt.Errorf("downloaded %d packages, want %d", len(files), len(pkgs))
	}
	for _, f := range files {
		if out, err := exec.Command("dpkg-deb", "-x", f, root).CombinedOutput(); err != nil {
			return fmt.Errorf("dpkg-deb -x %s: %v: %s", f, err, out)
		}
	}
	// The package lists (~25 MB) are not needed once the root exists.
	return os.RemoveAll(state)
}

func lastLines(b []byte, n int) string {
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

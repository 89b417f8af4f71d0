package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
)

// hostTool is a program an image needs besides its Go binary, copied from
// the build machine's Debian packages with the shared libraries and plugin
// directories it loads: the node agent's iptables backend runs
// iptables-restore/-save (redirection: iptables), which a scratch image
// does not have.
type hostTool struct {
	program string   // absolute path on the build machine
	links   []string // names in usr/sbin pointing at it (multi-call binary)
	plugins string   // directory of dlopen'ed plugins, relative to the program's library directory
}

var hostTools = map[string][]hostTool{
	"ambient-cni": {{
		program: "/usr/sbin/xtables-nft-multi",
		links:   []string{"iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save", "ip6tables-restore"},
		plugins: "xtables", // libxt_*.so: match and target extensions (REDIRECT, mark, ...)
	}},
}

// imageFile is a file to put in an image: its path there, its content's
// path on the build machine, or a symlink target.
type imageFile struct {
	path, from, link string
}

// hostToolFiles lists what cmdName's tools need in the image. A missing
// program is an error: the image would fail only on the node.
func hostToolFiles(cmdName string) ([]imageFile, error) {
	var files []imageFile
	seen := map[string]bool{}
	add := func(f imageFile) {
		if !seen[f.path] {
			seen[f.path] = true
			files = append(files, f)
		}
	}
	for _, t := range hostTools[cmdName] {
		if _, err := os.Stat(t.program); err != nil {
			return nil, fmt.Errorf("%s needs %s from the build machine (Debian package iptables): %w", cmdName, t.program, err)
		}
		objects := []string{t.program}
		add(imageFile{path: strings.TrimPrefix(t.program, "/"), from: t.program})
		for _, l := range t.links {
			add(imageFile{path: "usr/sbin/" + l, link: filepath.Base(t.program)})
		}
		libs, err := sharedLibraries(t.program)
		if err != nil {
			return nil, err
		}
		if t.plugins != "" && len(libs) > 0 {
			dir := filepath.Join(libDir(libs), t.plugins)
			plugins, err := filepath.Glob(filepath.Join(dir, "*.so"))
			if err != nil || len(plugins) == 0 {
				return nil, fmt.Errorf("%s: no plugins in %s", t.program, dir)
			}
			for _, p := range plugins {
				add(imageFile{path: strings.TrimPrefix(p, "/"), from: p})
				objects = append(objects, p)
			}
		}
		for _, o := range objects {
			libs, err := sharedLibraries(o)
			if err != nil {
				return nil, err
			}
			for _, l := range libs {
				add(imageFile{path: strings.TrimPrefix(l, "/"), from: l})
			}
		}
	}
	sort.Slice(files, func(i, j int) bool { return files[i].path < files[j].path })
	return files, nil
}

// sharedLibraries lists the libraries (and the dynamic loader) an ELF
// object loads, as ldd resolves them on the build machine.
func sharedLibraries(object string) ([]string, error) {
	out, err := exec.Command("ldd", object).Output()
	if err != nil {
		return nil, fmt.Errorf("ldd %s: %w", object, err)
	}
	var libs []string
	for _, line := range strings.Split(string(out), "\n") {
		for _, f := range strings.Fields(line) {
			if strings.HasPrefix(f, "/") {
				libs = append(libs, f)
				break
			}
		}
	}
	return libs, nil
}

// libDir is the multiarch library directory the first non-loader library
// lives in (e.g. /lib/x86_64-linux-gnu), where plugin directories are.
func libDir(libs []string) string {
	for _, l := range libs {
		if !strings.Contains(filepath.Base(l), "ld-linux") {
			return strings.Replace(filepath.Dir(l), "/lib/", "/usr/lib/", 1)
		}
	}
	return "/usr/lib"
}

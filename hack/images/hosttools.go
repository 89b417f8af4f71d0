package main

import (
	"debug/elf"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
)

// hostTool is a program an image needs besides its Go binary, copied from
// a Debian root of the image's architecture (the build machine's own root
// for its architecture, a sysroot of Debian packages for the others; see
// sysroot.go) with the shared libraries and plugins it loads: the node
// agent's iptables backend runs iptables-restore/-save (redirection:
// iptables), which a scratch image does not have.
type hostTool struct {
	program  string   // absolute path in the root
	links    []string // names in usr/sbin pointing at it (multi-call binary)
	plugins  string   // directory of dlopen'ed plugins under usr/lib/<triplet>
	packages []string // Debian packages holding the program, its plugins and every library they load
}

var hostTools = map[string][]hostTool{
	"ambient-cni": {{
		program:  "/usr/sbin/xtables-nft-multi",
		links:    []string{"iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save", "ip6tables-restore"},
		plugins:  "xtables", // libxt_*.so: match and target extensions (REDIRECT, mark, ...)
		packages: []string{"iptables", "libxtables12", "libnftnl11", "libmnl0", "libc6", "libnetfilter-conntrack3", "libnfnetlink0"},
	}},
}

// imageFile is a file to put in an image: its path there, its content's
// path on the build machine, or a symlink target.
type imageFile struct {
	path, from, link string
}

// triplets are Debian's multiarch library directories per ELF machine.
var triplets = map[elf.Machine]string{
	elf.EM_X86_64:  "x86_64-linux-gnu",
	elf.EM_AARCH64: "aarch64-linux-gnu",
}

// hostToolFiles lists what cmdName's tools need in the image, read from
// the Debian root fs (the build machine's "/" or a sysroot) of the image's
// architecture arch. A missing program or library is an error: the image
// would fail only on the node.
func hostToolFiles(cmdName, root, arch string) ([]imageFile, error) {
	var files []imageFile
	seen := map[string]bool{}
	add := func(f imageFile) {
		if !seen[f.path] {
			seen[f.path] = true
			files = append(files, f)
		}
	}
	for _, t := range hostTools[cmdName] {
		prog, err := inRoot(root, t.program)
		if err != nil {
			return nil, fmt.Errorf("%s needs %s for %s (Debian package iptables): %w", cmdName, t.program, arch, err)
		}
		machine, err := elfMachine(prog)
		if err != nil {
			return nil, err
		}
		if want := elfMachines[arch]; machine != want {
			return nil, fmt.Errorf("%s in %s is %s, the %s image needs %s", t.program, root, machine, arch, want)
		}
		triplet := triplets[machine]
		add(imageFile{path: strings.TrimPrefix(t.program, "/"), from: prog})
		for _, l := range t.links {
			add(imageFile{path: "usr/sbin/" + l, link: filepath.Base(t.program)})
		}
		objects := []string{t.program}
		if t.plugins != "" {
			dir := path.Join("/usr/lib", triplet, t.plugins)
			real, err := inRoot(root, dir)
			if err != nil {
				return nil, err
			}
			plugins, err := filepath.Glob(filepath.Join(real, "*.so"))
			if err != nil || len(plugins) == 0 {
				return nil, fmt.Errorf("%s: no plugins in %s", t.program, real)
			}
			for _, p := range plugins {
				objects = append(objects, path.Join(dir, filepath.Base(p)))
			}
		}
		libs, err := closure(root, triplet, objects)
		if err != nil {
			return nil, err
		}
		for _, o := range libs {
			from, err := inRoot(root, o)
			if err != nil {
				return nil, err
			}
			add(imageFile{path: strings.TrimPrefix(o, "/"), from: from})
		}
	}
	sort.Slice(files, func(i, j int) bool { return files[i].path < files[j].path })
	return files, nil
}

var elfMachines = map[string]elf.Machine{"amd64": elf.EM_X86_64, "arm64": elf.EM_AARCH64}

func elfMachine(p string) (elf.Machine, error) {
	f, err := elf.Open(p)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	return f.Machine, nil
}

// closure is objects plus every shared object they load, transitively, as
// the dynamic loader finds them without ld.so.cache (the image has none):
// the interpreter at its absolute path, libraries in the multiarch
// directories. It reads ELF headers instead of running ldd, so it works
// for an architecture the build machine cannot execute.
func closure(root, triplet string, objects []string) ([]string, error) {
	dirs := []string{"/lib/" + triplet, "/usr/lib/" + triplet, "/lib", "/usr/lib"}
	seen := map[string]bool{}
	queue := append([]string(nil), objects...)
	var out []string
	for len(queue) > 0 {
		o := queue[0]
		queue = queue[1:]
		if seen[o] {
			continue
		}
		seen[o] = true
		out = append(out, o)
		p, err := inRoot(root, o)
		if err != nil {
			return nil, err
		}
		f, err := elf.Open(p)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", o, err)
		}
		for _, prog := range f.Progs {
			if prog.Type == elf.PT_INTERP {
				b := make([]byte, prog.Filesz)
				if _, err := prog.ReadAt(b, 0); err != nil {
					f.Close()
					return nil, err
				}
				queue = append(queue, strings.TrimRight(string(b), "\x00"))
			}
		}
		needed, err := f.ImportedLibraries()
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("%s: %w", o, err)
		}
		for _, n := range needed {
			lib, err := findLibrary(root, dirs, n)
			if err != nil {
				return nil, fmt.Errorf("%s needs %s: %w", o, n, err)
			}
			queue = append(queue, lib)
		}
	}
	return out, nil
}

func findLibrary(root string, dirs []string, name string) (string, error) {
	for _, d := range dirs {
		if _, err := inRoot(root, path.Join(d, name)); err == nil {
			return path.Join(d, name), nil
		}
	}
	return "", fmt.Errorf("not in %s under %s", strings.Join(dirs, ", "), root)
}

// inRoot is the build-machine path of p inside root, following symlinks as
// if root were "/" (a sysroot's absolute links must not reach the build
// machine's own files).
func inRoot(root, p string) (string, error) {
	cur := path.Clean("/" + p)
	for hops := 0; hops < 40; hops++ {
		// Resolve the first symlinked component, then start over.
		parts := strings.Split(strings.TrimPrefix(cur, "/"), "/")
		resolved := false
		for i := range parts {
			prefix := "/" + strings.Join(parts[:i+1], "/")
			fi, err := os.Lstat(filepath.Join(root, prefix))
			if err != nil {
				return "", err
			}
			if fi.Mode()&fs.ModeSymlink == 0 {
				continue
			}
			target, err := os.Readlink(filepath.Join(root, prefix))
			if err != nil {
				return "", err
			}
			if !path.IsAbs(target) {
				target = path.Join(path.Dir(prefix), target)
			}
			cur = path.Clean(path.Join(target, strings.Join(parts[i+1:], "/")))
			resolved = true
			break
		}
		if !resolved {
			return filepath.Join(root, cur), nil
		}
	}
	return "", errors.New(p + ": too many symlinks")
}

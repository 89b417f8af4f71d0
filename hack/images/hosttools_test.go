package main

import (
	"archive/tar"
	"bytes"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// extract writes a layer tar into dir (regular files, directories, symlinks).
func extract(t *testing.T, layer []byte, dir string) {
	t.Helper()
	tr := tar.NewReader(bytes.NewReader(layer))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, h.Name)
		switch h.Typeflag {
		case tar.TypeDir:
			os.MkdirAll(p, 0o755)
		case tar.TypeSymlink:
			if err := os.Symlink(h.Linkname, p); err != nil {
				t.Fatal(err)
			}
		case tar.TypeReg:
			b, _ := io.ReadAll(tr)
			if err := os.WriteFile(p, b, os.FileMode(h.Mode)); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// The node agent's image carries a working iptables-restore/-save
// (redirection: iptables): in the image's root alone, in a fresh network
// namespace, it loads a NAT redirect rule set like the backend's and reads
// it back. Before, the image held only the agent's binary.
func TestNodeAgentImageRunsIPTables(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (chroot, network namespace)")
	}
	layer, err := rootfs("ambient-cni", []byte("#!/bin/false\n"), "/", runtime.GOARCH)
	if err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	extract(t, layer, root)
	for _, name := range []string{"iptables-restore", "iptables-save", "ip6tables-restore", "ip6tables-save"} {
		if _, err := os.Stat(filepath.Join(root, "usr/sbin", name)); err != nil {
			t.Fatalf("image lacks %s: %v", name, err)
		}
	}
	rules := "*nat\n:AMBIENT_TEST - [0:0]\n-A PREROUTING -p tcp -j AMBIENT_TEST\n" +
		"-A AMBIENT_TEST -p tcp -m mark --mark 0x539/0xfff -j RETURN\n" +
		"-A AMBIENT_TEST -p tcp -j REDIRECT --to-ports 15006\nCOMMIT\n"
	// unshare -n: the rules land in a namespace of this test's own.
	script := "iptables-restore && iptables-save -t nat"
	cmd := exec.Command("unshare", "-n", "--", "sh", "-c",
		"chroot "+root+" /usr/sbin/iptables-restore && chroot "+root+" /usr/sbin/iptables-save -t nat")
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	cmd.Stdin = strings.NewReader(rules)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s in the image: %v\n%s", script, err, out)
	}
	for _, want := range []string{"-A AMBIENT_TEST -p tcp -j REDIRECT --to-ports 15006", "--mark 0x539/0xfff"} {
		if !strings.Contains(string(out), want) {
			t.Fatalf("iptables-save in the image lacks %q:\n%s", want, out)
		}
	}
}

// The node agent's image for the other architecture (arm64 on an amd64
// build machine, or the reverse) carries iptables of that architecture,
// from its Debian packages (fetched once into bin/sysroot): every ELF
// object is of the image's machine and every library it loads, and its
// interpreter, is in the image where the loader looks without
// ld.so.cache; then it runs under the architecture's user-mode emulator
// (qemu-user-static, which .ci/run installs) in the image's root alone.
// Before, the image took the build machine's iptables whatever the
// platform.
func TestNodeAgentImageForeignArchIPTables(t *testing.T) {
	arch := map[string]string{"amd64": "arm64", "arm64": "amd64"}[runtime.GOARCH]
	if _, err := exec.LookPath("apt-get"); err != nil {
		t.Skip("needs apt-get and dpkg-deb (Debian) to fetch the packages")
	}
	root, err := toolRoot("ambient-cni", arch, filepath.Join(repoRoot(t), "bin", "sysroot"))
	if err != nil {
		t.Fatal(err)
	}
	layer, err := rootfs("ambient-cni", []byte("#!/bin/false\n"), root, arch)
	if err != nil {
		t.Fatal(err)
	}
	img := t.TempDir()
	extract(t, layer, img)
	for _, name := range []string{"iptables-restore", "iptables-save", "ip6tables-restore", "ip6tables-save"} {
		if _, err := inRoot(img, "/usr/sbin/"+name); err != nil {
			t.Fatalf("image lacks %s: %v", name, err)
		}
	}
	objects := 0
	err = filepath.WalkDir(img, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || d.Type()&fs.ModeSymlink != 0 || !strings.Contains(p, ".so") && !strings.HasSuffix(p, "xtables-nft-multi") {
			return err
		}
		objects++
		rel := "/" + strings.TrimPrefix(p, img+"/")
		m, err := elfMachine(p)
		if err != nil || m != elfMachines[arch] {
			t.Errorf("%s: machine %v (%v), want %v", rel, m, err, elfMachines[arch])
			return nil
		}
		// Everything it loads resolves inside the image alone.
		if _, err := closure(img, triplets[m], []string{rel}); err != nil {
			t.Errorf("in the image: %v", err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := inRoot(img, "/usr/lib/"+triplets[elfMachines[arch]]+"/xtables/libxt_REDIRECT.so"); err != nil || objects < 10 {
		t.Fatalf("REDIRECT extension missing (%v) or too few objects (%d)", err, objects)
	}
	runForeign(t, img, arch)
}

// emulators are qemu-user-static's binaries per architecture.
var emulators = map[string]string{"arm64": "qemu-aarch64-static", "amd64": "qemu-x86_64-static"}

// runForeign runs the foreign image's iptables-restore under qemu with the
// image as its only root (-L: the loader, libraries and xtables extensions
// all come from the image). It stops at --version: loading rules needs
// netfilter netlink, which qemu's user mode does not translate ("Protocol
// not supported"); the rule set itself is checked on the host
// architecture by TestNodeAgentImageRunsIPTables.
func runForeign(t *testing.T, img, arch string) {
	qemu, err := exec.LookPath(emulators[arch])
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s not installed (.ci/run installs qemu-user-static): %v", emulators[arch], err)
		}
		t.Skipf("%s not installed (apt-get install qemu-user-static): checked statically only", emulators[arch])
	}
	for _, name := range []string{"iptables-restore", "ip6tables-save"} {
		out, err := exec.Command(qemu, "-L", img, filepath.Join(img, "usr/sbin", name), "--version").CombinedOutput()
		if err != nil || !strings.Contains(string(out), "(nf_tables)") {
			t.Errorf("%s %s --version in the %s image: %v\n%s", filepath.Base(qemu), name, arch, err, out)
			continue
		}
		t.Logf("%s image: %s", arch, strings.TrimSpace(string(out)))
	}
}

func repoRoot(t *testing.T) string {
	t.Helper()
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(wd, "..", "..")
}

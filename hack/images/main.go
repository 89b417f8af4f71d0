// Command images builds a multi-arch OCI image index for every binary
// under cmd/ without Docker: each image is one static Go binary,
// cross-compiled per platform, on an empty base (plus /tmp, a nonroot user
// and, for the node agent, iptables of the image's architecture). The
// indexes go to an OCI layout with their digests in images.json (what
// `make push` and `make release` read); the build machine's architecture
// is also written as a docker-archive tarball that `ctr -n k8s.io images
// import` and `kind load image-archive` accept (the lab's path). Builds
// are reproducible: the same binaries give the same digests.
package main

import (
	"archive/tar"
	"bytes"
	"debug/elf"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/ambientmesh/ambient/hack/pin"
)

// epoch is every timestamp in the image, for reproducible digests.
var epoch = time.Unix(0, 0).UTC()

// nonrootUsers run as 65532 by default; the others set their user in the
// pod spec (ztunnel and the node agent need root, waypoints run as 1337).
var nonrootUsers = map[string]bool{"manager": true, "ambientctl": true}

type options struct {
	tag, out, binDir, registry, cmdDir, sysroot string
	build, push                                 bool
	only, platforms                             []string
}

func main() {
	o := options{}
	var only, platforms string
	flag.StringVar(&o.tag, "tag", "dev", "image tag")
	flag.StringVar(&o.out, "out", "bin/images", "output directory: <name>.tar (host architecture, docker-archive), oci/ (OCI layout of the multi-arch indexes), images.json (digests)")
	flag.StringVar(&o.binDir, "bin", "bin", "directory of the static binaries (other architectures in <bin>/linux_<arch>/)")
	flag.StringVar(&o.registry, "registry", "docker.io/ambient", "image repository prefix")
	flag.StringVar(&o.cmdDir, "cmd", "cmd", "directory whose subdirectories are the binaries")
	flag.StringVar(&o.sysroot, "sysroot", "bin/sysroot", "cache of Debian packages for the tools images carry, per foreign architecture")
	flag.StringVar(&platforms, "platforms", "linux/amd64,linux/arm64", "comma-separated platforms of each image index (\"host\": the build machine's only)")
	flag.BoolVar(&o.build, "build", false, "build each cmd (CGO_ENABLED=0) for every platform into -bin first; one that fails to build is an error")
	flag.BoolVar(&o.push, "push", false, "push the indexes of the OCI layout in -out to -registry as <registry>/<name>:<tag> instead of building")
	flag.StringVar(&only, "only", "", "comma-separated subset of cmds")
	flag.Parse()
	if only != "" {
		o.only = strings.Split(only, ",")
	}
	var err error
	if o.platforms, err = parsePlatforms(platforms); err == nil {
		if o.push {
			err = push(o, remote.WithAuthFromKeychain(authn.DefaultKeychain))
		} else {
			err = run(o)
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "images:", err)
		os.Exit(1)
	}
}

// parsePlatforms returns the architectures of "linux/<arch>,..." (only
// Linux images; the architectures the tools images carry are known for).
func parsePlatforms(s string) ([]string, error) {
	if s == "host" {
		return []string{runtime.GOARCH}, nil
	}
	var archs []string
	for _, p := range strings.Split(s, ",") {
		os, arch, ok := strings.Cut(strings.TrimSpace(p), "/")
		if !ok || os != "linux" || elfMachines[arch] == 0 {
			return nil, fmt.Errorf("platform %q: want linux/amd64 or linux/arm64", p)
		}
		if !slices.Contains(archs, arch) {
			archs = append(archs, arch)
		}
	}
	return archs, nil
}

// Built is a component's entry of images.json.
type Built = pin.Built

const (
	refNameAnnotation = "org.opencontainers.image.ref.name"
	titleAnnotation   = "org.opencontainers.image.title"
)

func run(o options) error {
	names, err := commands(o)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(o.out, 0o755); err != nil {
		return err
	}
	var built []Built
	var skipped, failed []string
	indexes := map[string]v1.ImageIndex{}
	for _, n := range names {
		if o.build {
			// A cmd that does not build must not quietly leave an older
			// image behind (or none): the cluster would run stale code or
			// fail to pull with nothing saying why.
			if err := buildAll(n, o); err != nil {
				failed = append(failed, fmt.Sprintf("%s: build failed: %v", n, err))
				continue
			}
		}
		if missing := missingBinaries(n, o); missing != "" {
			skipped = append(skipped, n+" (no binary "+missing+")")
			continue
		}
		b, idx, err := buildComponent(n, o)
		if err != nil {
			return fmt.Errorf("%s: %w", n, err)
		}
		built = append(built, b)
		indexes[n] = idx
	}
	if len(built) > 0 {
		if err := writeLayout(filepath.Join(o.out, "oci"), built, indexes); err != nil {
			return err
		}
		if err := writeJSON(filepath.Join(o.out, "images.json"), built); err != nil {
			return err
		}
	}
	for _, b := range built {
		fmt.Printf("built   %s:%s@%s  %s\n", b.Repository, b.Tag, b.Digest, platformDigests(b))
	}
	for _, s := range skipped {
		fmt.Println("skipped", s)
	}
	if len(failed) > 0 {
		return fmt.Errorf("%d image(s) not built:\n  %s", len(failed), strings.Join(failed, "\n  "))
	}
	if len(built) == 0 {
		return errors.New("no image built")
	}
	fmt.Printf("digests in %s; OCI layout in %s (make push REGISTRY=...)\n", filepath.Join(o.out, "images.json"), filepath.Join(o.out, "oci"))
	if slices.Contains(o.platforms, runtime.GOARCH) {
		fmt.Printf("load into containerd: ctr -n k8s.io images import %s/<name>.tar; into kind: kind load image-archive %s/<name>.tar\n", o.out, o.out)
	}
	return nil
}

func platformDigests(b Built) string {
	var s []string
	for _, a := range slices.Sorted(maps.Keys(b.Platforms)) {
		s = append(s, "linux/"+a+" "+b.Platforms[a])
	}
	return strings.Join(s, ", ")
}

// binPath is where the binary of cmd name for arch lives: bin/<name> for
// the build machine's architecture (as `make build` writes it), else
// bin/linux_<arch>/<name>.
func binPath(o options, name, arch string) string {
	if arch == runtime.GOARCH {
		return filepath.Join(o.binDir, name)
	}
	return filepath.Join(o.binDir, "linux_"+arch, name)
}

func buildAll(name string, o options) error {
	for _, arch := range o.platforms {
		if err := buildBinary(name, binPath(o, name, arch), arch, o); err != nil {
			return fmt.Errorf("linux/%s: %w", arch, err)
		}
	}
	return nil
}

func missingBinaries(name string, o options) string {
	for _, arch := range o.platforms {
		if _, err := os.Stat(binPath(o, name, arch)); err != nil {
			return binPath(o, name, arch)
		}
	}
	return ""
}

// buildComponent builds one image per platform, the index over them and,
// for the build machine's architecture, the docker-archive tarball the
// lab and kind import.
func buildComponent(name string, o options) (Built, v1.ImageIndex, error) {
	repo := o.registry + "/" + name
	b := Built{Name: name, Repository: repo, Tag: o.tag, Platforms: map[string]string{}}
	idx := mutate.IndexMediaType(empty.Index, types.OCIImageIndex)
	for _, arch := range o.platforms {
		root, err := toolRoot(name, arch, o.sysroot)
		if err != nil {
			return b, nil, err
		}
		img, err := buildImage(binPath(o, name, arch), name, o.tag, arch, root)
		if err != nil {
			return b, nil, fmt.Errorf("linux/%s: %w", arch, err)
		}
		d, err := img.Digest()
		if err != nil {
			return b, nil, err
		}
		b.Platforms[arch] = d.String()
		idx = mutate.AppendManifests(idx, mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{
			Platform: &v1.Platform{OS: "linux", Architecture: arch},
		}})
		if arch == runtime.GOARCH {
			if err := writeTarball(img, repo+":"+o.tag, filepath.Join(o.out, name+".tar")); err != nil {
				return b, nil, err
			}
		}
	}
	d, err := idx.Digest()
	if err != nil {
		return b, nil, err
	}
	b.Digest = d.String()
	return b, idx, nil
}

func writeTarball(img v1.Image, ref, path string) error {
	tag, err := name.NewTag(ref)
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := tarball.WriteToFile(tmp, tag, img); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// writeLayout writes a fresh OCI image layout holding every component's
// index, named by its reference (what `make push` reads, and what
// skopeo/crane/oras copy from).
func writeLayout(dir string, built []Built, indexes map[string]v1.ImageIndex) error {
	tmp := dir + ".tmp"
	if err := os.RemoveAll(tmp); err != nil {
		return err
	}
	p, err := layout.Write(tmp, empty.Index)
	if err != nil {
		return err
	}
	for _, b := range built {
		if err := p.AppendIndex(indexes[b.Name], layout.WithAnnotations(map[string]string{
			refNameAnnotation: b.Repository + ":" + b.Tag, titleAnnotation: b.Name,
		})); err != nil {
			return err
		}
	}
	if err := os.RemoveAll(dir); err != nil {
		return err
	}
	return os.Rename(tmp, dir)
}

func writeJSON(path string, v any) error {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(data, '\n'), 0o644)
}

// push copies every index of the OCI layout in o.out to
// <o.registry>/<name>:<o.tag> and checks the registry reports the digest
// the build did.
func push(o options, opts ...remote.Option) error {
	dir := filepath.Join(o.out, "oci")
	idx, err := layout.ImageIndexFromPath(dir)
	if err != nil {
		return fmt.Errorf("no images to push (run make images first): %w", err)
	}
	m, err := idx.IndexManifest()
	if err != nil {
		return err
	}
	if len(m.Manifests) == 0 {
		return fmt.Errorf("%s holds no image", dir)
	}
	for _, d := range m.Manifests {
		n := d.Annotations[titleAnnotation]
		if len(o.only) > 0 && !slices.Contains(o.only, n) {
			continue
		}
		child, err := idx.ImageIndex(d.Digest)
		if err != nil {
			return fmt.Errorf("%s: %w", n, err)
		}
		ref, err := name.NewTag(o.registry + "/" + n + ":" + o.tag)
		if err != nil {
			return err
		}
		if err := remote.WriteIndex(ref, child, opts...); err != nil {
			return fmt.Errorf("push %s: %w", ref, err)
		}
		got, err := remote.Head(ref, opts...)
		if err != nil {
			return fmt.Errorf("%s after push: %w", ref, err)
		}
		if got.Digest != d.Digest {
			return fmt.Errorf("%s: registry has %s, built %s", ref, got.Digest, d.Digest)
		}
		fmt.Printf("pushed  %s@%s\n", ref, d.Digest)
	}
	return nil
}

// commands lists cmd/<name> directories (or the -only subset).
func commands(o options) ([]string, error) {
	if len(o.only) > 0 {
		return o.only, nil
	}
	entries, err := os.ReadDir(o.cmdDir)
	if err != nil {
		return nil, err
	}
	var names []string
	for _, e := range entries {
		if e.IsDir() {
			names = append(names, e.Name())
		}
	}
	sort.Strings(names)
	return names, nil
}

func buildBinary(name, out, arch string, o options) error {
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w -X main.version="+o.tag, "-o", out, "./"+filepath.Join(o.cmdDir, name))
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+arch)
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%v: %s", err, firstLine(b))
	}
	return nil
}

func firstLine(b []byte) string {
	s, _, _ := strings.Cut(strings.TrimSpace(string(b)), "\n")
	return s
}

// checkStatic refuses binaries that need a dynamic loader (the image has
// no libc for them) or are built for another architecture than arch.
func checkStatic(path, arch string) error {
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("not an ELF binary: %w", err)
	}
	defer f.Close()
	if f.Machine != elfMachines[arch] {
		return fmt.Errorf("%s is built for %s, the linux/%s image needs %s", path, f.Machine, arch, elfMachines[arch])
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return errors.New("dynamically linked; build with CGO_ENABLED=0")
		}
	}
	return nil
}

func buildImage(bin, cmdName, version, arch, toolRoot string) (v1.Image, error) {
	if err := checkStatic(bin, arch); err != nil {
		return nil, err
	}
	binary, err := os.ReadFile(bin)
	if err != nil {
		return nil, err
	}
	layerTar, err := rootfs(cmdName, binary, toolRoot, arch)
	if err != nil {
		return nil, err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return nil, err
	}
	base := mutate.ConfigMediaType(mutate.MediaType(empty.Image, types.OCIManifestSchema1), types.OCIConfigJSON)
	img, err := mutate.Append(base, mutate.Addendum{Layer: layer, History: v1.History{
		Created: v1.Time{Time: epoch}, CreatedBy: "hack/images: " + cmdName,
	}})
	if err != nil {
		return nil, err
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cfg = cfg.DeepCopy()
	cfg.Created = v1.Time{Time: epoch}
	cfg.Architecture = arch
	cfg.OS = "linux"
	cfg.Config.Entrypoint = []string{"/usr/local/bin/" + cmdName}
	cfg.Config.Env = []string{"PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
	cfg.Config.WorkingDir = "/"
	if nonrootUsers[cmdName] {
		cfg.Config.User = "65532:65532"
	}
	cfg.Config.Labels = map[string]string{
		"org.opencontainers.image.title":   cmdName,
		"org.opencontainers.image.version": version,
		"org.opencontainers.image.source":  "https://github.com/ambientmesh/ambient",
	}
	return mutate.ConfigFile(img, cfg)
}

// parents writes the directories above path not written yet, outermost
// first.
func parents(path string, written map[string]bool, dir func(string, int64) error) error {
	var missing []string
	for d := filepath.Dir(path); d != "." && d != "/"; d = filepath.Dir(d) {
		if !written[d+"/"] {
			missing = append(missing, d+"/")
		}
	}
	for i := len(missing) - 1; i >= 0; i-- {
		if err := dir(missing[i], 0o755); err != nil {
			return err
		}
		written[missing[i]] = true
	}
	return nil
}

// rootfs is the image's only layer: the binary, a writable /tmp and the
// users it may run as.
func rootfs(cmdName string, binary []byte, toolRoot, arch string) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dir := func(p string, mode int64) error {
		return tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: p, Mode: mode, ModTime: epoch, Format: tar.FormatPAX})
	}
	file := func(p string, mode int64, data []byte) error {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: p, Mode: mode, Size: int64(len(data)), ModTime: epoch, Format: tar.FormatPAX}); err != nil {
			return err
		}
		_, err := tw.Write(data)
		return err
	}
	steps := []func() error{
		func() error { return dir("etc/", 0o755) },
		func() error {
			return file("etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/sbin/nologin\nproxy:x:1337:1337:proxy:/:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n"))
		},
		func() error { return file("etc/group", 0o644, []byte("root:x:0:\nproxy:x:1337:\nnonroot:x:65532:\n")) },
		func() error { return dir("tmp/", 0o1777) },
		func() error { return dir("usr/", 0o755) },
		func() error { return dir("usr/local/", 0o755) },
		func() error { return dir("usr/local/bin/", 0o755) },
		func() error { return file("usr/local/bin/"+cmdName, 0o755, binary) },
	}
	for _, s := range steps {
		if err := s(); err != nil {
			return nil, err
		}
	}
	tools, err := hostToolFiles(cmdName, toolRoot, arch)
	if err != nil {
		return nil, err
	}
	dirs := map[string]bool{"etc/": true, "tmp/": true, "usr/": true, "usr/local/": true, "usr/local/bin/": true}
	for _, f := range tools {
		if err := parents(f.path, dirs, dir); err != nil {
			return nil, err
		}
		if f.link != "" {
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeSymlink, Name: f.path, Linkname: f.link, Mode: 0o777, ModTime: epoch, Format: tar.FormatPAX}); err != nil {
				return nil, err
			}
			continue
		}
		data, err := os.ReadFile(f.from)
		if err != nil {
			return nil, err
		}
		if err := file(f.path, 0o755, data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

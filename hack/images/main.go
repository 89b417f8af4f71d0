// Command images builds a container image tarball for every binary under
// cmd/ without Docker: each image is one static Go binary on an empty base
// (plus /tmp and a nonroot user), written as a docker-archive tarball that
// `ctr -n k8s.io images import` and `kind load image-archive` accept.
// Builds are reproducible: the same binary gives the same image digest.
package main

import (
	"archive/tar"
	"bytes"
	"debug/elf"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// epoch is every timestamp in the image, for reproducible digests.
var epoch = time.Unix(0, 0).UTC()

// nonrootUsers run as 65532 by default; the others set their user in the
// pod spec (ztunnel and the node agent need root, waypoints run as 1337).
var nonrootUsers = map[string]bool{"manager": true, "ambientctl": true}

type options struct {
	tag, out, binDir, registry, cmdDir string
	build                              bool
	only                               []string
}

func main() {
	o := options{}
	var only string
	flag.StringVar(&o.tag, "tag", "dev", "image tag")
	flag.StringVar(&o.out, "out", "bin/images", "output directory for <name>.tar")
	flag.StringVar(&o.binDir, "bin", "bin", "directory of the static binaries")
	flag.StringVar(&o.registry, "registry", "docker.io/ambient", "image repository prefix")
	flag.StringVar(&o.cmdDir, "cmd", "cmd", "directory whose subdirectories are the binaries")
	flag.BoolVar(&o.build, "build", false, "build each cmd (CGO_ENABLED=0) into -bin first; one that fails to build is an error")
	flag.StringVar(&only, "only", "", "comma-separated subset of cmds")
	flag.Parse()
	if only != "" {
		o.only = strings.Split(only, ",")
	}
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "images:", err)
		os.Exit(1)
	}
}

func run(o options) error {
	names, err := commands(o)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(o.out, 0o755); err != nil {
		return err
	}
	var built, skipped, failed []string
	for _, n := range names {
		bin := filepath.Join(o.binDir, n)
		if o.build {
			// A cmd that does not build must not quietly leave an older
			// image behind (or none): the cluster would run stale code or
			// fail to pull with nothing saying why.
			if err := buildBinary(n, bin, o); err != nil {
				failed = append(failed, fmt.Sprintf("%s: build failed: %v", n, err))
				continue
			}
		}
		if _, err := os.Stat(bin); err != nil {
			skipped = append(skipped, n+" (no binary in "+o.binDir+")")
			continue
		}
		ref := fmt.Sprintf("%s/%s:%s", o.registry, n, o.tag)
		path := filepath.Join(o.out, n+".tar")
		digest, err := writeImage(bin, n, ref, path, o.tag)
		if err != nil {
			return fmt.Errorf("%s: %w", n, err)
		}
		built = append(built, fmt.Sprintf("%s  %s  %s", path, ref, digest))
	}
	for _, b := range built {
		fmt.Println("built  ", b)
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
	fmt.Printf("load into containerd: ctr -n k8s.io images import %s/<name>.tar; into kind: kind load image-archive %s/<name>.tar\n", o.out, o.out)
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

func buildBinary(name, out string, o options) error {
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w -X main.version="+o.tag, "-o", out, "./"+filepath.Join(o.cmdDir, name))
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%v: %s", err, firstLine(b))
	}
	return nil
}

func firstLine(b []byte) string {
	s, _, _ := strings.Cut(strings.TrimSpace(string(b)), "\n")
	return s
}

// checkStatic refuses binaries that need a dynamic loader: the image has no libc.
func checkStatic(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("not an ELF binary: %w", err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return errors.New("dynamically linked; build with CGO_ENABLED=0")
		}
	}
	return nil
}

// writeImage builds the image for one binary and writes it to path.
func writeImage(bin, name, ref, path, version string) (v1.Hash, error) {
	img, err := buildImage(bin, name, version)
	if err != nil {
		return v1.Hash{}, err
	}
	tag, err := parseTag(ref)
	if err != nil {
		return v1.Hash{}, err
	}
	tmp := path + ".tmp"
	if err := tarball.WriteToFile(tmp, tag, img); err != nil {
		return v1.Hash{}, err
	}
	if err := os.Rename(tmp, path); err != nil {
		return v1.Hash{}, err
	}
	return img.Digest()
}

func parseTag(ref string) (name.Tag, error) { return name.NewTag(ref) }

func buildImage(bin, cmdName, version string) (v1.Image, error) {
	if err := checkStatic(bin); err != nil {
		return nil, err
	}
	binary, err := os.ReadFile(bin)
	if err != nil {
		return nil, err
	}
	layerTar, err := rootfs(cmdName, binary)
	if err != nil {
		return nil, err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	})
	if err != nil {
		return nil, err
	}
	img, err := mutate.Append(empty.Image, mutate.Addendum{Layer: layer, History: v1.History{
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
	cfg.Architecture = runtime.GOARCH
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
func rootfs(cmdName string, binary []byte) ([]byte, error) {
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
	tools, err := hostToolFiles(cmdName)
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

// Command imagebuild writes the lab's OCI image tarballs without Docker: the
// pod sandbox (pause), CoreDNS and the test workloads (httpbin, sleep), each a
// single static binary on an empty base. Builds are reproducible (fixed
// timestamps), so an unchanged image keeps its digest and the lab can skip
// re-importing it.
package main

import (
	"archive/tar"
	"bytes"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// image describes one lab image.
type image struct {
	file       string   // tarball name under -out
	ref        string   // image reference as pods name it
	pkg        string   // Go package to build, or "" when binary is given
	binary     string   // prebuilt binary path
	path       string   // where the binary goes in the image
	links      []string // extra names (symlinks) for a multi-call binary
	entrypoint []string
	cmd        []string
	files      []file // further files (another binary, certificates)
}

// file is one extra regular file of an image.
type file struct {
	path string
	mode int64
	data []byte
}

func main() {
	out := flag.String("out", "bin/lab/images", "output directory")
	coredns := flag.String("coredns", "", "prebuilt CoreDNS binary (skipped when empty or missing)")
	fortio := flag.String("fortio", "", "prebuilt fortio binary of test/bench/fortio (skipped when empty or missing)")
	metallb := flag.String("metallb", "", "directory with prebuilt MetalLB controller and speaker binaries (test/lab/build.sh metallb); skipped when empty or missing")
	metallbVersion := flag.String("metallb-version", "v0.15.2", "MetalLB version: the tag of the images its manifest names")
	prometheus := flag.String("prometheus", "", "prebuilt Prometheus server binary (test/lab/build.sh prometheus); skipped when empty or missing")
	echoBasic := flag.String("echo-basic", "", "prebuilt echo-basic binary of the Gateway API conformance suite (test/lab/build.sh conformance); skipped when empty or missing")
	echoAdvanced := flag.String("echo-advanced", "", "directory with prebuilt server and client binaries of Istio's echo app, the suite's echo-advanced (test/lab/build.sh echo-advanced); skipped when empty or missing")
	tag := flag.String("tag", "dev", "tag of the test workload images")
	components := flag.String("components", "", "comma-separated cmd/<name> mesh components to package as docker.io/ambient/<name>:<tag> (a stand-in for `make images`); a component that does not build is reported and skipped")
	only := flag.Bool("components-only", false, "build only the -components images")
	flag.Parse()
	if err := os.MkdirAll(*out, 0o755); err != nil {
		log.Fatal(err)
	}
	images := []image{
		{file: "pause.tar", ref: "docker.io/ambient-lab/pause:3.10", pkg: "./test/workloads/pause", path: "/pause", entrypoint: []string{"/pause"}},
		{file: "httpbin.tar", ref: "docker.io/ambient-lab/httpbin:" + *tag, pkg: "./test/workloads/httpbin", path: "/usr/bin/httpbin", entrypoint: []string{"/usr/bin/httpbin"}},
		{file: "sleep.tar", ref: "docker.io/ambient-lab/sleep:" + *tag, pkg: "./test/workloads/sleep", path: "/usr/bin/toolbox",
			links: []string{"/usr/bin/sleep", "/usr/bin/curl", "/usr/bin/connhold", "/usr/bin/dig", "/bin/sleep", "/bin/curl"}, entrypoint: []string{"/usr/bin/sleep"}, cmd: []string{"infinity"}},
	}
	if *coredns != "" {
		if _, err := os.Stat(*coredns); err == nil {
			images = append(images, image{file: "coredns.tar", ref: "docker.io/ambient-lab/coredns:v1.12.4", binary: *coredns, path: "/coredns", entrypoint: []string{"/coredns"}})
		} else {
			log.Printf("coredns binary %s missing: CoreDNS image not built", *coredns)
		}
	}
	if *fortio != "" {
		if _, err := os.Stat(*fortio); err == nil {
			images = append(images, image{file: "fortio.tar", ref: "docker.io/ambient-lab/fortio:" + *tag, binary: *fortio, path: "/usr/bin/fortio", entrypoint: []string{"/usr/bin/fortio"}})
		}
	}
	if *metallb != "" {
		// Named as MetalLB's own manifest names them, so it applies unchanged.
		for _, c := range []string{"controller", "speaker"} {
			bin := filepath.Join(*metallb, c)
			if _, err := os.Stat(bin); err != nil {
				log.Printf("MetalLB %s binary %s missing: image not built", c, bin)
				continue
			}
			images = append(images, image{file: "metallb-" + c + ".tar", ref: "quay.io/metallb/" + c + ":" + *metallbVersion,
				binary: bin, path: "/" + c, entrypoint: []string{"/" + c}})
		}
	}
	if *prometheus != "" {
		if _, err := os.Stat(*prometheus); err == nil {
			images = append(images, image{file: "prometheus.tar", ref: "docker.io/ambient-lab/prometheus:" + *tag, binary: *prometheus,
				path: "/bin/prometheus", entrypoint: []string{"/bin/prometheus"}})
		}
	}
	if *echoBasic != "" {
		if _, err := os.Stat(*echoBasic); err == nil {
			// The tags the suite's manifests name (v1.6.3 names three).
			for i, t := range []string{"v1.5.1", "v1.6.0-dev.2", "v1.6.0-dev.3"} {
				images = append(images, image{file: fmt.Sprintf("echo-basic-%d.tar", i), ref: "registry.k8s.io/gateway-api/echo-basic:" + t,
					binary: *echoBasic, path: "/echo-basic", entrypoint: []string{"/echo-basic"}})
			}
		}
	}
	if *echoAdvanced != "" {
		im, err := echoAdvancedImage(*echoAdvanced)
		if err != nil {
			log.Printf("echo-advanced image not built: %v", err)
		} else {
			images = append(images, im)
		}
	}
	if *only {
		images = nil
	}
	tmp, err := os.MkdirTemp("", "imagebuild")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(tmp)
	for _, im := range images {
		if err := buildImage(im, tmp, *out); err != nil {
			log.Fatalf("%s: %v", im.ref, err)
		}
	}
	failed := 0
	for _, c := range componentImages(*components, *tag) {
		if _, err := os.Stat(c.pkg); err != nil {
			log.Printf("component %s: %s does not exist yet; image not built", c.ref, c.pkg)
			failed++
			continue
		}
		if err := buildImage(c, tmp, *out); err != nil {
			log.Printf("component %s: NOT BUILT: %v", c.ref, err)
			failed++
		}
	}
	if failed > 0 {
		os.Exit(3)
	}
}

// componentImages describes the mesh's own images the way the operator
// names them (<registry>/<name>:<tag>, registry "ambient").
func componentImages(list, tag string) []image {
	var out []image
	for _, name := range strings.Split(list, ",") {
		name = strings.TrimSpace(name)
		if name == "" {
			continue
		}
		out = append(out, image{file: "component-" + name + ".tar", ref: "docker.io/ambient/" + name + ":" + tag,
			pkg: "./cmd/" + name, path: "/" + name, entrypoint: []string{"/" + name}})
	}
	return out
}

func buildImage(im image, tmp, outDir string) error {
	bin := im.binary
	if im.pkg != "" {
		bin = filepath.Join(tmp, filepath.Base(im.pkg))
		cmd := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w", "-o", bin, im.pkg)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("go build %s: %w", im.pkg, err)
		}
	}
	layerTar, err := layerFor(bin, im.path, im.links, im.files)
	if err != nil {
		return err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	})
	if err != nil {
		return err
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return err
	}
	img, err = mutate.ConfigFile(img, &v1.ConfigFile{
		Architecture: "amd64",
		OS:           "linux",
		Config: v1.Config{
			Entrypoint: im.entrypoint,
			Cmd:        im.cmd,
			Env:        []string{"PATH=/usr/bin:/bin"},
			WorkingDir: "/",
		},
		RootFS: v1.RootFS{Type: "layers", DiffIDs: mustDiffIDs(img)},
	})
	if err != nil {
		return err
	}
	ref, err := name.NewTag(im.ref)
	if err != nil {
		return err
	}
	dst := filepath.Join(outDir, im.file)
	if err := tarball.WriteToFile(dst+".tmp", ref, img); err != nil {
		return err
	}
	digest, _ := img.Digest()
	log.Printf("image %s -> %s (%s)", im.ref, dst, digest)
	return os.Rename(dst+".tmp", dst)
}

func mustDiffIDs(img v1.Image) []v1.Hash {
	cf, err := img.ConfigFile()
	if err != nil {
		log.Fatal(err)
	}
	return cf.RootFS.DiffIDs
}

// layerFor returns a tar with the directories leading to path, the binary,
// symlinks to it and a world-writable /tmp, all with a fixed timestamp.
func layerFor(bin, path string, links []string, files []file) ([]byte, error) {
	data, err := os.ReadFile(bin)
	if err != nil {
		return nil, err
	}
	epoch := time.Unix(0, 0)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dirs := map[string]bool{}
	addDirs := func(p string) error {
		var chain []string
		for d := filepath.Dir(p); d != "/" && !dirs[d]; d = filepath.Dir(d) {
			chain = append([]string{d}, chain...)
		}
		for _, d := range chain {
			dirs[d] = true
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d[1:] + "/", Mode: 0o755, ModTime: epoch}); err != nil {
				return err
			}
		}
		return nil
	}
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: "tmp/", Mode: 0o1777, ModTime: epoch}); err != nil {
		return nil, err
	}
	if err := addDirs(path); err != nil {
		return nil, err
	}
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: path[1:], Mode: 0o755, Size: int64(len(data)), ModTime: epoch}); err != nil {
		return nil, err
	}
	if _, err := tw.Write(data); err != nil {
		return nil, err
	}
	for _, f := range files {
		if err := addDirs(f.path); err != nil {
			return nil, err
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: f.path[1:], Mode: f.mode, Size: int64(len(f.data)), ModTime: epoch}); err != nil {
			return nil, err
		}
		if _, err := tw.Write(f.data); err != nil {
			return nil, err
		}
	}
	for _, l := range links {
		if err := addDirs(l); err != nil {
			return nil, err
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeSymlink, Name: l[1:], Linkname: path, ModTime: epoch}); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

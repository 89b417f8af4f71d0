package main

import (
	"archive/tar"
	"debug/elf"
	"encoding/json"
	"io"
	"log"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

func readBuilt(t *testing.T, out string) []Built {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(out, "images.json"))
	if err != nil {
		t.Fatal(err)
	}
	var b []Built
	if err := json.Unmarshal(data, &b); err != nil {
		t.Fatal(err)
	}
	return b
}

// TestMultiArchImagesPushedToRegistry: `make images` for linux/amd64 and
// linux/arm64 gives one OCI index per cmd whose digest is reproducible;
// `make push` puts it in a registry (go-containerregistry's in-process
// registry over real HTTP, the stand-in for a real one) where the index
// has the digest images.json reported, both platforms' manifests with
// their digests, and each platform's image carries a binary of its own
// architecture. The host architecture is also a docker-archive tarball of
// the same image (what the lab imports).
func TestMultiArchImagesPushedToRegistry(t *testing.T) {
	archs := []string{"amd64", "arm64"}
	o := options{tag: "t1", out: t.TempDir(), binDir: t.TempDir(), registry: "docker.io/ambient", cmdDir: "testdata/cmd",
		build: true, only: []string{"hello"}, platforms: archs}
	if err := run(o); err != nil {
		t.Fatal(err)
	}
	built := readBuilt(t, o.out)
	if len(built) != 1 || built[0].Name != "hello" || !strings.HasPrefix(built[0].Digest, "sha256:") || len(built[0].Platforms) != 2 {
		t.Fatalf("images.json: %+v", built)
	}
	b := built[0]
	again := o
	again.out = t.TempDir()
	if err := run(again); err != nil {
		t.Fatal(err)
	}
	if d := readBuilt(t, again.out)[0].Digest; d != b.Digest {
		t.Fatalf("not reproducible: %s then %s", b.Digest, d)
	}

	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	defer srv.Close()
	o.registry = strings.TrimPrefix(srv.URL, "http://") + "/mesh"
	if err := push(o); err != nil {
		t.Fatal(err)
	}

	ref, err := name.NewDigest(o.registry + "/hello@" + b.Digest)
	if err != nil {
		t.Fatal(err)
	}
	tagged, _ := name.NewTag(o.registry + "/hello:t1")
	desc, err := remote.Head(tagged)
	if err != nil || desc.Digest.String() != b.Digest || desc.MediaType != types.OCIImageIndex {
		t.Fatalf("tag t1 in the registry: %+v %v, want index %s", desc, err, b.Digest)
	}
	idx, err := remote.Index(ref)
	if err != nil {
		t.Fatal(err)
	}
	m, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Manifests) != len(archs) {
		t.Fatalf("index has %d manifests, want %d", len(m.Manifests), len(archs))
	}
	for _, d := range m.Manifests {
		arch := d.Platform.Architecture
		if d.Platform.OS != "linux" || d.Digest.String() != b.Platforms[arch] {
			t.Errorf("manifest %s %+v, images.json says %s", d.Digest, d.Platform, b.Platforms[arch])
		}
		img, err := remote.Image(ref.Context().Digest(d.Digest.String()))
		if err != nil {
			t.Fatal(err)
		}
		cfg, err := img.ConfigFile()
		if err != nil || cfg.Architecture != arch || cfg.OS != "linux" {
			t.Fatalf("%s config: %+v %v", arch, cfg, err)
		}
		if got := binaryMachine(t, img, "usr/local/bin/hello"); got != elfMachines[arch] {
			t.Errorf("linux/%s image carries a %s binary", arch, got)
		}
		if arch == runtime.GOARCH {
			host, err := tarball.ImageFromPath(filepath.Join(o.out, "hello.tar"), nil)
			if err != nil {
				t.Fatal(err)
			}
			hc, _ := host.ConfigName()
			ic, _ := img.ConfigName()
			if hc != ic {
				t.Errorf("hello.tar config %s, index's %s image config %s", hc, arch, ic)
			}
		}
	}
}

func binaryMachine(t *testing.T, img v1.Image, path string) elf.Machine {
	t.Helper()
	layers, err := img.Layers()
	if err != nil || len(layers) != 1 {
		t.Fatalf("layers %d %v", len(layers), err)
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if err != nil {
			t.Fatalf("%s not in the image: %v", path, err)
		}
		if h.Name == path {
			f, err := os.CreateTemp(t.TempDir(), "bin")
			if err != nil {
				t.Fatal(err)
			}
			if _, err := io.Copy(f, tr); err != nil {
				t.Fatal(err)
			}
			f.Close()
			m, err := elfMachine(f.Name())
			if err != nil {
				t.Fatal(err)
			}
			return m
		}
	}
}

// A registry that refuses the push (here: none listening) is an error,
// and so is a layout with nothing built.
func TestPushFailures(t *testing.T) {
	o := options{tag: "t1", out: t.TempDir(), registry: "127.0.0.1:1/mesh"}
	if err := push(o); err == nil || !strings.Contains(err.Error(), "make images") {
		t.Fatalf("push without a layout: %v", err)
	}
	o.binDir, o.cmdDir, o.build, o.only, o.platforms = t.TempDir(), "testdata/cmd", true, []string{"hello"}, []string{runtime.GOARCH}
	if err := run(o); err != nil {
		t.Fatal(err)
	}
	if err := push(o); err == nil || !strings.Contains(err.Error(), "push 127.0.0.1:1/mesh/hello:t1") {
		t.Fatalf("push to a closed port: %v", err)
	}
}

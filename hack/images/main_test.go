package main

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// staticBinary compiles a tiny static program (stands in for a cmd).
func staticBinary(t *testing.T) string { return staticBinaryFor(t, runtime.GOARCH) }

func staticBinaryFor(t *testing.T, arch string) string {
	t.Helper()
	dir := t.TempDir()
	src := filepath.Join(dir, "main.go")
	if err := os.WriteFile(src, []byte("package main\nfunc main() { println(\"hi\") }\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "hello")
	cmd := exec.Command("go", "build", "-o", bin, src)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOFLAGS=", "GOOS=linux", "GOARCH="+arch)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, b)
	}
	return bin
}

func TestImageTarball(t *testing.T) {
	bin := staticBinary(t)
	out := t.TempDir()
	path := filepath.Join(out, "manager.tar")
	d1, err := writeImage(bin, "manager", "docker.io/ambient/manager:t1", path, "t1")
	if err != nil {
		t.Fatal(err)
	}
	// Reproducible: the same binary yields the same digest.
	d2, err := writeImage(bin, "manager", "docker.io/ambient/manager:t1", filepath.Join(out, "again.tar"), "t1")
	if err != nil || d1 != d2 {
		t.Fatalf("digests differ: %s %s (%v)", d1, d2, err)
	}

	// docker-archive layout with the tag ctr/kind import under.
	manifest := readTarEntry(t, path, "manifest.json")
	var entries []struct{ RepoTags []string }
	if err := json.Unmarshal(manifest, &entries); err != nil || len(entries) != 1 || entries[0].RepoTags[0] != "ambient/manager:t1" && entries[0].RepoTags[0] != "docker.io/ambient/manager:t1" {
		t.Fatalf("manifest.json: %s (%v)", manifest, err)
	}

	tag, _ := name.NewTag("docker.io/ambient/manager:t1")
	img, err := tarball.ImageFromPath(path, &tag)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Config.Entrypoint[0] != "/usr/local/bin/manager" || cfg.Config.User != "65532:65532" || cfg.OS != "linux" {
		t.Errorf("config: %+v", cfg.Config)
	}
	layers, err := img.Layers()
	if err != nil || len(layers) != 1 {
		t.Fatalf("layers: %d %v", len(layers), err)
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	want, _ := os.ReadFile(bin)
	files := map[string]*tar.Header{}
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		files[h.Name] = h
		if h.Name == "usr/local/bin/manager" {
			got, _ := io.ReadAll(tr)
			if !bytes.Equal(got, want) || h.Mode != 0o755 {
				t.Errorf("binary in image: mode %o, equal %v", h.Mode, bytes.Equal(got, want))
			}
		}
	}
	if files["tmp/"] == nil || files["tmp/"].Mode != 0o1777 || files["etc/passwd"] == nil {
		t.Errorf("rootfs lacks /tmp or /etc/passwd: %v", files)
	}
}

func TestDynamicBinaryRefused(t *testing.T) {
	dyn := "/bin/ls"
	if err := checkStatic(dyn, runtime.GOARCH); err == nil {
		t.Skip("/bin/ls is static on this machine")
	}
	if _, err := writeImage(dyn, "ls", "docker.io/ambient/ls:t", filepath.Join(t.TempDir(), "ls.tar"), "t"); err == nil {
		t.Fatal("dynamically linked binary accepted")
	}
	if err := checkStatic("main.go", runtime.GOARCH); err == nil {
		t.Fatal("non-ELF accepted")
	}
	other := map[string]string{"amd64": "arm64", "arm64": "amd64"}[runtime.GOARCH]
	if err := checkStatic(staticBinary(t), other); err == nil || !strings.Contains(err.Error(), "built for") {
		t.Fatalf("a %s binary accepted for linux/%s: %v", runtime.GOARCH, other, err)
	}
}

func readTarEntry(t *testing.T, path, name string) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err != nil {
			t.Fatalf("%s not in %s: %v", name, path, err)
		}
		if h.Name == name {
			b, _ := io.ReadAll(tr)
			return b
		}
	}
}

// TestBuildFailureIsAnError: a cmd that does not compile fails the run
// (after the others are built) instead of being skipped.
func TestBuildFailureIsAnError(t *testing.T) {
	o := options{tag: "t", out: t.TempDir(), binDir: t.TempDir(), registry: "docker.io/ambient", cmdDir: "testdata/cmd", build: true, platforms: []string{runtime.GOARCH}}
	err := run(o)
	if err == nil || !strings.Contains(err.Error(), "broken: build failed") {
		t.Fatalf("run = %v, want the broken cmd reported", err)
	}
	if _, err := os.Stat(filepath.Join(o.out, "hello.tar")); err != nil {
		t.Fatalf("the cmd that builds was not imaged: %v", err)
	}
}

// writeImage is the single-image path of buildComponent (the host
// architecture, docker-archive) for the rootfs tests.
func writeImage(bin, cmdName, ref, path, version string) (v1.Hash, error) {
	img, err := buildImage(bin, cmdName, version, runtime.GOARCH, "/")
	if err != nil {
		return v1.Hash{}, err
	}
	if err := writeTarball(img, ref, path); err != nil {
		return v1.Hash{}, err
	}
	return img.Digest()
}

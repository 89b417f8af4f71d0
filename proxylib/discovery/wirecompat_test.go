package discovery

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"

	_ "github.com/ambientmesh/ambient/proxylib/caclient/capb"
	_ "github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	_ "github.com/ambientmesh/ambient/proxylib/discovery/workloadapi/security"
)

// istioModule is an Istio version known to build here (test/interop uses
// it); its .proto files are read from the module cache when present.
const istioModule = "istio.io/istio@v0.0.0-20250506181944-c2e9871f340c"

type protoField struct {
	number   int
	repeated bool
}

var (
	scopeRe = regexp.MustCompile(`^\s*(message|enum|oneof)\s+(\w+)\s*\{`)
	fieldRe = regexp.MustCompile(`^\s*(repeated\s+)?(map<[^>]+>|[\w.]+)\s+(\w+)\s*=\s*(\d+)`)
	valueRe = regexp.MustCompile(`^\s*(\w+)\s*=\s*(-?\d+)\s*;`)
)

// parseProto extracts message fields and enum values (by full name) from a
// .proto file; enough of the grammar for Istio's workload API files.
func parseProto(t *testing.T, path string) (fields map[string]map[string]protoField, enums map[string]map[string]int) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatalf("Istio proto missing from the downloaded module: %v", err)
	}
	defer f.Close()
	fields, enums = map[string]map[string]protoField{}, map[string]map[string]int{}
	type scope struct{ kind, name string }
	var stack []scope
	pkg := ""
	full := func() string {
		parts := []string{pkg}
		for _, s := range stack {
			if s.kind != "oneof" {
				parts = append(parts, s.name)
			}
		}
		return strings.Join(parts, ".")
	}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if i := strings.Index(line, "//"); i >= 0 {
			line = line[:i]
		}
		if strings.HasPrefix(strings.TrimSpace(line), "package ") {
			pkg = strings.TrimSuffix(strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(line), "package ")), ";")
			continue
		}
		if m := scopeRe.FindStringSubmatch(line); m != nil {
			stack = append(stack, scope{m[1], m[2]})
			continue
		}
		if strings.Contains(line, "}") && len(stack) > 0 && !strings.Contains(line, "{") {
			stack = stack[:len(stack)-1]
			continue
		}
		if len(stack) == 0 || strings.Contains(line, "reserved") {
			continue
		}
		cur := stack[len(stack)-1]
		switch {
		case cur.kind == "enum":
			if m := valueRe.FindStringSubmatch(line); m != nil {
				n, _ := strconv.Atoi(m[2])
				if enums[full()] == nil {
					enums[full()] = map[string]int{}
				}
				enums[full()][m[1]] = n
			}
		default:
			if m := fieldRe.FindStringSubmatch(line); m != nil {
				n, _ := strconv.Atoi(m[4])
				if fields[full()] == nil {
					fields[full()] = map[string]protoField{}
				}
				fields[full()][m[3]] = protoField{number: n, repeated: m[1] != "" || strings.HasPrefix(m[2], "map<")}
			}
		}
	}
	return fields, enums
}

// istioSource downloads (once; the module cache keeps it) the Istio module
// whose .proto files are the reference, and returns its directory. A
// missing reference fails the test in CI (CI=true) and skips it only on a
// machine that cannot reach the module proxy.
func istioSource(t *testing.T) string {
	t.Helper()
	return moduleSource(t, istioModule, t.TempDir()) // outside this module: go.mod and go.sum stay untouched
}

// moduleSource downloads module (path@version, or a path this module
// requires when dir is inside it) and returns its directory.
func moduleSource(t *testing.T, module, dir string) string {
	t.Helper()
	cmd := exec.Command("go", "mod", "download", "-json", module)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GOFLAGS=-mod=mod")
	out, err := cmd.Output()
	var mod struct{ Dir, Error string }
	if err == nil {
		err = json.Unmarshal(out, &mod)
	}
	if err == nil && mod.Error != "" {
		err = errors.New(mod.Error)
	}
	if err == nil && mod.Dir == "" {
		err = errors.New("no directory reported")
	}
	if err != nil {
		msg := fmt.Sprintf("downloading %s (the reference protos): %v %s", module, err, out)
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	return mod.Dir
}

// TestWireCompatibleWithIstio checks that every message field and enum
// value of Istio's workload API exists in ours with the same name, number
// and cardinality, so either side decodes the other's resources.
func TestWireCompatibleWithIstio(t *testing.T) {
	dir := filepath.Join(istioSource(t), "pkg", "workloadapi")
	checked := 0
	for _, file := range []string{"workload.proto", filepath.Join("security", "authorization.proto")} {
		checked += compareProto(t, filepath.Join(dir, file))
	}
	if checked < 50 {
		t.Fatalf("only %d fields/values compared; parser broken?", checked)
	}
	t.Logf("%d fields and enum values match Istio's", checked)
}

// compareProto checks every message field and enum value of one Istio
// .proto file against our registered descriptors; it returns how many.
func compareProto(t *testing.T, file string) int {
	t.Helper()
	checked := 0
	fields, enums := parseProto(t, file)
	if len(fields) == 0 {
		t.Fatalf("%s: parsed no messages", file)
	}
	for msg, fs := range fields {
		d, err := protoregistry.GlobalFiles.FindDescriptorByName(protoreflect.FullName(msg))
		if err != nil {
			t.Errorf("message %s missing: %v", msg, err)
			continue
		}
		md := d.(protoreflect.MessageDescriptor)
		for name, want := range fs {
			got := md.Fields().ByName(protoreflect.Name(name))
			if got == nil {
				t.Errorf("%s.%s missing", msg, name)
				continue
			}
			if int(got.Number()) != want.number || (got.Cardinality() == protoreflect.Repeated) != want.repeated {
				t.Errorf("%s.%s: number %d repeated %v, Istio has %d %v", msg, name, got.Number(), got.Cardinality() == protoreflect.Repeated, want.number, want.repeated)
			}
			checked++
		}
	}
	for enum, vals := range enums {
		d, err := protoregistry.GlobalFiles.FindDescriptorByName(protoreflect.FullName(enum))
		if err != nil {
			t.Errorf("enum %s missing: %v", enum, err)
			continue
		}
		ed := d.(protoreflect.EnumDescriptor)
		for name, n := range vals {
			v := ed.Values().ByName(protoreflect.Name(name))
			if v == nil || int(v.Number()) != n {
				t.Errorf("%s.%s: want %d", enum, name, n)
			}
			checked++
		}
	}
	return checked
}

// TestCAWireCompatibleWithIstio holds our CA service to Istio's
// istio.v1.auth.IstioCertificateService (istio.io/api at the version
// go.mod requires, security/v1alpha1/ca.proto): the messages' fields and
// numbers, and the service's method with its request and response types.
func TestCAWireCompatibleWithIstio(t *testing.T) {
	file := filepath.Join(moduleSource(t, "istio.io/api", "."), "security", "v1alpha1", "ca.proto")
	if n := compareProto(t, file); n < 4 {
		t.Fatalf("only %d fields compared in %s; parser broken?", n, file)
	}
	src, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	rpc := regexp.MustCompile(`(?m)^\s*rpc\s+(\w+)\s*\(\s*(\w+)\s*\)\s*returns\s*\(\s*(\w+)\s*\)`).FindAllStringSubmatch(string(src), -1)
	if len(rpc) == 0 {
		t.Fatalf("%s: no rpc parsed", file)
	}
	d, err := protoregistry.GlobalFiles.FindDescriptorByName("istio.v1.auth.IstioCertificateService")
	if err != nil {
		t.Fatalf("service istio.v1.auth.IstioCertificateService missing: %v", err)
	}
	sd := d.(protoreflect.ServiceDescriptor)
	for _, m := range rpc {
		md := sd.Methods().ByName(protoreflect.Name(m[1]))
		if md == nil {
			t.Errorf("rpc %s missing", m[1])
			continue
		}
		if in, out := string(md.Input().Name()), string(md.Output().Name()); in != m[2] || out != m[3] {
			t.Errorf("rpc %s(%s) returns (%s), Istio has (%s) returns (%s)", m[1], in, out, m[2], m[3])
		}
	}
}

// Package proctest runs the mesh's proxies as real processes in test
// network namespaces: a control plane serving delta xDS and the CA on the
// loopback of the proxy's namespace (as the Service would), and a buffer
// collecting a process's output.
package proctest

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	discoverypb "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	cachetypes "github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/proto"

	cpdiscovery "github.com/ambientmesh/ambient/controllers/discovery"

	"github.com/ambientmesh/ambient/proxylib/ca"
	"github.com/ambientmesh/ambient/proxylib/caclient/capb"
	"github.com/ambientmesh/ambient/proxylib/caclient/capb/caservice"
	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/hbone/hbonetest"
	"github.com/ambientmesh/ambient/proxylib/identity"
	"github.com/ambientmesh/ambient/proxylib/netnsutil"
)

// Token is the bearer token the processes present (the control plane
// accepts any).
const Token = "upgrade-test-token"

// ControlPlane serves delta xDS and the CA to proxy processes.
type ControlPlane struct {
	CA *hbonetest.CA
	// Roots is the path of the trust bundle file.
	Roots string
	srv   *grpc.Server
	// Addresses is the control plane's own per-proxy cache: a sidecar
	// gets its scope (as the real server scopes it, from the node's
	// claims here: this server does not authenticate).
	Addresses *cpdiscovery.AddressCache
	// caches serve authorizations and L7 resources as the real server
	// does: whole, but scoped for sidecars.
	caches map[string]*cpdiscovery.SidecarScopedCache
	// Unscoped names pods whose streams are served unscoped (every
	// address, as sidecars were before their scope existed).
	Unscoped map[string]bool
	mu       sync.Mutex
	streams  map[int64]string          // stream -> pod
	pushed   map[string]map[string]int // pod -> type URL -> bytes pushed
}

// RootNamespace is the mesh root namespace this control plane sends (its
// Mesh resource) and scopes sidecars with.
const RootNamespace = "ambient-system"

// NewControlPlane starts a control plane whose serving certificate is for
// ambient-controlplane.ambient-system.svc; the CA signs whatever identity
// is asked.
func NewControlPlane(t *testing.T) *ControlPlane {
	m := hbonetest.NewCA(t, "cluster.local")
	cp := &ControlPlane{CA: m, Addresses: cpdiscovery.NewAddressCache(), Unscoped: map[string]bool{},
		streams: map[int64]string{}, pushed: map[string]map[string]int{}, caches: map[string]*cpdiscovery.SidecarScopedCache{
			discovery.AuthorizationType: cpdiscovery.NewSidecarScopedCache(discovery.AuthorizationType),
			discovery.L7ResourceType:    cpdiscovery.NewSidecarScopedCache(discovery.L7ResourceType),
		}}
	for _, c := range cp.caches {
		c.SetRootNamespace(RootNamespace)
	}
	settings := discovery.MeshSettings{RootNamespace: RootNamespace}
	mesh, err := discovery.MeshResource(settings)
	if err != nil {
		t.Fatal(err)
	}
	cp.Resource(t, discovery.L7ResourceType, discovery.MeshKey(settings), mesh)
	cert := m.IssueCert(t, hbonetest.CertOptions{DNSNames: []string{"ambient-controlplane.ambient-system.svc"}, NotAfter: time.Now().Add(time.Hour)})
	cp.Roots = filepath.Join(SharedDir(t), "root-cert.pem")
	if err := os.WriteFile(cp.Roots, ca.EncodeCerts(m.Root), 0o644); err != nil {
		t.Fatal(err)
	}
	mux := &cachev3.MuxCache{
		Classify:      func(r *cachev3.Request) string { return r.GetTypeUrl() },
		ClassifyDelta: func(r *cachev3.DeltaRequest) string { return r.GetTypeUrl() },
		Caches:        map[string]cachev3.Cache{},
	}
	for typ, c := range cp.caches {
		mux.Caches[typ] = c
	}
	mux.Caches[discovery.AddressType] = cp.Addresses
	cp.srv = grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{*cert}, MinVersion: tls.VersionTLS12})))
	discoverypb.RegisterAggregatedDiscoveryServiceServer(cp.srv, serverv3.NewServer(context.Background(), mux, cp.callbacks()))
	caservice.RegisterIstioCertificateServiceServer(cp.srv, &caService{ca: m})
	t.Cleanup(cp.srv.Stop)
	return cp
}

// SharedDir is a temporary directory other users may read and enter
// (processes run as the sidecar's or another unprivileged user).
func SharedDir(t *testing.T) string {
	dir := t.TempDir()
	for _, d := range []string{filepath.Dir(dir), dir} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// Executable is a copy of the running test binary in a SharedDir, so an
// unprivileged user may execute it.
func Executable(t *testing.T) string { return Copy(t, os.Args[0]) }

// Copy copies the program at path into a SharedDir, so an unprivileged
// user may execute it.
func Copy(t *testing.T, path string) string {
	bin, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	exe := filepath.Join(SharedDir(t), filepath.Base(path))
	if err := os.WriteFile(exe, bin, 0o755); err != nil {
		t.Fatal(err)
	}
	return exe
}

// ServeIn listens on 127.0.0.1:15010 and :15012 inside a proxy pod's namespace.
func (cp *ControlPlane) ServeIn(t *testing.T, ns *os.File) {
	for _, port := range []int{15010, 15012} {
		ln, err := netnsutil.ListenTCP(ns, fmt.Sprintf("127.0.0.1:%d", port), netnsutil.SocketOptions{})
		if err != nil {
			t.Fatal(err)
		}
		go cp.srv.Serve(ln)
	}
}

// Workload publishes w.
func (cp *ControlPlane) Workload(t *testing.T, w *workloadapi.Workload) {
	cp.Address(t, w.Uid, &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: w}})
}

// Address publishes a workload or service under name.
func (cp *ControlPlane) Address(t testing.TB, name string, a *workloadapi.Address) {
	if err := cp.Addresses.UpdateResources(map[string]cachetypes.Resource{name: a}, nil); err != nil {
		t.Fatal(err)
	}
}

// Resource publishes an authorization or L7 resource under name.
func (cp *ControlPlane) Resource(t testing.TB, typeURL, name string, m proto.Message) {
	if err := cp.caches[typeURL].UpdateResources(map[string]cachetypes.Resource{name: m}, nil); err != nil {
		t.Fatal(err)
	}
}

// callbacks scope each stream from its node's claims (role, node, pod) and
// count the Address bytes pushed to it.
func (cp *ControlPlane) callbacks() serverv3.Callbacks {
	return serverv3.CallbackFuncs{
		StreamDeltaRequestFunc: func(id int64, req *discoverypb.DeltaDiscoveryRequest) error {
			if n := req.GetNode(); n != nil {
				md := n.GetMetadata().GetFields()
				role, pod := md[discovery.MetaRole].GetStringValue(), md[discovery.MetaPodName].GetStringValue()
				cp.mu.Lock()
				cp.streams[id] = pod
				unscoped := cp.Unscoped[pod]
				cp.mu.Unlock()
				if unscoped {
					return nil
				}
				req.Node = cpdiscovery.WithScope(n, role, md[discovery.MetaNodeName].GetStringValue())
				if role == discovery.RoleSidecar {
					req.Node = cpdiscovery.WithPodScope(req.Node, "Kubernetes",
						md[discovery.MetaPodNamespace].GetStringValue(), md[discovery.MetaPodName].GetStringValue())
				}
			}
			return nil
		},
		StreamDeltaResponseFunc: func(id int64, _ *discoverypb.DeltaDiscoveryRequest, resp *discoverypb.DeltaDiscoveryResponse) {
			n := 0
			for _, r := range resp.GetResources() {
				n += proto.Size(r)
			}
			cp.mu.Lock()
			pod := cp.streams[id]
			if cp.pushed[pod] == nil {
				cp.pushed[pod] = map[string]int{}
			}
			cp.pushed[pod][resp.GetTypeUrl()] += n
			cp.mu.Unlock()
		},
	}
}

// PushedTo is the Address bytes pushed to pod's proxy so far.
func (cp *ControlPlane) PushedTo(pod string) int { return cp.PushedOf(pod, discovery.AddressType) }

// PushedOf is the bytes of resources of typeURL pushed to pod's proxy so far.
func (cp *ControlPlane) PushedOf(pod, typeURL string) int {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	return cp.pushed[pod][typeURL]
}

type caService struct {
	caservice.UnimplementedIstioCertificateServiceServer
	ca *hbonetest.CA
}

func (s *caService) CreateCertificate(ctx context.Context, req *capb.IstioCertificateRequest) (*capb.IstioCertificateResponse, error) {
	id, err := identity.Parse(req.GetMetadata().GetFields()["ImpersonatedIdentity"].GetStringValue())
	if err != nil {
		return nil, err
	}
	chain, err := s.ca.Client().Sign(ctx, []byte(req.GetCsr()), id, time.Duration(req.GetValidityDuration())*time.Second)
	if err != nil {
		return nil, err
	}
	resp := &capb.IstioCertificateResponse{}
	for _, c := range chain {
		resp.CertChain = append(resp.CertChain, string(ca.EncodeCerts(c)))
	}
	return resp, nil
}

// LogBuffer collects a process's output and echoes it to the test log.
type LogBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
	t   *testing.T
	pfx string
}

// NewLogBuffer logs each write to t, prefixed.
func NewLogBuffer(t *testing.T, prefix string) *LogBuffer { return &LogBuffer{t: t, pfx: prefix} }

func (b *LogBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.t.Logf("%s: %s", b.pfx, strings.TrimRight(string(p), "\n"))
	return b.buf.Write(p)
}

// Prefix is the name the buffer's lines are logged under.
func (b *LogBuffer) Prefix() string { return b.pfx }

// Contains reports whether one line of output contains s.
func (b *LogBuffer) Contains(s string) bool { return b.HasLine(s) }

// HasLine reports whether one line of output contains every part.
func (b *LogBuffer) HasLine(parts ...string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	for line := range strings.Lines(b.buf.String()) {
		all := true
		for _, p := range parts {
			all = all && strings.Contains(line, p)
		}
		if all {
			return true
		}
	}
	return false
}

// RunMain is TestMain for a test binary doubling as the command it tests:
// re-executed with env set to 1 it runs main instead of the tests, so the
// processes a test starts are the real program.
func RunMain(m *testing.M, env string, main func()) {
	if os.Getenv(env) == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

package discovery

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	discoverypb "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	cachetypes "github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"github.com/go-logr/logr/testr"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"

	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi/security"
)

// testServer is a real go-control-plane delta ADS server over TLS.
type testServer struct {
	addr    string
	caches  map[string]*cachev3.LinearCache
	grpc    *grpc.Server
	mu      sync.Mutex
	reqs    []*discoverypb.DeltaDiscoveryRequest
	tokens  []string
	tlsConf *tls.Config
}

func newTestPKI(t *testing.T) (serverTLS, clientTLS *tls.Config) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		DNSNames:    []string{"ambient-controlplane.ambient-system.svc"},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, IsCA: true, BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	serverTLS = &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}, MinVersion: tls.VersionTLS13}
	clientTLS = &tls.Config{RootCAs: pool, ServerName: "ambient-controlplane.ambient-system.svc", MinVersion: tls.VersionTLS13}
	return serverTLS, clientTLS
}

func startTestServer(t *testing.T, ts *testServer, addr string) {
	t.Helper()
	mux := &cachev3.MuxCache{
		Classify:      func(r *cachev3.Request) string { return r.GetTypeUrl() },
		ClassifyDelta: func(r *cachev3.DeltaRequest) string { return r.GetTypeUrl() },
		Caches:        map[string]cachev3.Cache{},
	}
	for typ, c := range ts.caches {
		mux.Caches[typ] = c
	}
	cb := serverv3.CallbackFuncs{
		DeltaStreamOpenFunc: func(ctx context.Context, _ int64, _ string) error {
			md, _ := metadata.FromIncomingContext(ctx)
			ts.mu.Lock()
			ts.tokens = append(ts.tokens, md.Get("authorization")...)
			ts.mu.Unlock()
			return nil
		},
		StreamDeltaRequestFunc: func(_ int64, r *discoverypb.DeltaDiscoveryRequest) error {
			ts.mu.Lock()
			ts.reqs = append(ts.reqs, r)
			ts.mu.Unlock()
			return nil
		},
	}
	srv := serverv3.NewServer(context.Background(), mux, cb)
	ts.grpc = grpc.NewServer(grpc.Creds(credentials.NewTLS(ts.tlsConf)))
	discoverypb.RegisterAggregatedDiscoveryServiceServer(ts.grpc, srv)
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	ts.addr = lis.Addr().String()
	go func() { _ = ts.grpc.Serve(lis) }()
}

func (ts *testServer) requests() []*discoverypb.DeltaDiscoveryRequest {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	return append([]*discoverypb.DeltaDiscoveryRequest(nil), ts.reqs...)
}

func workloadRes(uid, ns, ip string) *workloadapi.Address {
	return &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: &workloadapi.Workload{
		Uid: uid, Name: uid, Namespace: ns, Addresses: [][]byte{netip.MustParseAddr(ip).AsSlice()},
		TunnelProtocol: workloadapi.TunnelProtocol_HBONE,
		Services:       map[string]*workloadapi.PortList{"ns/svc.ns.svc.cluster.local": {Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}}}},
	}}}
}

func serviceRes(ns, host, vip string) *workloadapi.Address {
	return &workloadapi.Address{Type: &workloadapi.Address_Service{Service: &workloadapi.Service{
		Name: "svc", Namespace: ns, Hostname: host,
		Addresses: []*workloadapi.NetworkAddress{{Address: netip.MustParseAddr(vip).AsSlice()}},
		Ports:     []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}},
	}}}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestClientSyncsUpdatesNacksAndResumes(t *testing.T) {
	serverTLS, clientTLS := newTestPKI(t)
	ts := &testServer{tlsConf: serverTLS, caches: map[string]*cachev3.LinearCache{
		AddressType:       cachev3.NewLinearCache(AddressType),
		AuthorizationType: cachev3.NewLinearCache(AuthorizationType),
	}}
	addrs := ts.caches[AddressType]
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(addrs.UpdateResource("c//Pod/ns/a", workloadRes("c//Pod/ns/a", "ns", "10.0.0.1")))
	must(addrs.UpdateResource("ns/svc.ns.svc.cluster.local", serviceRes("ns", "svc.ns.svc.cluster.local", "10.96.0.10")))
	startTestServer(t, ts, "127.0.0.1:0")

	state := NewState(AddressType, AuthorizationType)
	var changes []Change
	var chMu sync.Mutex
	state.OnChange(func(c Change) { chMu.Lock(); changes = append(changes, c); chMu.Unlock() })
	client := NewClient(ClientConfig{
		Address: ts.addr, TLS: clientTLS, Token: func() (string, error) { return "tok", nil },
		Node:       NodeInfo{NodeName: "n1", PodName: "zt", PodNamespace: "ambient-system", Role: RoleZtunnel},
		MinBackoff: 20 * time.Millisecond, MaxBackoff: 100 * time.Millisecond, Log: testr.New(t),
	}, state)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = client.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()

	// Initial sync: Ready even though there are no policies at all.
	waitFor(t, "ready", state.Ready)
	if w := state.WorkloadByAddr(netip.MustParseAddr("10.0.0.1")); w == nil || w.Uid != "c//Pod/ns/a" {
		t.Fatalf("workload by address = %v", w)
	}
	if s := state.ServiceByVIP(netip.MustParseAddr("10.96.0.10")); s == nil || s.Hostname != "svc.ns.svc.cluster.local" {
		t.Fatalf("service by VIP = %v", s)
	}
	if eps := state.Endpoints("ns/svc.ns.svc.cluster.local"); len(eps) != 1 {
		t.Fatalf("endpoints = %d, want 1", len(eps))
	}
	ts.mu.Lock()
	if len(ts.tokens) == 0 || ts.tokens[0] != "Bearer tok" {
		t.Fatalf("token not sent: %v", ts.tokens)
	}
	if n := ts.reqs[0].GetNode(); n.GetId() != "ztunnel~zt.ambient-system" || n.GetMetadata().GetFields()[MetaNodeName].GetStringValue() != "n1" {
		t.Fatalf("node = %v", n)
	}
	ts.mu.Unlock()

	// Update: the address moves, a policy appears, the service goes away.
	must(addrs.UpdateResource("c//Pod/ns/a", workloadRes("c//Pod/ns/a", "ns", "10.0.0.2")))
	must(ts.caches[AuthorizationType].UpdateResource("ns/deny", &security.Authorization{Name: "deny", Namespace: "ns", Scope: security.Scope_NAMESPACE, Action: security.Action_DENY}))
	must(addrs.DeleteResource("ns/svc.ns.svc.cluster.local"))
	waitFor(t, "update", func() bool {
		return state.WorkloadByAddr(netip.MustParseAddr("10.0.0.2")) != nil &&
			state.ServiceByVIP(netip.MustParseAddr("10.96.0.10")) == nil &&
			len(state.PoliciesFor(state.WorkloadByUID("c//Pod/ns/a"))) == 1
	})
	if state.WorkloadByAddr(netip.MustParseAddr("10.0.0.1")) != nil {
		t.Fatal("old address still indexed")
	}

	// Hostile resource: a 3-byte IP is NACKed and nothing of it applied.
	bad := workloadRes("c//Pod/ns/bad", "ns", "10.0.0.9")
	bad.GetWorkload().Addresses = [][]byte{{1, 2, 3}}
	must(addrs.UpdateResource("c//Pod/ns/bad", bad))
	waitFor(t, "nack", func() bool {
		for _, r := range ts.requests() {
			if r.ErrorDetail != nil {
				return true
			}
		}
		return false
	})
	if state.WorkloadByUID("c//Pod/ns/bad") != nil {
		t.Fatal("invalid workload was applied")
	}
	must(addrs.DeleteResource("c//Pod/ns/bad"))

	// Restart the server with changed content: the client resumes with its
	// versions and ends up with exactly the server's view.
	ts.grpc.Stop()
	must(addrs.DeleteResource("c//Pod/ns/a"))
	must(addrs.UpdateResource("c//Pod/ns/b", workloadRes("c//Pod/ns/b", "ns", "10.0.0.3")))
	ts.mu.Lock()
	ts.reqs = nil
	ts.mu.Unlock()
	startTestServer(t, ts, ts.addr)
	waitFor(t, "resync", func() bool {
		return state.WorkloadByUID("c//Pod/ns/a") == nil && state.WorkloadByUID("c//Pod/ns/b") != nil
	})
	resumed := false
	for _, r := range ts.requests() {
		if r.TypeUrl == AddressType && len(r.InitialResourceVersions) > 0 {
			if _, ok := r.InitialResourceVersions["c//Pod/ns/a"]; ok {
				resumed = true
			}
		}
	}
	if !resumed {
		t.Fatal("reconnect did not send initial_resource_versions")
	}
	if !state.Ready() || state.Policy("ns/deny") == nil {
		t.Fatal("state lost readiness or policies across reconnect")
	}
	chMu.Lock()
	defer chMu.Unlock()
	if len(changes) < 3 {
		t.Fatalf("change notifications = %d", len(changes))
	}
}

var _ cachetypes.Resource = (*workloadapi.Address)(nil)

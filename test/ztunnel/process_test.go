package ztunnel

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoverypb "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	cachetypes "github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	discoverycontroller "github.com/ambientmesh/ambient/controllers/discovery"
	"github.com/ambientmesh/ambient/proxylib/ca"
	"github.com/ambientmesh/ambient/proxylib/caclient/capb"
	"github.com/ambientmesh/ambient/proxylib/caclient/capb/caservice"
	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi/security"
	"github.com/ambientmesh/ambient/proxylib/hbone/hbonetest"
	"github.com/ambientmesh/ambient/proxylib/identity"
	"github.com/ambientmesh/ambient/proxylib/inpod"
	"github.com/ambientmesh/ambient/proxylib/netnsutil"
	"github.com/ambientmesh/ambient/test/meshtest"
)

const testToken = "test-node-token"

var netip0 netip.AddrPort

func mustAddrPort(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

var (
	buildOnce sync.Once
	binDir    string // removed by TestMain
	binPath   string
	buildErr  error
)

// ztunnelBinary builds cmd/ztunnel once per test run.
// TestMain removes the ztunnel binary built for the package's tests.
func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

func ztunnelBinary(t *testing.T) string {
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "ztunnel-bin-")
		if err != nil {
			buildErr = err
			return
		}
		binDir, binPath = dir, filepath.Join(dir, "ztunnel")
		// Built as the image builds it, so memory figures are what ships.
		// Static (CGO_ENABLED=0), as the Makefile builds the images: a
		// cgo build maps libc and ld.so too, +1.5 MB of resident pages.
		build := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w", "-o", binPath, "github.com/ambientmesh/ambient/cmd/ztunnel")
		build.Env = append(os.Environ(), "CGO_ENABLED=0")
		out, err := build.CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

// xdsControlPlane is the test control plane for real ztunnel processes: a
// go-control-plane delta ADS server of hand-built resources (addresses in
// the control plane's own AddressCache, which scopes each ztunnel to its
// node, here trusting the node the ztunnel names, as the test server does
// not authenticate; authorizations in a linear cache) and an Istio-shaped CA backed by a real proxylib/ca Authority,
// both over TLS with a server certificate from the mesh CA.
type xdsControlPlane struct {
	t      *testing.T
	ca     *hbonetest.CA
	caches map[string]*cachev3.LinearCache
	addrs  *discoverycontroller.AddressCache
	srv    *grpc.Server
	served map[string]bool // node namespaces already listening
	tls    *tls.Config
	roots  string // trust bundle file
	mu     sync.Mutex
	down   bool
	signer *hbonetest.CA // signs workload certificates instead of ca when set (root rotation)
	// bySigner: serials (hex) of the leaves signer issued.
	bySigner map[string]bool
}

// signingCA is the CA that signs workload certificates now.
func (cp *xdsControlPlane) signingCA() *hbonetest.CA {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	if cp.signer != nil {
		return cp.signer
	}
	return cp.ca
}

func newXDSControlPlane(t *testing.T, m *hbonetest.CA) *xdsControlPlane {
	cp := &xdsControlPlane{t: t, ca: m, addrs: discoverycontroller.NewAddressCache(), caches: map[string]*cachev3.LinearCache{
		discovery.AuthorizationType: cachev3.NewLinearCache(discovery.AuthorizationType),
		discovery.L7ResourceType:    cachev3.NewLinearCache(discovery.L7ResourceType), // sidecars subscribe to routes and L7 policies
	}}
	serverCert := m.IssueCert(t, hbonetest.CertOptions{DNSNames: []string{"ambient-controlplane.ambient-system.svc"}, NotAfter: time.Now().Add(time.Hour)})
	cp.tls = &tls.Config{Certificates: []tls.Certificate{*serverCert}, MinVersion: tls.VersionTLS12}
	cp.roots = filepath.Join(t.TempDir(), "root-cert.pem")
	if err := os.WriteFile(cp.roots, ca.EncodeCerts(m.Root), 0o644); err != nil {
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
	mux.Caches[discovery.AddressType] = cp.addrs
	var nodes sync.Map // stream id -> scoped node
	scope := serverv3.CallbackFuncs{StreamDeltaRequestFunc: func(id int64, req *discoverypb.DeltaDiscoveryRequest) error {
		if md := req.GetNode().GetMetadata().GetFields(); md != nil {
			nodes.Store(id, discoverycontroller.WithScope(req.GetNode(), md[discovery.MetaRole].GetStringValue(), md[discovery.MetaNodeName].GetStringValue()))
		}
		if n, ok := nodes.Load(id); ok {
			req.Node = n.(*core.Node)
		}
		return nil
	}}
	cp.srv = grpc.NewServer(grpc.Creds(credentials.NewTLS(cp.tls)))
	discoverypb.RegisterAggregatedDiscoveryServiceServer(cp.srv, serverv3.NewServer(context.Background(), mux, scope))
	caservice.RegisterIstioCertificateServiceServer(cp.srv, &testCAService{cp: cp})
	t.Cleanup(cp.srv.Stop)
	return cp
}

// serveIn listens on 127.0.0.1:15010 and :15012 inside ns (a node).
func (cp *xdsControlPlane) serveIn(ns *os.File) {
	ino, err := netnsutil.Inode(ns)
	if err != nil {
		cp.t.Fatal(err)
	}
	key := fmt.Sprint(ino)
	cp.mu.Lock()
	if cp.served == nil {
		cp.served = map[string]bool{}
	}
	done := cp.served[key]
	cp.served[key] = true
	cp.mu.Unlock()
	if done {
		return
	}
	for _, port := range []int{15010, 15012} {
		ln, err := netnsutil.ListenTCP(ns, fmt.Sprintf("127.0.0.1:%d", port), netnsutil.SocketOptions{})
		if err != nil {
			cp.t.Fatal(err)
		}
		go cp.srv.Serve(ln)
	}
}

func (cp *xdsControlPlane) set(typeURL, name string, m proto.Message) {
	if typeURL == discovery.AddressType {
		if err := cp.addrs.UpdateResources(map[string]cachetypes.Resource{name: m}, nil); err != nil {
			cp.t.Fatal(err)
		}
		return
	}
	if err := cp.caches[typeURL].UpdateResource(name, m); err != nil {
		cp.t.Fatal(err)
	}
}

func (cp *xdsControlPlane) del(typeURL, name string) {
	if typeURL == discovery.AddressType {
		if err := cp.addrs.UpdateResources(nil, []string{name}); err != nil {
			cp.t.Fatal(err)
		}
		return
	}
	if err := cp.caches[typeURL].DeleteResource(name); err != nil {
		cp.t.Fatal(err)
	}
}

func (cp *xdsControlPlane) workload(w *workloadapi.Workload) {
	cp.set(discovery.AddressType, w.Uid, &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: proto.Clone(w).(*workloadapi.Workload)}})
}

func (cp *xdsControlPlane) policy(p *security.Authorization) {
	cp.set(discovery.AuthorizationType, discovery.PolicyKey(p.Namespace, p.Name), p)
}

type testCAService struct {
	caservice.UnimplementedIstioCertificateServiceServer
	cp *xdsControlPlane
}

func (s *testCAService) CreateCertificate(ctx context.Context, req *capb.IstioCertificateRequest) (*capb.IstioCertificateResponse, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	if got := md.Get("authorization"); len(got) != 1 || got[0] != "Bearer "+testToken {
		return nil, status.Error(codes.Unauthenticated, "bad token")
	}
	id, err := identity.Parse(req.GetMetadata().GetFields()["ImpersonatedIdentity"].GetStringValue())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	signer := s.cp.signingCA()
	chain, err := signer.Client().Sign(ctx, []byte(req.GetCsr()), id, time.Duration(req.GetValidityDuration())*time.Second)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	s.cp.mu.Lock()
	if signer == s.cp.signer {
		if s.cp.bySigner == nil {
			s.cp.bySigner = map[string]bool{}
		}
		s.cp.bySigner[chain[0].SerialNumber.Text(16)] = true
	}
	s.cp.mu.Unlock()
	resp := &capb.IstioCertificateResponse{}
	for _, c := range chain {
		resp.CertChain = append(resp.CertChain, string(ca.EncodeCerts(c)))
	}
	return resp, nil
}

// ztunnelProcess is a real cmd/ztunnel running in a node namespace.
type ztunnelProcess struct {
	cmd    *exec.Cmd
	sock   string
	node   *meshtest.Node
	out    *syncBuffer
	agent  *inpod.Conn
	nodeNS *os.File
}

type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
	t   *testing.T
	pfx string
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.t.Logf("%s: %s", b.pfx, strings.TrimRight(string(p), "\n"))
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// startZtunnel runs the binary inside n's namespace against cp.
func startZtunnel(t *testing.T, cp *xdsControlPlane, n *meshtest.Node, extra ...string) *ztunnelProcess {
	nsf, err := n.Open()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nsf.Close() })
	cp.serveIn(nsf)
	dir := t.TempDir()
	token := filepath.Join(dir, "token")
	os.WriteFile(token, []byte(testToken), 0o600)
	z := &ztunnelProcess{sock: filepath.Join(dir, "ztunnel.sock"), node: n, out: &syncBuffer{t: t, pfx: n.NodeName}, nodeNS: nsf}
	args := append([]string{"netns", "exec", n.Name, ztunnelBinary(t),
		"-node-name", n.NodeName, "-xds-address", "127.0.0.1:15010", "-ca-address", "127.0.0.1:15012",
		"-xds-server-name", "ambient-controlplane.ambient-system.svc", "-ca-server-name", "ambient-controlplane.ambient-system.svc",
		"-token-path", token, "-root-cert", cp.roots, "-zds-socket", z.sock, "-drain-grace", "2s"}, extra...)
	z.cmd = exec.Command("ip", args...)
	z.cmd.Stdout, z.cmd.Stderr = z.out, z.out
	if v := os.Getenv("ZTUNNEL_GOMAXPROCS"); v != "" { // perf experiments only
		z.cmd.Env = append(os.Environ(), "GOMAXPROCS="+v)
	}
	if err := z.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		z.cmd.Process.Kill()
		z.cmd.Wait()
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		z.agent, err = inpod.Dial(ctx, z.sock)
		cancel()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("ztunnel on %s never opened %s: %v", n.NodeName, z.sock, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Cleanup(func() { z.agent.Close() })
	return z
}

// adopt hands a pod to the process (what the node agent does).
func (z *ztunnelProcess) adopt(t testing.TB, m *meshtest.Mesh, p *meshtest.Pod) {
	f, err := p.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := m.Redirect.Install(f); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := z.agent.AddWorkload(ctx, p.UID, inpod.WorkloadInfo{Name: p.PodName, Namespace: p.Namespace, ServiceAccount: p.ServiceAccount}, f); err != nil {
		t.Fatal(err)
	}
}

func (z *ztunnelProcess) snapshotSent(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := z.agent.SnapshotSent(ctx); err != nil {
		t.Fatal(err)
	}
}

// ready asks :15021/healthz/ready from inside the node namespace.
func (z *ztunnelProcess) ready() bool {
	c := &http.Client{Timeout: time.Second, Transport: &http.Transport{DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
		return netnsutil.DialTCP(ctx, z.nodeNS, netip0, mustAddrPort("127.0.0.1:15021"), netnsutil.SocketOptions{})
	}}}
	resp, err := c.Get("http://127.0.0.1:15021/healthz/ready")
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == 200
}

// get fetches an HTTP endpoint of the process inside its node namespace.
func (z *ztunnelProcess) get(t *testing.T, addr, path string) string {
	t.Helper()
	b, err := z.request(addr, path, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// request GETs path from addr inside the node namespace; timeout 0 waits
// as long as the answer takes (a CPU profile).
func (z *ztunnelProcess) request(addr, path string, timeout time.Duration) ([]byte, error) {
	c := &http.Client{Timeout: timeout, Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return netnsutil.DialTCP(ctx, z.nodeNS, netip0, mustAddrPort(addr), netnsutil.SocketOptions{})
	}}}
	resp, err := c.Get("http://" + addr + path)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	return io.ReadAll(resp.Body)
}

func (z *ztunnelProcess) waitLog(t *testing.T, parts ...string) {
	t.Helper()
	waitUntil(t, func() bool {
		for _, line := range strings.Split(z.out.String(), "\n") {
			ok := true
			for _, p := range parts {
				ok = ok && strings.Contains(line, p)
			}
			if ok {
				return true
			}
		}
		return false
	}, "ztunnel log line with %q", parts)
}

// processMesh: two nodes, each with a real ztunnel process.
type processMesh struct {
	*meshtest.Mesh
	cp      *xdsControlPlane
	zts     []*ztunnelProcess
	sleep   *meshtest.Pod
	httpbin *meshtest.Pod
}

func newProcessMesh(t *testing.T) *processMesh {
	m := meshtest.New(t, 0)
	pm := &processMesh{Mesh: m, cp: newXDSControlPlane(t, m.CA)}
	for _, name := range []string{"node1", "node2"} {
		n := &meshtest.Node{Node: m.Cluster.AddNode(name), NodeName: name}
		m.Nodes = append(m.Nodes, n)
		pm.zts = append(pm.zts, startZtunnel(t, pm.cp, n))
	}
	pm.sleep = pm.addProcessPod(0, "sleep-1", "sleep")
	pm.httpbin = pm.addProcessPod(1, "httpbin-1", "httpbin")
	pm.httpbin.ServeHTTP(t, 80)
	pm.httpbin.ServeTCP(t, 9000, meshtest.CountThenReply)
	pm.httpbin.ServeTCP(t, 9001, meshtest.Echo)
	for _, z := range pm.zts {
		z.snapshotSent(t)
	}
	return pm
}

func (pm *processMesh) addProcessPod(nodeIdx int, name, sa string) *meshtest.Pod {
	n := pm.Nodes[nodeIdx]
	np := n.AddPod(name)
	p := &meshtest.Pod{Pod: np, PodName: name, Namespace: "default", ServiceAccount: sa, Node: n, UID: discovery.PodUID(meshtest.ClusterID, "default", name)}
	p.Workload = &workloadapi.Workload{Uid: p.UID, Name: name, Namespace: "default", Addresses: [][]byte{np.IP.AsSlice()},
		TrustDomain: pm.CA.TrustDomain, ServiceAccount: sa, Node: n.NodeName, WorkloadName: strings.TrimRight(name, "-0123456789"),
		CanonicalName: strings.TrimRight(name, "-0123456789"), ClusterId: meshtest.ClusterID, TunnelProtocol: workloadapi.TunnelProtocol_HBONE}
	pm.cp.workload(p.Workload)
	pm.zts[nodeIdx].adopt(pm.T, pm.Mesh, p)
	return p
}

// TestProcessSleepToHTTPBin runs the seeds' first scenario through two real
// ztunnel processes with the xDS + CA test control plane, then a policy
// change and a SIGTERM drain (reliability cases 11 and 20).
func TestProcessSleepToHTTPBin(t *testing.T) {
	pm := newProcessMesh(t)
	waitUntil(t, func() bool { return pm.zts[0].ready() && pm.zts[1].ready() }, "both ztunnels ready")
	meshtest.ExpectOK(t, pm.sleep, pm.httpbin.Addr(80), "httpbin-1")
	pm.zts[0].waitLog(t, "outbound{id=", "proxy to "+pm.httpbin.Addr(80).String()+" using HBONE via "+pm.httpbin.IP.String()+":15008 type Direct")
	pm.zts[1].waitLog(t, "peer_id=spiffe://cluster.local/ns/default/sa/sleep}: got CONNECT request to "+pm.httpbin.Addr(80).String())

	t.Run("admin config_dump and metrics are served", func(t *testing.T) {
		dump := pm.zts[0].get(t, "127.0.0.1:15000", "/config_dump")
		for _, want := range []string{`"uid": "` + pm.sleep.UID + `"`, `"protocol": "HBONE"`, `"type": "Cert Chain"`, `"state": "Available"`, `"type": "CA"`} {
			if !strings.Contains(dump, want) {
				t.Errorf("config_dump lacks %s:\n%s", want, dump)
			}
		}
		metrics := pm.zts[1].get(t, "127.0.0.1:15020", "/metrics")
		if !strings.Contains(metrics, `istio_tcp_connections_opened_total{`) || !strings.Contains(metrics, `source_principal="spiffe://cluster.local/ns/default/sa/sleep"`) {
			t.Errorf("metrics lack the sleep connection:\n%s", metrics)
		}
	})

	outer := t // the restarted process must outlive this subtest
	t.Run("restart re-adopts running pods", func(t *testing.T) {
		old := pm.zts[1]
		old.cmd.Process.Kill()
		old.cmd.Wait()
		meshtest.ExpectRefused(t, pm.sleep, pm.httpbin.Addr(80))
		z := startZtunnel(outer, pm.cp, pm.httpbin.Node)
		pm.zts[1] = z
		// The node agent re-sends its snapshot; the pod was never restarted
		// and its server kept running.
		z.adopt(t, pm.Mesh, pm.httpbin)
		z.snapshotSent(t)
		waitUntil(t, z.ready, "restarted ztunnel ready")
		meshtest.ExpectOK(t, pm.sleep, pm.httpbin.Addr(80), "httpbin-1")
	})

	t.Run("deny policy over xDS refuses and closes open tunnels", func(t *testing.T) {
		c, err := pm.sleep.Dial(pm.httpbin.Addr(9001))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		roundTrip(t, c, "hello")
		deny := &security.Authorization{Name: "deny-sleep", Namespace: "default", Scope: security.Scope_NAMESPACE, Action: security.Action_DENY,
			Groups: []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{{Principals: []*security.StringMatch{meshtest.Exact(pm.sleep.ID().Principal())}}}}}}}}
		pm.cp.policy(deny)
		defer pm.cp.del(discovery.AuthorizationType, "default/deny-sleep")
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if n, err := c.Read(make([]byte, 8)); err == nil || n != 0 {
			t.Fatalf("tunnel still open after DENY (n=%d, err=%v)", n, err)
		}
		meshtest.ExpectRefused(t, pm.sleep, pm.httpbin.Addr(80))
		pm.zts[1].waitLog(t, "RBAC rejected conn="+pm.sleep.IP.String()+"(spiffe://cluster.local/ns/default/sa/sleep)->"+pm.httpbin.Addr(80).String())
	})

	t.Run("SIGTERM drains: in-flight finishes, new refused", func(t *testing.T) {
		waitUntil(t, func() bool { _, err := pm.sleep.Get(pm.httpbin.Addr(80)); return err == nil }, "policy removal to apply")
		c, err := pm.sleep.Dial(pm.httpbin.Addr(9001))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		roundTrip(t, c, "before")
		pm.zts[0].cmd.Process.Signal(syscall.SIGTERM)
		pm.zts[0].waitLog(t, "draining")
		roundTrip(t, c, "during drain") // in-flight tunnel still works
		meshtest.ExpectRefused(t, pm.sleep, pm.httpbin.Addr(80))
		// After the 2 s grace the tunnel is closed by force and the process exits.
		c.SetReadDeadline(time.Now().Add(15 * time.Second))
		if n, err := c.Read(make([]byte, 8)); err == nil || n != 0 {
			t.Fatalf("tunnel survived the drain grace (n=%d, err=%v)", n, err)
		}
		done := make(chan error, 1)
		go func() { done <- pm.zts[0].cmd.Wait() }()
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("ztunnel exit: %v", err)
			}
		case <-time.After(15 * time.Second):
			t.Fatal("ztunnel did not exit after drain")
		}
	})
}

// TestProcessNotReadyUntilSynced: with the control plane unreachable the
// ztunnel is not ready and admits nothing (reliability case 19): a
// connection made meanwhile is held until discovery syncs (at most the
// connect timeout), then served under the policy it brought.
func TestProcessNotReadyUntilSynced(t *testing.T) {
	m := meshtest.New(t, 0)
	cp := newXDSControlPlane(t, m.CA)
	n := &meshtest.Node{Node: m.Cluster.AddNode("node1"), NodeName: "node1"}
	m.Nodes = append(m.Nodes, n)
	// Start the process against ports nobody serves (the control plane is
	// only started in the other node's namespace).
	other := &meshtest.Node{Node: m.Cluster.AddNode("node2"), NodeName: "node2"}
	_ = other
	nsf, _ := n.Open()
	defer nsf.Close()
	dir := t.TempDir()
	token := filepath.Join(dir, "token")
	os.WriteFile(token, []byte(testToken), 0o600)
	z := &ztunnelProcess{sock: filepath.Join(dir, "z.sock"), node: n, out: &syncBuffer{t: t, pfx: "node1"}, nodeNS: nsf}
	z.cmd = exec.Command("ip", "netns", "exec", n.Name, ztunnelBinary(t), "-node-name", "node1", "-xds-address", "127.0.0.1:15010",
		"-ca-address", "127.0.0.1:15012", "-token-path", token, "-root-cert", cp.roots, "-zds-socket", z.sock)
	z.cmd.Stdout, z.cmd.Stderr = z.out, z.out
	if err := z.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { z.cmd.Process.Kill(); z.cmd.Wait() }()
	waitUntil(t, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		var err error
		z.agent, err = inpod.Dial(ctx, z.sock)
		return err == nil
	}, "node agent socket")
	defer z.agent.Close()
	client := &meshtest.Pod{Pod: n.AddPod("sleep-1"), PodName: "sleep-1", Namespace: "default", ServiceAccount: "sleep", Node: n, UID: discovery.PodUID(meshtest.ClusterID, "default", "sleep-1")}
	server := &meshtest.Pod{Pod: n.AddPod("httpbin-1"), PodName: "httpbin-1", Namespace: "default", ServiceAccount: "httpbin", Node: n}
	server.ServeHTTP(t, 80)
	// Without a certificate (CA unreachable) the workload cannot be added
	// promptly; hand it over in the background.
	go func() {
		f, _ := client.Open()
		defer f.Close()
		m.Redirect.Install(f)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		z.agent.AddWorkload(ctx, client.UID, inpod.WorkloadInfo{Name: client.PodName, Namespace: "default", ServiceAccount: "sleep"}, f)
		z.agent.SnapshotSent(ctx)
	}()
	time.Sleep(time.Second)
	if z.ready() {
		t.Fatal("ready without control plane")
	}
	// A connection made now is held, neither admitted nor refused, while
	// nothing is known of policy: a fresh ztunnel takes over pods beside
	// the one it replaces, and their new connections must not fail.
	held, err := client.Dial(server.Addr(80))
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	answer := make(chan string, 1)
	go func() {
		held.SetDeadline(time.Now().Add(40 * time.Second))
		fmt.Fprintf(held, "GET / HTTP/1.0\r\nHost: httpbin\r\n\r\n")
		b, err := io.ReadAll(held)
		answer <- fmt.Sprintf("%q, %v", b, err)
	}()
	time.Sleep(time.Second)
	select {
	case got := <-answer:
		t.Fatalf("connection answered before discovery synced: %s", got)
	default:
	}
	// Once the control plane is reachable it syncs and becomes ready.
	cp.set(discovery.AddressType, client.UID, &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: &workloadapi.Workload{
		Uid: client.UID, Name: client.PodName, Namespace: "default", Addresses: [][]byte{client.IP.AsSlice()}, ServiceAccount: "sleep",
		TrustDomain: "cluster.local", Node: "node1", TunnelProtocol: workloadapi.TunnelProtocol_HBONE}}})
	cp.serveIn(nsf)
	waitUntil(t, z.ready, "ztunnel ready after the control plane came up")
	if got := <-answer; !strings.Contains(got, "httpbin-1") {
		t.Fatalf("held connection after the sync: %s, want the server's answer", got)
	}
	meshtest.ExpectOK(t, client, server.Addr(80), "httpbin-1") // passthrough: server is not in the mesh
}

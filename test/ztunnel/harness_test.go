// Package ztunnel holds the namespaced integration tests of ztunnel's L4
// data path: node and pod network namespaces (test/netns), real nftables
// redirection (proxylib/redirect), real HBONE with mTLS between ztunnels,
// and a test control plane that feeds each ztunnel's discovery State with
// hand-built Istio workload-API resources.
package ztunnel

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/go-logr/logr/funcr"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi/security"
	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/hbone/hbonetest"
	"github.com/ambientmesh/ambient/proxylib/identity"
	"github.com/ambientmesh/ambient/proxylib/inpod"
	"github.com/ambientmesh/ambient/proxylib/netnsutil"
	"github.com/ambientmesh/ambient/proxylib/proxy"
	"github.com/ambientmesh/ambient/proxylib/proxy/transport"
	"github.com/ambientmesh/ambient/proxylib/redirect"
	"github.com/ambientmesh/ambient/proxylib/telemetry"
	"github.com/ambientmesh/ambient/test/netns"
	"github.com/prometheus/client_golang/prometheus"
)

const cluster = "Kubernetes"

// logs collects every ztunnel log line so tests can assert on the seeds'
// log shapes.
type logs struct {
	mu    sync.Mutex
	lines []string
	t     testing.TB
}

func (l *logs) logger(node string) logr.Logger {
	return funcr.New(func(prefix, args string) {
		line := node + " " + prefix + " " + args
		l.mu.Lock()
		l.lines = append(l.lines, line)
		l.mu.Unlock()
		l.t.Log(line)
	}, funcr.Options{Verbosity: 0})
}

// waitFor waits until a line containing every part appears.
func (l *logs) waitFor(t *testing.T, parts ...string) string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		l.mu.Lock()
		for _, line := range l.lines {
			ok := true
			for _, p := range parts {
				if !strings.Contains(line, p) {
					ok = false
					break
				}
			}
			if ok {
				l.mu.Unlock()
				return line
			}
		}
		l.mu.Unlock()
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("no log line containing %q", parts)
	return ""
}

// controlPlane is the test control plane: it holds the resources and
// applies every change to each ztunnel's State, as delta xDS would.
type controlPlane struct {
	t      testing.TB
	mu     sync.Mutex
	states []*discovery.State
	ver    int
}

func (cp *controlPlane) newState() *discovery.State {
	s := discovery.NewState(discovery.AddressType, discovery.AuthorizationType)
	cp.mu.Lock()
	cp.states = append(cp.states, s)
	cp.mu.Unlock()
	return s
}

func (cp *controlPlane) push(typeURL string, name string, m proto.Message) {
	cp.t.Helper()
	body, err := anypb.New(m)
	if err != nil {
		cp.t.Fatal(err)
	}
	body.TypeUrl = typeURL
	cp.mu.Lock()
	cp.ver++
	v := fmt.Sprint(cp.ver)
	states := append([]*discovery.State(nil), cp.states...)
	cp.mu.Unlock()
	for _, s := range states {
		if err := s.Apply(typeURL, []discovery.Resource{{Name: name, Version: v, Body: body}}, nil); err != nil {
			cp.t.Fatalf("apply %s: %v", name, err)
		}
	}
}

func (cp *controlPlane) remove(typeURL, name string) {
	cp.mu.Lock()
	states := append([]*discovery.State(nil), cp.states...)
	cp.mu.Unlock()
	for _, s := range states {
		if err := s.Apply(typeURL, nil, []string{name}); err != nil {
			cp.t.Fatal(err)
		}
	}
}

// syncEmpty marks both types synced (the first full push of an empty mesh).
func (cp *controlPlane) syncEmpty(s *discovery.State) {
	s.Apply(discovery.AddressType, nil, nil)
	s.Apply(discovery.AuthorizationType, nil, nil)
}

func (cp *controlPlane) workload(w *workloadapi.Workload) {
	cp.push(discovery.AddressType, w.Uid, &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: w}})
}

func (cp *controlPlane) service(s *workloadapi.Service) {
	cp.push(discovery.AddressType, discovery.ServiceKey(s.Namespace, s.Hostname), &workloadapi.Address{Type: &workloadapi.Address_Service{Service: s}})
}

func (cp *controlPlane) policy(p *security.Authorization) {
	cp.push(discovery.AuthorizationType, discovery.PolicyKey(p.Namespace, p.Name), p)
}

// mesh is a two-node cluster with a ztunnel per node.
type mesh struct {
	t        *testing.T
	c        *netns.Cluster
	ca       *hbonetest.CA
	cp       *controlPlane
	logs     *logs
	nodes    []*node
	redirect redirect.Redirector
}

type node struct {
	*netns.Node
	name    string
	state   *discovery.State
	proxy   *proxy.Proxy
	metrics *prometheus.Registry
}

type pod struct {
	*netns.Pod
	name, ns, sa string
	node         *node
	uid          string
	w            *workloadapi.Workload
	nsFile       *os.File
}

func newMesh(t *testing.T, nodes int) *mesh {
	c := netns.NewCluster(t)
	m := &mesh{t: t, c: c, ca: hbonetest.NewCA(t, hbonetest.DefaultTrustDomain), cp: &controlPlane{t: t},
		logs: &logs{t: t}, redirect: redirect.NewNFTables(redirect.DefaultConfig())}
	for i := 0; i < nodes; i++ {
		m.addNode(fmt.Sprintf("node%d", i+1))
	}
	return m
}

func (m *mesh) addNode(name string) *node {
	n := &node{Node: m.c.AddNode(name), name: name, state: m.cp.newState(), metrics: prometheus.NewRegistry()}
	certs := identity.NewStaticSource(m.ca.TrustDomain, m.ca.Roots())
	for _, sa := range []string{"sleep", "notsleep", "httpbin", "waypoint", "outside"} {
		id := m.ca.ID("default", sa)
		certs.Set(id, m.ca.Issue(m.t, id))
	}
	log := m.logs.logger(name)
	f := testTransport(m.t, certs)
	p, err := proxy.New(proxy.Config{Log: log, State: n.state, Certs: certs, Node: name,
		Metrics: telemetry.NewMetrics(n.metrics), NewDialer: f.NewDialer, NewHBONEServer: f.NewHBONEServer,
		ConnectTimeout: 3 * time.Second})
	if err != nil {
		m.t.Fatal(err)
	}
	n.proxy = p
	m.t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		p.Drain(ctx)
	})
	m.nodes = append(m.nodes, n)
	return n
}

// addPod creates a pod and publishes its workload; captured pods get the
// redirection rules and are handed to the node's ztunnel.
func (m *mesh) addPod(n *node, name, sa string, captured bool, mut ...func(*workloadapi.Workload)) *pod {
	np := n.AddPod(name)
	p := &pod{Pod: np, name: name, ns: "default", sa: sa, node: n, uid: discovery.PodUID(cluster, "default", name)}
	p.w = &workloadapi.Workload{Uid: p.uid, Name: name, Namespace: "default", Addresses: [][]byte{np.IP.AsSlice()},
		TrustDomain: m.ca.TrustDomain, ServiceAccount: sa, Node: n.name, WorkloadName: strings.TrimRight(name, "-0123456789"),
		CanonicalName: strings.TrimRight(name, "-0123456789"), CanonicalRevision: "v1", ClusterId: cluster,
		WorkloadType: workloadapi.WorkloadType_POD, Status: workloadapi.WorkloadStatus_HEALTHY}
	for _, f := range mut {
		f(p.w)
	}
	if captured {
		p.capture(m)
	} else {
		m.cp.workload(p.w)
	}
	return p
}

// capture installs the rules and hands the pod to ztunnel (what the node
// agent does), then publishes the workload as HBONE-capable.
func (p *pod) capture(m *mesh) {
	m.t.Helper()
	f, err := p.Open()
	if err != nil {
		m.t.Fatal(err)
	}
	if err := m.redirect.Install(f); err != nil {
		m.t.Fatal(err)
	}
	p.w.TunnelProtocol = workloadapi.TunnelProtocol_HBONE
	m.cp.workload(p.w)
	info := inpod.WorkloadInfo{Name: p.name, Namespace: p.ns, ServiceAccount: p.sa, PreserveSource: m.redirect.PreservesSource()}
	if err := p.node.proxy.AddWorkload(p.uid, info, f); err != nil {
		m.t.Fatal(err)
	}
	p.nsFile = f
}

// release undoes capture.
func (p *pod) release(m *mesh) {
	m.t.Helper()
	f, err := p.Open()
	if err != nil {
		m.t.Fatal(err)
	}
	defer f.Close()
	p.w.TunnelProtocol = workloadapi.TunnelProtocol_NONE
	m.cp.workload(p.w)
	if err := p.node.proxy.DelWorkload(p.uid); err != nil {
		m.t.Fatal(err)
	}
	if err := m.redirect.Remove(f); err != nil {
		m.t.Fatal(err)
	}
}

func (p *pod) id() identity.Identity {
	return identity.Identity{TrustDomain: hbonetest.DefaultTrustDomain, Namespace: p.ns, ServiceAccount: p.sa}
}

// serveHTTP runs an httpbin-like server on port answering "<pod name>".
func (p *pod) serveHTTP(t *testing.T, port int) {
	f, err := p.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ln, err := netnsutil.ListenTCP(f, fmt.Sprintf(":%d", port), netnsutil.SocketOptions{})
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost {
			n, _ := io.Copy(io.Discard, r.Body)
			fmt.Fprintf(w, "%s got %d", p.name, n)
			return
		}
		io.WriteString(w, p.name)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
}

// client returns an HTTP client whose connections start inside the pod,
// unmarked, so the pod's redirection captures them like an app's.
func (p *pod) client() *http.Client {
	return &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			f, err := p.Open()
			if err != nil {
				return nil, err
			}
			defer f.Close()
			return netnsutil.DialTCP(ctx, f, netip.AddrPort{}, netip.MustParseAddrPort(addr), netnsutil.SocketOptions{})
		}}}
}

// get fetches http://dst/ from inside the pod.
func (p *pod) get(dst netip.AddrPort) (string, error) {
	resp, err := p.client().Get("http://" + dst.String() + "/")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != 200 {
		return "", fmt.Errorf("status %d", resp.StatusCode)
	}
	return string(b), nil
}

func (p *pod) addr(port uint16) netip.AddrPort { return netip.AddrPortFrom(p.IP, port) }

// ready marks every state fully synced.
func (m *mesh) syncAll() {
	for _, n := range m.nodes {
		m.cp.syncEmpty(n.state)
	}
}

func exact(s string) *security.StringMatch {
	return &security.StringMatch{MatchType: &security.StringMatch_Exact{Exact: s}}
}

// serveTCP runs handler for each connection accepted on port inside the pod.
func (p *pod) serveTCP(t *testing.T, port int, handler func(net.Conn)) {
	f, err := p.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ln, err := netnsutil.ListenTCP(f, fmt.Sprintf(":%d", port), netnsutil.SocketOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go handler(c)
		}
	}()
}

// dial opens a raw TCP connection from inside the pod, as its app would.
func (p *pod) dial(dst netip.AddrPort) (net.Conn, error) {
	f, err := p.Open()
	if err != nil {
		return nil, err
	}
	defer f.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return netnsutil.DialTCP(ctx, f, netip.AddrPort{}, dst, netnsutil.SocketOptions{})
}

// echo copies everything back.
func echo(c net.Conn) {
	defer c.Close()
	io.Copy(c, c)
}

// countThenReply reads until EOF, then answers "got <n>" and closes: a
// half-close probe.
func countThenReply(c net.Conn) {
	defer c.Close()
	n, _ := io.Copy(io.Discard, c)
	fmt.Fprintf(c, "got %d", n)
}

// expectRefused asserts that a request from p to dst does not get through.
func expectRefused(t *testing.T, p *pod, dst netip.AddrPort) {
	t.Helper()
	if got, err := p.get(dst); err == nil {
		t.Fatalf("%s -> %s succeeded (%q), want refused", p.name, dst, got)
	}
}

func expectOK(t *testing.T, p *pod, dst netip.AddrPort, want string) {
	t.Helper()
	got, err := p.get(dst)
	if err != nil || got != want {
		t.Fatalf("%s -> %s = %q, %v; want %q", p.name, dst, got, err, want)
	}
}

func allowPolicy(name string, principals ...string) *security.Authorization {
	var ms []*security.StringMatch
	for _, p := range principals {
		ms = append(ms, exact(p))
	}
	return &security.Authorization{Name: name, Namespace: "default", Scope: security.Scope_NAMESPACE, Action: security.Action_ALLOW,
		Groups: []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{{Principals: ms}}}}}}}
}

// strictPolicy is Istio's conversion of PeerAuthentication STRICT.
func strictPolicy() *security.Authorization {
	return &security.Authorization{Name: "converted_peer_authentication_default", Namespace: "default", Scope: security.Scope_NAMESPACE, Action: security.Action_DENY,
		Groups: []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{{NotPrincipals: []*security.StringMatch{
			{MatchType: &security.StringMatch_Presence{Presence: &emptypb.Empty{}}}}}}}}}}}
}

var netip0 netip.AddrPort

func mustAddrPort(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

// testTransport is the HBONE transport under test: HTTP2 unless
// ZTUNNEL_TEST_TRANSPORT=HTTP3.
func testTransport(t testing.TB, certs hbone.CertSource) transport.Factories {
	f, err := transport.For(hbone.Protocol(os.Getenv("ZTUNNEL_TEST_TRANSPORT")), certs, logr.Discard())
	if err != nil {
		t.Fatal(err)
	}
	return f
}

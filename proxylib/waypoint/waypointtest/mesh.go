// Package waypointtest builds a small real mesh in process for waypoint
// tests: a mesh CA, a discovery State fed with real workload-API resources,
// pods that are real HTTP/gRPC/TCP servers behind a minimal HBONE inbound
// (real HTTP/2 + mTLS on <pod ip>:15008, loopback addresses 127.0.0.0/8),
// a real waypoint on HBONE, and HBONE clients with workload identities.
//
// The pods' inbound is deliberately minimal (CONNECT to the local target,
// no L4 policy): it stands in for the destination ztunnel in "direct" tests;
// test/waypoint runs the real ztunnel where available.
package waypointtest

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/go-logr/logr/funcr"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/types/known/anypb"
	"sigs.k8s.io/yaml"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/meshapi"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/hbone/h2"
	"github.com/ambientmesh/ambient/proxylib/hbone/hbonetest"
	"github.com/ambientmesh/ambient/proxylib/identity"
	"github.com/ambientmesh/ambient/proxylib/waypoint"
)

const (
	TrustDomain = "cluster.local"
	Namespace   = "ambient-demo"
	// RootNamespace is the mesh namespace, the root of mesh-wide policies.
	RootNamespace = "ambient-system"
	// HTTPPort and GRPCPort are the pods' container ports.
	HTTPPort = 8080
	GRPCPort = 9090
	TCPPort  = 7070
	// TLSPort serves HTTPS with the mesh's BackendCert (for TLS
	// passthrough: only the backend can complete the handshake).
	TLSPort = 8443
	// BackendHost is the name (and *.BackendHost) BackendCert is for.
	BackendHost = "example.com"
)

// Mesh is the in-process mesh.
type Mesh struct {
	t     testing.TB
	CA    *hbonetest.CA
	State *discovery.State
	Certs *identity.StaticSource
	Log   logr.Logger

	mu        sync.Mutex
	net       [2]byte // random 127.a.b.0/24 per mesh: test binaries run in parallel and share loopback
	next      byte
	Pods      map[string]*Pod
	waypoints map[string]*Waypoint
	vips      byte
	// BackendRoots trusts the certificate every pod serves on TLSPort.
	BackendRoots *x509.CertPool
	backendCert  tls.Certificate
}

// Pod is a workload: an HTTP server (answers with its name and what it
// saw), a gRPC health server and a TCP echo, behind an HBONE inbound.
type Pod struct {
	Name, ServiceAccount string
	IP                   netip.Addr
	Identity             identity.Identity
	Labels               map[string]string
	Policies             []string

	mu        sync.Mutex
	forwarded []string            // Forwarded header of every tunnel accepted
	peers     []identity.Identity // verified HBONE peer of every tunnel accepted
}

// Peers returns the verified peer identity of every tunnel the pod
// accepted, in order.
func (p *Pod) Peers() []identity.Identity {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]identity.Identity(nil), p.peers...)
}

// Forwarded returns the Forwarded header of every tunnel the pod accepted,
// in order ("" when absent).
func (p *Pod) Forwarded() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.forwarded...)
}

// Waypoint is a running waypoint.
type Waypoint struct {
	Name     string
	Addr     netip.AddrPort
	VIP      netip.Addr
	Server   *waypoint.Server
	ID       identity.Identity
	Registry *prometheus.Registry
}

// New starts an empty mesh.
func New(t testing.TB) *Mesh {
	m := &Mesh{
		t: t, CA: hbonetest.NewCA(t, TrustDomain),
		State: discovery.NewState(discovery.AddressType, discovery.AuthorizationType, discovery.L7ResourceType),
		Log:   testLogger(t),
		next:  20, vips: 10, net: [2]byte{byte(1 + rand.IntN(250)), byte(rand.IntN(256))},
		Pods: map[string]*Pod{}, waypoints: map[string]*Waypoint{},
	}
	m.Certs = identity.NewStaticSource(TrustDomain, m.CA.Roots())
	crt, key, pool := SelfSigned(t, BackendHost, "*."+BackendHost)
	cert, err := tls.X509KeyPair(crt, key)
	if err != nil {
		t.Fatal(err)
	}
	m.backendCert, m.BackendRoots = cert, pool
	// Every type synced (possibly empty), so the waypoint is ready.
	for _, typ := range []string{discovery.AddressType, discovery.AuthorizationType, discovery.L7ResourceType} {
		if err := m.State.Apply(typ, nil, nil); err != nil {
			t.Fatal(err)
		}
	}
	return m
}

// testLogger logs to t while the test runs. Proxies record a request when
// its response body is closed, which may be after the client (and the
// test) is done; their lines are dropped once t has finished, where
// t.Log would panic.
func testLogger(t testing.TB) logr.Logger {
	var mu sync.Mutex
	done := false
	t.Cleanup(func() { // registered first: runs after every other cleanup
		mu.Lock()
		done = true
		mu.Unlock()
	})
	return funcr.New(func(prefix, args string) {
		mu.Lock()
		defer mu.Unlock()
		if !done {
			t.Log(prefix + ": " + args)
		}
	}, funcr.Options{Verbosity: 0})
}

func (m *Mesh) nextIP() netip.Addr {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.next++
	return netip.AddrFrom4([4]byte{127, m.net[0], m.net[1], m.next})
}

// NextVIP allocates a service VIP (never dialled: only names a service).
func (m *Mesh) NextVIP() netip.Addr {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.vips++
	return netip.AddrFrom4([4]byte{10, 96, 0, m.vips})
}

// ID is the identity of a service account in the test namespace.
func (m *Mesh) ID(sa string) identity.Identity {
	return identity.Identity{TrustDomain: TrustDomain, Namespace: Namespace, ServiceAccount: sa}
}

func (m *Mesh) issue(id identity.Identity) {
	if _, err := m.Certs.Certificate(context.Background(), id); err != nil {
		m.Certs.Set(id, m.CA.Issue(m.t, id))
	}
}

// UID is a pod's workload uid.
func UID(name string) string { return discovery.PodUID("Kubernetes", Namespace, name) }

// AddWaypoint starts a waypoint named name on its own loopback address
// with its Service (VIP) published in discovery; opts change its Config.
func (m *Mesh) AddWaypoint(name string, tracing bool, opts ...func(*waypoint.Config)) *Waypoint {
	t := m.t
	id := m.ID(name)
	m.issue(id)
	wp := &Waypoint{Name: name, VIP: m.NextVIP(), ID: id, Registry: prometheus.NewRegistry()}
	m.PublishService(name, wp.VIP, nil, 15008)
	dialer, err := h2.NewDialer(h2.DialerConfig{Certs: m.Certs, Log: m.Log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dialer.Close() })
	cfg := waypoint.Config{
		Name: name, Namespace: Namespace, Identity: id, State: m.State, Dialer: dialer,
		Registry: wp.Registry, Tracing: tracing, Log: m.Log, RootNamespace: RootNamespace,
	}
	for _, o := range opts {
		o(&cfg)
	}
	srv, err := waypoint.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	wp.Server = srv
	ip := m.nextIP()
	wp.Addr = m.serveHBONE(ip, id, srv)
	m.mu.Lock()
	m.waypoints[name] = wp
	m.mu.Unlock()
	return wp
}

// serveHBONE runs an HBONE server on ip:15008.
func (m *Mesh) serveHBONE(ip netip.Addr, id identity.Identity, h hbone.Handler) netip.AddrPort {
	t := m.t
	srv, err := h2.NewServer(h2.ServerConfig{Certs: m.Certs, Identity: id, Handler: h, Log: m.Log})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", netip.AddrPortFrom(ip, hbone.Port).String())
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return netip.AddrPortFrom(ip, hbone.Port)
}

// AddPod starts a pod with the given service account and labels, whose
// waypoint is wp (nil: none), and publishes it.
func (m *Mesh) AddPod(name, sa string, labels map[string]string, wp *Waypoint, policies ...string) *Pod {
	p := &Pod{Name: name, ServiceAccount: sa, IP: m.nextIP(), Identity: m.ID(sa), Labels: labels, Policies: policies}
	m.issue(p.Identity)
	m.startBackends(p)
	m.serveHBONE(p.IP, p.Identity, hbone.HandlerFunc(func(ctx context.Context, req *hbone.Request, resp hbone.Responder) {
		if req.Target.Addr() != p.IP {
			resp.Reject(http.StatusBadRequest, "not this pod")
			return
		}
		p.mu.Lock()
		p.forwarded = append(p.forwarded, req.Header.Get(hbone.HeaderForwarded))
		p.peers = append(p.peers, req.Peer)
		p.mu.Unlock()
		var d net.Dialer
		up, err := d.DialContext(ctx, "tcp", req.Target.String())
		if err != nil {
			resp.Reject(http.StatusServiceUnavailable, err.Error())
			return
		}
		defer up.Close()
		st, err := resp.Accept()
		if err != nil {
			return
		}
		defer st.Close()
		hbone.Relay(st, up.(*net.TCPConn))
	}))
	m.mu.Lock()
	m.Pods[name] = p
	m.mu.Unlock()
	m.PublishPod(p, wp, nil)
	return p
}

// PublishPod (re)publishes a pod's workload with its waypoint and the
// services it belongs to.
func (m *Mesh) PublishPod(p *Pod, wp *Waypoint, services map[string]*workloadapi.PortList) {
	w := &workloadapi.Workload{
		Uid: UID(p.Name), Name: p.Name, Namespace: Namespace, Addresses: [][]byte{p.IP.AsSlice()},
		TrustDomain: TrustDomain, ServiceAccount: p.ServiceAccount, WorkloadName: p.Name,
		CanonicalName: p.Labels["app"], CanonicalRevision: p.Labels["version"],
		TunnelProtocol: workloadapi.TunnelProtocol_HBONE, Node: "node-1", ClusterId: "Kubernetes",
		Services: services, AuthorizationPolicies: p.Policies,
	}
	if wp != nil {
		w.Waypoint = &workloadapi.GatewayAddress{
			Destination:   &workloadapi.GatewayAddress_Address{Address: &workloadapi.NetworkAddress{Address: wp.VIP.AsSlice()}},
			HboneMtlsPort: hbone.Port,
		}
	}
	m.applyAddress(w.Uid, &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: w}})
}

// Hostname of a service in the test namespace.
func Hostname(name string) string { return name + "." + Namespace + ".svc.cluster.local" }

// PublishService publishes a service with ports (service port = target
// port) whose endpoints are pods; wp (nil: none) is its waypoint.
func (m *Mesh) PublishService(name string, vip netip.Addr, wp *Waypoint, ports ...uint32) {
	svc := &workloadapi.Service{
		Name: name, Namespace: Namespace, Hostname: Hostname(name),
		Addresses: []*workloadapi.NetworkAddress{{Address: vip.AsSlice()}},
	}
	for _, p := range ports {
		svc.Ports = append(svc.Ports, &workloadapi.Port{ServicePort: p, TargetPort: p})
	}
	if wp != nil {
		svc.Waypoint = &workloadapi.GatewayAddress{
			Destination:   &workloadapi.GatewayAddress_Address{Address: &workloadapi.NetworkAddress{Address: wp.VIP.AsSlice()}},
			HboneMtlsPort: hbone.Port,
		}
	}
	m.applyAddress(discovery.ServiceKey(Namespace, svc.Hostname), &workloadapi.Address{Type: &workloadapi.Address_Service{Service: svc}})
}

// AddService publishes a service over pods (which are republished with
// membership) and returns its VIP.
func (m *Mesh) AddService(name string, wp *Waypoint, pods []*Pod, wpOf func(*Pod) *Waypoint, ports ...uint32) netip.Addr {
	vip := m.NextVIP()
	m.PublishService(name, vip, wp, ports...)
	key := discovery.ServiceKey(Namespace, Hostname(name))
	for _, p := range pods {
		pl := &workloadapi.PortList{}
		for _, port := range ports {
			pl.Ports = append(pl.Ports, &workloadapi.Port{ServicePort: port, TargetPort: port})
		}
		services := map[string]*workloadapi.PortList{key: pl}
		if old := m.State.WorkloadByUID(UID(p.Name)); old != nil {
			for k, v := range old.Services {
				if k != key {
					services[k] = v
				}
			}
		}
		m.PublishPod(p, wpOf(p), services)
	}
	return vip
}

func (m *Mesh) applyAddress(name string, a *workloadapi.Address) {
	body, err := anypb.New(a)
	if err != nil {
		m.t.Fatal(err)
	}
	if err := m.State.Apply(discovery.AddressType, []discovery.Resource{{Name: name, Version: "1", Body: body}}, nil); err != nil {
		m.t.Fatal(err)
	}
}

// ApplyL7 publishes a Kubernetes object (YAML) as an L7Resource.
func (m *Mesh) ApplyL7(y string) {
	key, res := L7Resource(m.t, y)
	body, err := anypb.New(res)
	if err != nil {
		m.t.Fatal(err)
	}
	if err := m.State.Apply(discovery.L7ResourceType, []discovery.Resource{{Name: key, Version: fmt.Sprint(time.Now().UnixNano()), Body: body}}, nil); err != nil {
		m.t.Fatal(err)
	}
}

// L7Resource is a Kubernetes object (YAML) as the control plane sends it
// (namespace Namespace unless it names one), with its resource name.
func L7Resource(t testing.TB, y string) (string, *meshapi.L7Resource) {
	js, err := yaml.YAMLToJSON([]byte(y))
	if err != nil {
		t.Fatal(err)
	}
	var meta struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
		Metadata   struct {
			Name, Namespace string
		} `json:"metadata"`
	}
	if err := json.Unmarshal(js, &meta); err != nil {
		t.Fatal(err)
	}
	if meta.Metadata.Namespace == "" {
		meta.Metadata.Namespace = Namespace
	}
	group, _, _ := strings.Cut(meta.APIVersion, "/")
	res := &meshapi.L7Resource{Group: group, Kind: meta.Kind, Namespace: meta.Metadata.Namespace, Name: meta.Metadata.Name, Json: js}
	return discovery.L7Key(group, meta.Kind, res.Namespace, res.Name), res
}

// DeleteL7 removes an L7 resource.
func (m *Mesh) DeleteL7(group, kind, name string) {
	if err := m.State.Apply(discovery.L7ResourceType, nil, []string{discovery.L7Key(group, kind, Namespace, name)}); err != nil {
		m.t.Fatal(err)
	}
}

// Client is a workload calling through HBONE.
type Client struct {
	m      *Mesh
	ID     identity.Identity
	IP     netip.Addr
	dialer *h2.Dialer
}

// NewClient returns a client with a workload identity (its certificate is
// issued by the mesh CA) and source address ip (for Forwarded), published
// as a workload of that identity so the waypoint believes the address.
func (m *Mesh) NewClient(sa string, ip netip.Addr) *Client {
	id := m.ID(sa)
	m.issue(id)
	m.PublishPod(&Pod{Name: sa + "-client", ServiceAccount: sa, IP: ip, Identity: id, Labels: map[string]string{"app": sa}}, nil, nil)
	return m.newClient(id, ip)
}

// PodClient returns a client presenting pod p's identity from p's address,
// as p's ztunnel does when it hair-pins a direct caller to p's waypoint.
func (m *Mesh) PodClient(p *Pod) *Client { return m.newClient(p.Identity, p.IP) }

func (m *Mesh) newClient(id identity.Identity, ip netip.Addr) *Client {
	d, err := h2.NewDialer(h2.DialerConfig{Certs: m.Certs, Log: m.Log})
	if err != nil {
		m.t.Fatal(err)
	}
	m.t.Cleanup(func() { d.Close() })
	return &Client{m: m, ID: id, IP: ip, dialer: d}
}

// Dial opens a tunnel to target through waypoint wp.
func (c *Client) Dial(ctx context.Context, wp *Waypoint, target netip.AddrPort) (hbone.Stream, error) {
	return c.DialAs(ctx, wp, target, c.IP)
}

// DialAs is Dial claiming source address src in the Forwarded header.
func (c *Client) DialAs(ctx context.Context, wp *Waypoint, target netip.AddrPort, src netip.Addr) (hbone.Stream, error) {
	return c.dialer.Dial(ctx, hbone.DialRequest{
		Source: c.ID, Expected: []identity.Identity{wp.ID}, ProxyAddr: wp.Addr, Target: target,
		Header: hbone.SourceHeader(hbone.Source{Addr: src, Namespace: Namespace}),
	})
}

// DialWithHeader is Dial sending extra CONNECT headers (after Forwarded).
func (c *Client) DialWithHeader(ctx context.Context, wp *Waypoint, target netip.AddrPort, extra http.Header) (hbone.Stream, error) {
	h := hbone.SourceHeader(hbone.Source{Addr: c.IP, Namespace: Namespace})
	for k, vs := range extra {
		h[k] = append(h[k], vs...)
	}
	return c.dialer.Dial(ctx, hbone.DialRequest{
		Source: c.ID, Expected: []identity.Identity{wp.ID}, ProxyAddr: wp.Addr, Target: target, Header: h,
	})
}

// HTTP returns an HTTP client whose connections are tunnels to target via
// wp; h2 selects HTTP/2 prior knowledge.
func (c *Client) HTTP(wp *Waypoint, target netip.AddrPort, h2c bool) *http.Client {
	tr := &http.Transport{
		DialContext:        func(ctx context.Context, _, _ string) (net.Conn, error) { return c.Dial(ctx, wp, target) },
		DisableCompression: true, MaxIdleConnsPerHost: 16,
	}
	p := new(http.Protocols)
	if h2c {
		p.SetUnencryptedHTTP2(true)
	} else {
		p.SetHTTP1(true)
	}
	tr.Protocols = p
	c.m.t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 20 * time.Second}
}

// GRPC returns a gRPC connection tunnelled to target via wp.
func (c *Client) GRPC(wp *Waypoint, target netip.AddrPort) *grpc.ClientConn {
	cc, err := grpc.NewClient("passthrough:///"+target.String(),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return c.Dial(ctx, wp, target) }))
	if err != nil {
		c.m.t.Fatal(err)
	}
	c.m.t.Cleanup(func() { cc.Close() })
	return cc
}

// Seen is what a pod's HTTP server answers.
type Seen struct {
	Pod     string
	Method  string
	Path    string
	Host    string
	Proto   string
	Header  http.Header
	BodyLen int
}

func (m *Mesh) startBackends(p *Pod) {
	t := m.t
	var flaky atomic.Int64
	mux := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") == "websocket" {
			upgradeEcho(w, p.Name)
			return
		}
		n, _ := io.Copy(io.Discard, r.Body)
		switch {
		case strings.HasPrefix(r.URL.Path, "/sleep/"):
			d, _ := time.ParseDuration(strings.TrimPrefix(r.URL.Path, "/sleep/"))
			select {
			case <-time.After(d):
			case <-r.Context().Done():
			}
		case r.URL.Path == "/flaky" && flaky.Add(1)%2 == 1:
			// Every other call fails: 503 first, then 200.
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		if strings.HasPrefix(r.URL.Path, "/status/") {
			var code int
			fmt.Sscanf(r.URL.Path, "/status/%d", &code)
			w.WriteHeader(code)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(Seen{Pod: p.Name, Method: r.Method, Path: r.URL.RequestURI(), Host: r.Host, Proto: r.Proto, Header: r.Header, BodyLen: int(n)})
	})
	hs := &http.Server{Handler: mux}
	proto := new(http.Protocols)
	proto.SetHTTP1(true)
	proto.SetUnencryptedHTTP2(true)
	hs.Protocols = proto
	ln, err := net.Listen("tcp", netip.AddrPortFrom(p.IP, HTTPPort).String())
	if err != nil {
		t.Fatal(err)
	}
	go hs.Serve(ln)
	t.Cleanup(func() { hs.Close() })
	tlsLn, err := net.Listen("tcp", netip.AddrPortFrom(p.IP, TLSPort).String())
	if err != nil {
		t.Fatal(err)
	}
	hss := &http.Server{Handler: mux, TLSConfig: &tls.Config{Certificates: []tls.Certificate{m.backendCert}}}
	go hss.ServeTLS(tlsLn, "", "")
	t.Cleanup(func() { hss.Close() })

	gs := grpc.NewServer()
	hsrv := health.NewServer()
	hsrv.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	hsrv.SetServingStatus(p.Name, healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(gs, hsrv)
	gln, err := net.Listen("tcp", netip.AddrPortFrom(p.IP, GRPCPort).String())
	if err != nil {
		t.Fatal(err)
	}
	go gs.Serve(gln)
	t.Cleanup(gs.Stop)

	tln, err := net.Listen("tcp", netip.AddrPortFrom(p.IP, TCPPort).String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tln.Close() })
	go func() {
		for {
			c, err := tln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				fmt.Fprintf(c, "%s:", p.Name)
				io.Copy(c, c)
			}()
		}
	}()
}

// upgradeEcho accepts a WebSocket-style upgrade, says which pod it is, and
// echoes bytes back.
func upgradeEcho(w http.ResponseWriter, pod string) {
	c, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		return
	}
	defer c.Close()
	brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nX-Pod: " + pod + "\r\n\r\n")
	brw.Flush()
	io.Copy(c, brw)
}

package ztunnel

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"testing"
	"time"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/identity"
	"github.com/ambientmesh/ambient/proxylib/netnsutil"
	"github.com/ambientmesh/ambient/proxylib/redirect"
	"github.com/ambientmesh/ambient/proxylib/waypoint"
	"github.com/ambientmesh/ambient/test/meshtest"
)

// Source preservation (docs/interfaces.md, "Inbound source address"): the
// app behind ztunnel sees the real client's address, as with Istio's
// in-pod ztunnel, and a mesh peer cannot choose the address it is seen from.

const whoPort = 9100

// whoAmI answers with the client address the app sees, then closes.
func whoAmI(c net.Conn) {
	defer c.Close()
	io.WriteString(c, c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap().String())
}

// sourceMesh: sleep and httpbin-2 on node1, httpbin-1 and a pod outside
// the mesh on node2, captured with redirector r.
type sourceMesh struct {
	*meshtest.Mesh
	sleep, httpbin1, httpbin2, outside *meshtest.Pod
}

func newSourceMesh(t *testing.T, r redirect.Redirector) *sourceMesh {
	m := meshtest.New(t, 2)
	m.Redirect = r
	m.SyncAll()
	s := &sourceMesh{Mesh: m}
	s.sleep = m.AddPod(m.Nodes[0], "sleep-1", "sleep", true)
	s.httpbin1 = m.AddPod(m.Nodes[1], "httpbin-1", "httpbin", true)
	s.httpbin2 = m.AddPod(m.Nodes[0], "httpbin-2", "httpbin", true)
	s.outside = m.AddPod(m.Nodes[1], "outside-1", "outside", false)
	for _, h := range []*meshtest.Pod{s.httpbin1, s.httpbin2} {
		h.ServeTCP(t, whoPort, whoAmI)
		h.ServeTCP(t, 9000, meshtest.CountThenReply)
		h.ServeTCP(t, 9001, meshtest.Echo)
	}
	return s
}

func preserving(newR func(redirect.Config) redirect.Redirector) redirect.Redirector {
	cfg := redirect.DefaultConfig()
	cfg.PreserveSource = true
	return newR(cfg)
}

var backends = []struct {
	name string
	new  func(redirect.Config) redirect.Redirector
}{
	{"nftables", func(c redirect.Config) redirect.Redirector { return redirect.NewNFTables(c) }},
	{"iptables", func(c redirect.Config) redirect.Redirector { return redirect.NewIPTables(c) }},
}

// seenBy asks app port whoPort at dst, from inside p, who it sees.
func seenBy(t *testing.T, p *meshtest.Pod, dst netip.AddrPort) string {
	t.Helper()
	c, err := p.Dial(dst)
	if err != nil {
		t.Fatalf("%s dial %s: %v", p.PodName, dst, err)
	}
	defer c.Close()
	return readAll(t, c)
}

func TestSourceIPPreserved(t *testing.T) {
	for _, b := range backends {
		t.Run(b.name, func(t *testing.T) {
			s := newSourceMesh(t, preserving(b.new))
			testSourceIPPreserved(t, s)
		})
	}
}

func testSourceIPPreserved(t *testing.T, s *sourceMesh) {
	cases := []struct {
		name     string
		from, to *meshtest.Pod
		want     netip.Addr
	}{
		{"sleep to httpbin across nodes over HBONE", s.sleep, s.httpbin1, s.sleep.IP},
		{"sleep to httpbin on the same node (fast path)", s.sleep, s.httpbin2, s.sleep.IP},
		// Not preserved: a non-mesh client's own (NATed) connections into
		// the pod could collide with ours in conntrack.
		{"plaintext from outside the mesh", s.outside, s.httpbin1, s.httpbin1.IP},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := seenBy(t, tc.from, tc.to.Addr(whoPort)); got != tc.want.String() {
				t.Fatalf("app saw %s, want %s (client %s, %s's own address %s)", got, tc.want, tc.from.IP, tc.to.PodName, tc.to.IP)
			}
		})
	}

	for _, dst := range []*meshtest.Pod{s.httpbin1, s.httpbin2} {
		t.Run("bulk and half-close to "+dst.PodName, func(t *testing.T) { testBulkAndHalfClose(t, s.sleep, dst, 8<<20) })
	}

	t.Run("hostile peer's Forwarded header is not believed", func(t *testing.T) {
		// A mesh workload speaking HBONE itself, claiming another client.
		h := http.Header{hbone.HeaderForwarded: {`for="1.2.3.4"`}}
		c, err := hboneWithHeader(t, s.Mesh, s.sleep, s.sleep.ID(), netip.AddrPortFrom(s.httpbin1.IP, 15008), s.httpbin1.Addr(whoPort), s.httpbin1.ID(), h)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if got, want := readAll(t, c), s.sleep.IP.String(); got != want {
			t.Fatalf("app saw %s, want the tunnel's peer %s", got, want)
		}
	})

	t.Run("release removes the return path", func(t *testing.T) {
		s.httpbin1.Release(s.Mesh)
		f, err := s.httpbin1.Open()
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if ok, err := redirect.HasSourceRouting(f); err != nil || ok {
			t.Fatalf("HasSourceRouting after release = %v, %v", ok, err)
		}
		if ok, _ := s.Redirect.Installed(f); ok {
			t.Fatal("rules still installed after release")
		}
		if got := seenBy(t, s.sleep, s.httpbin1.Addr(whoPort)); got != s.sleep.IP.String() {
			t.Fatalf("released pod saw %s, want the client %s directly", got, s.sleep.IP)
		}
	})
}

// testBulkAndHalfClose sends size bytes from p to dst's CountThenReply
// (port 9000) and half-closes, expecting the count back, then echoes 4 MiB
// through dst's port 9001.
func testBulkAndHalfClose(t *testing.T, p, dst *meshtest.Pod, size int64) {
	t.Helper()
	c, err := p.Dial(dst.Addr(9000))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := io.CopyN(c, bytes.NewReader(make([]byte, size)), size); err != nil {
		t.Fatalf("write: %v", err)
	}
	c.(*net.TCPConn).CloseWrite()
	if got, want := readAll(t, c), fmt.Sprintf("got %d", size); got != want {
		t.Fatalf("half-close: %q, want %q", got, want)
	}
	testEchoBulk(t, p, dst.Addr(9001), 4<<20)
}

// testEchoBulk sends n bytes through an echo server while reading them back.
func testEchoBulk(t *testing.T, p *meshtest.Pod, dst netip.AddrPort, n int64) {
	t.Helper()
	c, err := p.Dial(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	errc := make(chan error, 1)
	go func() {
		_, err := io.CopyN(c, bytes.NewReader(make([]byte, n)), n)
		c.(*net.TCPConn).CloseWrite()
		errc <- err
	}()
	c.SetReadDeadline(time.Now().Add(20 * time.Second))
	got, err := io.Copy(io.Discard, c)
	if err != nil || got != n {
		t.Fatalf("echo returned %d bytes (%v), want %d", got, err, n)
	}
	if err := <-errc; err != nil {
		t.Fatalf("echo write: %v", err)
	}
}

func TestSourceIPNotPreserved(t *testing.T) {
	t.Run("preservation off: the app sees its own address", func(t *testing.T) {
		s := newSourceMesh(t, redirect.NewNFTables(redirect.DefaultConfig()))
		for _, dst := range []*meshtest.Pod{s.httpbin1, s.httpbin2} {
			if got := seenBy(t, s.sleep, dst.Addr(whoPort)); got != dst.IP.String() {
				t.Fatalf("%s saw %s, want its own address %s", dst.PodName, got, dst.IP)
			}
		}
	})
	t.Run("announced without the return path: fail safe", func(t *testing.T) {
		// A node agent claims preservation but the pod lacks the policy
		// routing: ztunnel must notice, or every connection would hang.
		s := newSourceMesh(t, &announcing{Redirector: redirect.NewNFTables(redirect.DefaultConfig())})
		s.Logs.WaitFor(t, "source preservation off for workload")
		if got := seenBy(t, s.sleep, s.httpbin1.Addr(whoPort)); got != s.httpbin1.IP.String() {
			t.Fatalf("app saw %s, want its own address %s", got, s.httpbin1.IP)
		}
	})
}

// announcing claims source preservation without installing it.
type announcing struct{ redirect.Redirector }

func (announcing) PreservesSource() bool { return true }

// TestSourceIPThroughWaypoint: a waypoint of the destination is believed
// about the client it serves; nobody else is, not even through the hair-pin.
func TestSourceIPThroughWaypoint(t *testing.T) {
	m := meshtest.New(t, 2)
	m.Redirect = preserving(backends[0].new)
	m.SyncAll()
	wpVIP := netip.MustParseAddr("10.96.0.20")
	wpKey := discovery.ServiceKey("default", "waypoint.default.svc.cluster.local")
	gw := &workloadapi.GatewayAddress{Destination: &workloadapi.GatewayAddress_Address{Address: &workloadapi.NetworkAddress{Address: wpVIP.AsSlice()}}, HboneMtlsPort: 15008}
	sleep := m.AddPod(m.Nodes[0], "sleep-1", "sleep", true)
	outside := m.AddPod(m.Nodes[0], "outside-1", "outside", false)
	waypoint := m.AddPod(m.Nodes[1], "waypoint-1", "waypoint", false, func(w *workloadapi.Workload) {
		w.TunnelProtocol = workloadapi.TunnelProtocol_HBONE // as the control plane publishes waypoints
		w.Services = map[string]*workloadapi.PortList{wpKey: {Ports: []*workloadapi.Port{{ServicePort: 15008, TargetPort: 15008}}}}
	})
	app := m.AddPod(m.Nodes[1], "httpbin-1", "httpbin", true, func(w *workloadapi.Workload) { w.Waypoint = gw })
	m.CP.Service(&workloadapi.Service{Name: "waypoint", Namespace: "default", Hostname: "waypoint.default.svc.cluster.local",
		Addresses: []*workloadapi.NetworkAddress{{Address: wpVIP.AsSlice()}}, Ports: []*workloadapi.Port{{ServicePort: 15008, TargetPort: 15008}}})
	app.ServeTCP(t, whoPort, whoAmI)
	startForwardedReporter(t, m, waypoint)
	toApp := netip.AddrPortFrom(app.IP, 15008)
	fwd := func(a netip.Addr) http.Header { return http.Header{hbone.HeaderForwarded: {hbone.FormatForwarded(a)}} }

	cases := []struct {
		name   string
		from   *meshtest.Pod
		id     identity.Identity
		header http.Header
		want   string
	}{
		{"the waypoint's Forwarded names the client", waypoint, waypoint.ID(), fwd(sleep.IP), sleep.IP.String()},
		{"the waypoint without Forwarded is seen itself", waypoint, waypoint.ID(), nil, waypoint.IP.String()},
		{"the waypoint forwarding loopback is seen itself", waypoint, waypoint.ID(), fwd(netip.MustParseAddr("127.0.0.1")), waypoint.IP.String()},
		{"a client outside the mesh is not preserved", waypoint, waypoint.ID(), fwd(outside.IP), app.IP.String()},
		// Any other peer is hair-pinned to the waypoint, which must hear
		// the peer's real address from ztunnel, not the peer's claim.
		{"another identity in the waypoint's pod is hair-pinned", waypoint, sleep.ID(), fwd(netip.MustParseAddr("1.2.3.4")),
			"waypoint heard " + hbone.FormatForwarded(waypoint.IP)},
		{"a hostile peer is hair-pinned with its real address", outside, outside.ID(), fwd(netip.MustParseAddr("1.2.3.4")),
			"waypoint heard " + hbone.FormatForwarded(outside.IP)},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, err := hboneWithHeader(t, m, tc.from, tc.id, toApp, app.Addr(whoPort), app.ID(), tc.header)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if got := readAll(t, c); got != tc.want {
				t.Fatalf("got %q, want %q", got, tc.want)
			}
		})
	}
	t.Run("plaintext hair-pin reports the outside client", func(t *testing.T) {
		if got, want := seenBy(t, outside, app.Addr(whoPort)), "waypoint heard "+hbone.FormatForwarded(outside.IP); got != want {
			t.Fatalf("got %q, want %q", got, want)
		}
	})
}

// addWaypointPod adds the waypoint pod "waypoint-1" on n (outside the
// redirection, HBONE-capable) behind its Service at vip, and returns the
// pod and the GatewayAddress that binds workloads or services to it.
func addWaypointPod(m *meshtest.Mesh, n *meshtest.Node, vip netip.Addr) (*meshtest.Pod, *workloadapi.GatewayAddress) {
	const host = "waypoint.default.svc.cluster.local"
	key := discovery.ServiceKey("default", host)
	wp := m.AddPod(n, "waypoint-1", "waypoint", false, func(w *workloadapi.Workload) {
		w.WorkloadName, w.TunnelProtocol = "waypoint", workloadapi.TunnelProtocol_HBONE
		w.Services = map[string]*workloadapi.PortList{key: {Ports: []*workloadapi.Port{{ServicePort: 15008, TargetPort: 15008}}}}
	})
	m.CP.Service(&workloadapi.Service{Name: "waypoint", Namespace: "default", Hostname: host,
		Addresses: []*workloadapi.NetworkAddress{{Address: vip.AsSlice()}}, Ports: []*workloadapi.Port{{ServicePort: 15008, TargetPort: 15008}}})
	return wp, &workloadapi.GatewayAddress{Destination: &workloadapi.GatewayAddress_Address{Address: &workloadapi.NetworkAddress{Address: vip.AsSlice()}}, HboneMtlsPort: 15008}
}

// startForwardedReporter runs an HBONE server in the waypoint pod that
// answers each tunnel with the Forwarded header it received.
func startForwardedReporter(t *testing.T, m *meshtest.Mesh, wp *meshtest.Pod) {
	certs := identity.NewStaticSource(m.CA.TrustDomain, m.CA.Roots())
	certs.Set(wp.ID(), m.CA.Issue(t, wp.ID()))
	f, _ := wp.Open()
	defer f.Close()
	srv, err := meshtest.Transport(t, certs).NewServer(f, "", wp.ID(), hbone.HandlerFunc(
		func(ctx context.Context, req *hbone.Request, resp hbone.Responder) {
			s, err := resp.Accept()
			if err != nil {
				return
			}
			fmt.Fprintf(s, "waypoint heard %s", req.Header.Get(hbone.HeaderForwarded))
			s.CloseWrite()
			io.Copy(io.Discard, s)
			s.Close()
		}))
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve()
	t.Cleanup(func() { srv.Close() })
}

// hboneWithHeader dials a tunnel from inside pod p presenting id's
// certificate, with CONNECT headers h (none when nil).
func hboneWithHeader(t *testing.T, m *meshtest.Mesh, p *meshtest.Pod, id identity.Identity, proxyAddr, target netip.AddrPort, expected identity.Identity, h http.Header) (net.Conn, error) {
	certs := identity.NewStaticSource(m.CA.TrustDomain, m.CA.Roots())
	certs.Set(id, m.CA.Issue(t, id))
	f, _ := p.Open()
	t.Cleanup(func() { f.Close() })
	d, err := meshtest.Transport(t, certs).NewDialer(f)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return d.Dial(ctx, hbone.DialRequest{Source: id, Expected: []identity.Identity{expected}, ProxyAddr: proxyAddr, Target: target, Header: h})
}

// TestSourceIPThroughRealWaypoint: sleep → its ztunnel → the real waypoint
// (proxylib/waypoint, L4 and HTTP) → httpbin's ztunnel → httpbin. Over opaque
// TCP (one onward tunnel per client) httpbin sees sleep's address: the
// waypoint reports its verified peer's client in Forwarded, and httpbin's
// ztunnel believes only that waypoint. Over HTTP the onward connections are
// pooled across clients, so httpbin sees the waypoint (as in Istio) and each
// request's client in X-Forwarded-For.
func TestSourceIPThroughRealWaypoint(t *testing.T) {
	if p := meshtest.TransportProtocol(); p != "" && p != hbone.HTTP2 {
		// The ztunnels would dial the waypoint over p; proxylib/waypoint,
		// like cmd/waypoint, serves HBONE over HTTP/2 only.
		t.Skipf("the real waypoint serves HBONE over HTTP/2 only, not %s", p)
	}
	m := meshtest.New(t, 2)
	m.Redirect = preserving(backends[0].new)
	wpState := m.NewWaypointState()
	m.SyncAll()

	sleep := m.AddPod(m.Nodes[0], "sleep-1", "sleep", true)
	wp, gw := addWaypointPod(m, m.Nodes[1], netip.MustParseAddr("10.96.0.20"))
	app := m.AddPod(m.Nodes[1], "httpbin-1", "httpbin", true, func(w *workloadapi.Workload) { w.Waypoint = gw })
	// Client ends first: the waypoint's TCP relay resets a tunnel whose
	// server closes first (seen with and without source preservation).
	app.ServeTCP(t, whoPort, func(c net.Conn) {
		io.Copy(io.Discard, c)
		whoAmI(c)
	})
	f, err := app.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ln, err := netnsutil.ListenTCP(f, ":8080", netnsutil.SocketOptions{})
	if err != nil {
		t.Fatal(err)
	}
	httpSrv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		host, _, _ := net.SplitHostPort(r.RemoteAddr)
		io.WriteString(w, netip.MustParseAddr(host).Unmap().String())
	})}
	go httpSrv.Serve(ln)
	t.Cleanup(func() { httpSrv.Close() })
	m.RunWaypoint(wp, waypoint.Config{Name: "waypoint", State: wpState, Registry: prometheus.NewRegistry(),
		Log: m.Logs.Logger("waypoint"), RootNamespace: meshtest.RootNamespace})

	t.Run("TCP through the waypoint", func(t *testing.T) {
		c, err := sleep.Dial(app.Addr(whoPort))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.(*net.TCPConn).CloseWrite()
		if got := readAll(t, c); got != sleep.IP.String() {
			t.Fatalf("app saw %s, want sleep %s (waypoint %s, app %s)", got, sleep.IP, wp.IP, app.IP)
		}
	})
	t.Run("HTTP through the waypoint", func(t *testing.T) {
		resp, err := sleep.Client().Get("http://" + app.Addr(8080).String() + "/")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if string(b) != wp.IP.String() {
			t.Fatalf("app saw %s, want the waypoint %s (sleep %s, app %s)", b, wp.IP, sleep.IP, app.IP)
		}
	})
}

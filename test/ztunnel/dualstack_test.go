package ztunnel

import (
	"io"
	"net"
	"net/netip"
	"testing"

	"github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi/security"
	"github.com/ambientmesh/ambient/proxylib/dnsproxy/dnsproxytest"
	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/redirect"
	"github.com/ambientmesh/ambient/proxylib/waypoint"
	"github.com/ambientmesh/ambient/test/meshtest"
)

// Dual-stack: every pod has an IPv4 and an IPv6 address and discovery
// lists both (meshtest.WithDualStack), services have a cluster IP of each
// family. IPv6 clients reach IPv6 servers through the real redirection and
// HBONE, policy sees IPv6 sources, and ztunnel keeps the family the client
// chose: an IPv6 service address is served by the endpoints' IPv6
// addresses, as Istio's ztunnel does.

var (
	dualVIP4 = netip.MustParseAddr("10.96.0.20")
	dualVIP6 = netip.MustParseAddr("fd00:96::20")
)

const dualHost = "whoami.default.svc.cluster.local"

// dualStackService publishes the dual-stack Service "whoami" (port 8000 →
// whoPort) whose endpoints are eps.
func dualStackService(m *meshtest.Mesh, families workloadapi.IPFamilies, vips ...netip.Addr) {
	svc := &workloadapi.Service{Name: "whoami", Namespace: "default", Hostname: dualHost, IpFamilies: families,
		Ports: []*workloadapi.Port{{ServicePort: 8000, TargetPort: whoPort}}}
	for _, v := range vips {
		svc.Addresses = append(svc.Addresses, &workloadapi.NetworkAddress{Address: v.AsSlice()})
	}
	m.CP.Service(svc)
}

func inDualService(w *workloadapi.Workload) {
	w.Services = map[string]*workloadapi.PortList{discovery.ServiceKey("default", dualHost): {Ports: []*workloadapi.Port{{ServicePort: 8000, TargetPort: whoPort}}}}
}

func TestDualStack(t *testing.T) {
	for _, b := range backends {
		t.Run(b.name, func(t *testing.T) { testDualStack(t, b.new) })
	}
}

func testDualStack(t *testing.T, newR func(redirect.Config) redirect.Redirector) {
	m := meshtest.New(t, 2, meshtest.WithDualStack())
	m.Redirect = preserving(newR)
	m.SyncAll()
	sleep := m.AddPod(m.Nodes[0], "sleep-1", "sleep", true)
	notsleep := m.AddPod(m.Nodes[0], "notsleep-1", "notsleep", true)
	remote := m.AddPod(m.Nodes[1], "httpbin-1", "httpbin", true, inDualService)
	local := m.AddPod(m.Nodes[0], "httpbin-2", "httpbin", true, inDualService)
	outside := m.AddPod(m.Nodes[1], "outside-1", "outside", false)
	for _, h := range []*meshtest.Pod{remote, local} {
		h.ServeTCP(t, whoPort, whoAmI)
		h.ServeHTTP(t, 80)
	}
	dualStackService(m, workloadapi.IPFamilies_DUAL, dualVIP4, dualVIP6)

	t.Run("IPv6 pod to pod, across nodes over HBONE and on one node", func(t *testing.T) {
		if got := seenBy(t, sleep, remote.Addr6(whoPort)); got != sleep.IP6.String() {
			t.Fatalf("across nodes the app saw %s, want the client's IPv6 %s", got, sleep.IP6)
		}
		m.Logs.WaitFor(t, "proxy to "+remote.Addr6(whoPort).String()+" using HBONE via "+remote.Addr6(15008).String()+" type Direct")
		m.Logs.WaitFor(t, "peer_id=spiffe://cluster.local/ns/default/sa/sleep}: got CONNECT request to "+remote.Addr6(whoPort).String())
		if got := seenBy(t, sleep, local.Addr6(whoPort)); got != sleep.IP6.String() {
			t.Fatalf("on one node the app saw %s, want the client's IPv6 %s", got, sleep.IP6)
		}
		m.Logs.WaitFor(t, "proxying to "+local.Addr6(whoPort).String()+" using node local fast path")
	})

	t.Run("an IPv6 service address is served over IPv6, an IPv4 one over IPv4", func(t *testing.T) {
		for _, tc := range []struct {
			vip  netip.Addr
			want netip.Addr
		}{{dualVIP6, sleep.IP6}, {dualVIP4, sleep.IP}} {
			// Two connections: round robin gives one to each replica.
			for i := 0; i < 2; i++ {
				if got := seenBy(t, sleep, netip.AddrPortFrom(tc.vip, 8000)); got != tc.want.String() {
					t.Fatalf("via %s the app saw %s, want %s (ztunnel must keep the client's family)", tc.vip, got, tc.want)
				}
			}
		}
		m.Logs.WaitFor(t, "proxy to "+remote.Addr6(whoPort).String()+" using HBONE via "+remote.Addr6(15008).String())
		m.Logs.WaitFor(t, "proxying to "+local.Addr6(whoPort).String()+" using node local fast path")
	})

	t.Run("a single-family service keeps its family", func(t *testing.T) {
		// An IPv6-only Service in a dual-stack cluster: its address is
		// IPv6 and so are the endpoint addresses chosen.
		dualStackService(m, workloadapi.IPFamilies_IPV6_ONLY, dualVIP6)
		defer dualStackService(m, workloadapi.IPFamilies_DUAL, dualVIP4, dualVIP6)
		for i := 0; i < 2; i++ {
			if got := seenBy(t, sleep, netip.AddrPortFrom(dualVIP6, 8000)); got != sleep.IP6.String() {
				t.Fatalf("IPv6-only service: the app saw %s, want %s", got, sleep.IP6)
			}
		}
	})

	t.Run("L4 policy by IPv6 source and by identity", func(t *testing.T) {
		bySource := &security.Authorization{Name: "allow-v6-sleep", Namespace: "default", Scope: security.Scope_NAMESPACE, Action: security.Action_ALLOW,
			Groups: []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{{SourceIps: []*security.Address{{Address: sleep.IP6.AsSlice(), Length: 128}}}}}}}}}
		m.CP.Policy(bySource)
		removed := false
		defer func() {
			if !removed {
				m.CP.Remove(discovery.AuthorizationType, "default/allow-v6-sleep")
				removed = true
			}
		}()
		meshtest.ExpectOK(t, sleep, remote.Addr6(80), "httpbin-1")
		meshtest.ExpectOK(t, sleep, local.Addr6(80), "httpbin-2")
		meshtest.ExpectRefused(t, notsleep, remote.Addr6(80))
		m.Logs.WaitFor(t, "RBAC rejected conn="+notsleep.IP6.String()+"(spiffe://cluster.local/ns/default/sa/notsleep)->"+remote.Addr6(80).String())
		// The same client over IPv4 is another source: refused.
		meshtest.ExpectRefused(t, sleep, remote.Addr(80))
		m.CP.Remove(discovery.AuthorizationType, "default/allow-v6-sleep")
		removed = true

		m.CP.Policy(meshtest.AllowPolicy("allow-sleep", sleep.ID().Principal()))
		defer m.CP.Remove(discovery.AuthorizationType, "default/allow-sleep")
		if got := seenBy(t, sleep, netip.AddrPortFrom(dualVIP6, 8000)); got != sleep.IP6.String() {
			t.Fatalf("sleep via the IPv6 VIP: the app saw %q, want %s", got, sleep.IP6)
		}
		meshtest.ExpectRefused(t, notsleep, local.Addr6(80))
		m.Logs.WaitFor(t, "RBAC rejected conn="+notsleep.IP6.String()+"(spiffe://cluster.local/ns/default/sa/notsleep)->"+local.Addr6(80).String())
	})

	t.Run("IPv6 client outside the mesh: PERMISSIVE allowed, STRICT refused", func(t *testing.T) {
		meshtest.ExpectOK(t, outside, remote.Addr6(80), "httpbin-1")
		m.Logs.WaitFor(t, "inbound{", "peer_ip="+outside.IP6.String()+" peer_id=none", "complete dur=")
		m.CP.Policy(meshtest.StrictPolicy())
		defer m.CP.Remove(discovery.AuthorizationType, "default/converted_peer_authentication_default")
		meshtest.ExpectRefused(t, outside, remote.Addr6(80))
		m.Logs.WaitFor(t, "RBAC rejected conn="+outside.IP6.String()+"(none)->"+remote.Addr6(80).String())
		meshtest.ExpectOK(t, sleep, remote.Addr6(80), "httpbin-1")
	})
}

// TestDualStackDNS: the pod's resolver is IPv6 (a dual-stack cluster's
// resolv.conf may name one); ztunnel captures DNS to it, answers AAAA for a
// dual-stack Service with its IPv6 cluster IP and A with its IPv4 one, and
// the answered address carries traffic through the mesh.
func TestDualStackDNS(t *testing.T) {
	m := meshtest.New(t, 2, meshtest.WithDNS(), meshtest.WithDualStack())
	m.SyncAll()
	res, resolver := addResolverPod(t, m, "[::]:53")
	nameserver := res.Addr6(53)
	m.DNSNameservers = []string{nameserver.String()}

	sleep := m.AddPod(m.Nodes[0], "sleep-1", "sleep", true)
	server := m.AddPod(m.Nodes[1], "httpbin-1", "httpbin", true, inDualService)
	server.ServeTCP(t, whoPort, whoAmI)
	dualStackService(m, workloadapi.IPFamilies_DUAL, dualVIP4, dualVIP6)

	for _, tc := range []struct {
		network string
		qtype   uint16
		want    netip.Addr
	}{{"udp", dns.TypeAAAA, dualVIP6}, {"tcp", dns.TypeAAAA, dualVIP6}, {"udp", dns.TypeA, dualVIP4}} {
		before := resolver.Total()
		r := query(t, sleep, nameserver, tc.network, dualHost+".", tc.qtype)
		if got := answerIPs(r); r.Rcode != dns.RcodeSuccess || len(got) != 1 || got[0] != tc.want.String() {
			t.Fatalf("%s %s: rcode %s answers %v, want %s", tc.network, dns.TypeToString[tc.qtype], dns.RcodeToString[r.Rcode], got, tc.want)
		}
		if n := resolver.Total() - before; n != 0 {
			t.Fatalf("%s %s: the resolver was asked %d times; ztunnel should answer", tc.network, dns.TypeToString[tc.qtype], n)
		}
	}
	if got := dnsCounter(t, m.Nodes[0], "sleep", "AAAA", "NOERROR", "ztunnel"); got != 2 {
		t.Fatalf("istio_dns_requests_total{qtype=AAAA,answered_by=ztunnel} = %v, want 2", got)
	}
	// Other names go to the IPv6 resolver, AAAA included.
	r := query(t, sleep, nameserver, "udp", dnsproxytest.External, dns.TypeAAAA)
	if got := answerIPs(r); len(got) != 1 || got[0] != dnsproxytest.ExternalIPv6.String() {
		t.Fatalf("external AAAA: rcode %s answers %v", dns.RcodeToString[r.Rcode], got)
	}
	m.Logs.WaitFor(t, "dns{pod=default/sleep-1}", "answered_by=upstream", "upstream="+nameserver.String())
	// Without source preservation the app sees ztunnel's connection from
	// its own pod address: IPv6, since the client chose IPv6.
	if got := seenBy(t, sleep, netip.AddrPortFrom(dualVIP6, 8000)); got != server.IP6.String() {
		t.Fatalf("through the AAAA answer the app saw %s, want %s", got, server.IP6)
	}
	m.Logs.WaitFor(t, "proxy to "+server.Addr6(whoPort).String()+" using HBONE via "+server.Addr6(15008).String())
}

// TestDualStackWaypoint: an IPv6 client of a dual-stack Service behind a
// real waypoint stays on IPv6 on both tunnels: its ztunnel reaches the
// waypoint at the waypoint's IPv6 address, the waypoint sends to the
// endpoint's IPv6 address, and the app sees the client's IPv6 address
// (the waypoint reports it, the destination ztunnel preserves it).
func TestDualStackWaypoint(t *testing.T) {
	if p := meshtest.TransportProtocol(); p != "" && p != hbone.HTTP2 {
		t.Skipf("the real waypoint serves HBONE over HTTP/2 only, not %s", p)
	}
	m := meshtest.New(t, 2, meshtest.WithDualStack())
	m.Redirect = preserving(backends[0].new)
	wpState := m.NewWaypointState()
	m.SyncAll()

	sleep := m.AddPod(m.Nodes[0], "sleep-1", "sleep", true)
	wp, gw := addWaypointPod(m, m.Nodes[1], netip.MustParseAddr("10.96.0.30"))
	app := m.AddPod(m.Nodes[1], "httpbin-1", "httpbin", true, inDualService)
	app.ServeTCP(t, whoPort, func(c net.Conn) {
		io.Copy(io.Discard, c)
		whoAmI(c)
	})
	svc := &workloadapi.Service{Name: "whoami", Namespace: "default", Hostname: dualHost, IpFamilies: workloadapi.IPFamilies_DUAL, Waypoint: gw,
		Addresses: []*workloadapi.NetworkAddress{{Address: dualVIP4.AsSlice()}, {Address: dualVIP6.AsSlice()}},
		Ports:     []*workloadapi.Port{{ServicePort: 8000, TargetPort: whoPort}}}
	m.CP.Service(svc)
	m.RunWaypoint(wp, waypoint.Config{Name: "waypoint", State: wpState, Registry: prometheus.NewRegistry(),
		Log: m.Logs.Logger("waypoint"), RootNamespace: meshtest.RootNamespace})

	for _, tc := range []struct {
		vip               netip.Addr
		want, wpAddr, app netip.Addr
	}{{dualVIP6, sleep.IP6, wp.IP6, app.IP6}, {dualVIP4, sleep.IP, wp.IP, app.IP}} {
		c, err := sleep.Dial(netip.AddrPortFrom(tc.vip, 8000))
		if err != nil {
			t.Fatal(err)
		}
		c.(*net.TCPConn).CloseWrite()
		got := readAll(t, c)
		c.Close()
		if got != tc.want.String() {
			t.Fatalf("via %s the app saw %s, want %s", tc.vip, got, tc.want)
		}
		m.Logs.WaitFor(t, "proxy to "+netip.AddrPortFrom(tc.vip, 8000).String()+" using HBONE via "+netip.AddrPortFrom(tc.wpAddr, 15008).String())
		m.Logs.WaitFor(t, "got CONNECT request to "+netip.AddrPortFrom(tc.app, whoPort).String())
	}
}

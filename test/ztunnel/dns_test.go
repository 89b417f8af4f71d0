package ztunnel

import (
	"context"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/dnsproxy/dnsproxytest"
	"github.com/ambientmesh/ambient/proxylib/inpod"
	"github.com/ambientmesh/ambient/proxylib/netnsutil"
	"github.com/ambientmesh/ambient/proxylib/redirect"
	"github.com/ambientmesh/ambient/test/meshtest"
)

// query sends one DNS query from inside pod p, as its resolver library
// would (unmarked, to the pod's nameserver), over network ("udp", "tcp");
// the pod's redirection decides where it really goes.
func query(t *testing.T, p *meshtest.Pod, server netip.AddrPort, network, name string, qtype uint16) *dns.Msg {
	t.Helper()
	f, err := p.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := netnsutil.Dial(ctx, f, network, server.String(), netnsutil.SocketOptions{})
	if err != nil {
		t.Fatalf("dial %s %s from %s: %v", network, server, p.PodName, err)
	}
	defer conn.Close()
	req := new(dns.Msg)
	req.SetQuestion(name, qtype)
	cl := &dns.Client{Net: network, Timeout: 5 * time.Second}
	m, _, err := cl.ExchangeWithConnContext(ctx, req, &dns.Conn{Conn: conn})
	if err != nil {
		t.Fatalf("%s %s %s from %s: %v", network, name, dns.TypeToString[qtype], p.PodName, err)
	}
	return m
}

func answerIPs(m *dns.Msg) []string {
	var out []string
	for _, rr := range m.Answer {
		switch rr := rr.(type) {
		case *dns.A:
			out = append(out, rr.A.String())
		case *dns.AAAA:
			out = append(out, rr.AAAA.String())
		}
	}
	return out
}

// TestDNSProxy: a captured pod whose DNS is captured asks its nameserver (a
// test resolver in another pod's namespace, outside the mesh) like any app.
// ztunnel answers the mesh's service names itself, with the service VIP
// (which then carries traffic through the mesh), and forwards other names
// to the test resolver from the pod's namespace with its mark (no loop);
// NXDOMAIN comes back as the resolver said, and a truncated UDP answer is
// completed over TCP. A pod whose DNS is not captured reaches the resolver
// directly.
func TestDNSProxy(t *testing.T) {
	m := meshtest.New(t, 2, meshtest.WithDNS())
	m.SyncAll()

	// The test resolver: a pod outside the mesh on node2.
	res, resolver := addResolverPod(t, m, "0.0.0.0:53")
	nameserver := netip.AddrPortFrom(res.IP, 53)
	m.DNSNameservers = []string{nameserver.String()}

	vip := netip.MustParseAddrPort("10.96.0.10:8000")
	svcKey := discovery.ServiceKey("default", "httpbin.default.svc.cluster.local")
	sleep := m.AddPod(m.Nodes[0], "sleep-1", "sleep", true)
	httpbin := m.AddPod(m.Nodes[1], "httpbin-1", "httpbin", true, func(w *workloadapi.Workload) {
		w.Services = map[string]*workloadapi.PortList{svcKey: {Ports: []*workloadapi.Port{{ServicePort: 8000, TargetPort: 80}}}}
	})
	httpbin.ServeHTTP(t, 80)
	m.CP.Service(&workloadapi.Service{Name: "httpbin", Namespace: "default", Hostname: "httpbin.default.svc.cluster.local",
		Addresses: []*workloadapi.NetworkAddress{{Address: vip.Addr().AsSlice()}},
		Ports:     []*workloadapi.Port{{ServicePort: 8000, TargetPort: 80}}})

	t.Run("service names answered by ztunnel", func(t *testing.T) {
		for _, tc := range []struct{ network, name string }{
			{"udp", "httpbin.default.svc.cluster.local."},
			{"udp", "httpbin.default.default.svc.cluster.local."}, // "httpbin.default" + search
			{"udp", "httpbin."},
			{"tcp", "httpbin.default.svc."},
		} {
			before := resolver.Total()
			r := query(t, sleep, nameserver, tc.network, tc.name, dns.TypeA)
			if got := answerIPs(r); r.Rcode != dns.RcodeSuccess || len(got) != 1 || got[0] != vip.Addr().String() {
				t.Fatalf("%s %s: rcode %s answers %v, want the VIP %s", tc.network, tc.name, dns.RcodeToString[r.Rcode], got, vip.Addr())
			}
			if n := resolver.Total() - before; n != 0 {
				t.Fatalf("%s %s: the test resolver was asked %d times; ztunnel should answer", tc.network, tc.name, n)
			}
		}
		// AAAA of an IPv4-only service: NOERROR, no answer, no forwarding.
		if r := query(t, sleep, nameserver, "udp", "httpbin.default.svc.cluster.local.", dns.TypeAAAA); r.Rcode != dns.RcodeSuccess || len(r.Answer) != 0 {
			t.Fatalf("AAAA: rcode %s answers %v, want NOERROR with none", dns.RcodeToString[r.Rcode], r.Answer)
		}
		// The VIP ztunnel gave carries traffic through the mesh.
		meshtest.ExpectOK(t, sleep, vip, "httpbin-1")
		m.Logs.WaitFor(t, "dns{pod=default/sleep-1}", "name=httpbin.default.svc.cluster.local. ", "answered_by=ztunnel")
		if got := dnsCounter(t, m.Nodes[0], "sleep", "A", "NOERROR", "ztunnel"); got < 4 {
			t.Fatalf("istio_dns_requests_total{answered_by=ztunnel} = %v, want >= 4", got)
		}
	})

	t.Run("other names forwarded to the pod's resolver", func(t *testing.T) {
		r := query(t, sleep, nameserver, "udp", dnsproxytest.External, dns.TypeA)
		if got := answerIPs(r); len(got) != 1 || got[0] != dnsproxytest.ExternalIP.String() {
			t.Fatalf("external name: rcode %s answers %v", dns.RcodeToString[r.Rcode], got)
		}
		if n := resolver.Queries("udp", dnsproxytest.External, dns.TypeA); n != 1 {
			t.Fatalf("test resolver got the external query %d times, want 1", n)
		}
		// Cached: asked again, the resolver is not.
		query(t, sleep, nameserver, "udp", dnsproxytest.External, dns.TypeA)
		if n := resolver.Queries("", dnsproxytest.External, dns.TypeA); n != 1 {
			t.Fatalf("test resolver asked %d times, want 1 (second answer from ztunnel's cache)", n)
		}
		if r := query(t, sleep, nameserver, "udp", dnsproxytest.NX, dns.TypeA); r.Rcode != dns.RcodeNameError {
			t.Fatalf("NXDOMAIN came back as %s", dns.RcodeToString[r.Rcode])
		}
		if r := query(t, sleep, nameserver, "udp", dnsproxytest.Fail, dns.TypeA); r.Rcode != dns.RcodeServerFailure {
			t.Fatalf("SERVFAIL came back as %s", dns.RcodeToString[r.Rcode])
		}
		// Too large for 512 bytes: ztunnel completes it over TCP upstream,
		// the UDP client gets it truncated, retries over TCP and gets it all.
		r = query(t, sleep, nameserver, "udp", dnsproxytest.Big, dns.TypeA)
		if !r.Truncated {
			t.Fatalf("big answer over UDP: tc=%t with %d answers, want truncated", r.Truncated, len(r.Answer))
		}
		if n := resolver.Queries("tcp", dnsproxytest.Big, dns.TypeA); n != 1 {
			t.Fatalf("ztunnel's TCP fallback to the resolver: %d queries, want 1", n)
		}
		if r := query(t, sleep, nameserver, "tcp", dnsproxytest.Big, dns.TypeA); len(r.Answer) != dnsproxytest.BigCount {
			t.Fatalf("big answer over TCP: %d answers, want %d", len(r.Answer), dnsproxytest.BigCount)
		}
		m.Logs.WaitFor(t, "dns{pod=default/sleep-1}", "answered_by=upstream", "upstream="+nameserver.String())
		if got := dnsCounter(t, m.Nodes[0], "sleep", "A", "NXDOMAIN", "upstream"); got != 1 {
			t.Fatalf("istio_dns_requests_total{rcode=NXDOMAIN,answered_by=upstream} = %v, want 1", got)
		}
	})

	t.Run("pod without DNS capture reaches its resolver directly", func(t *testing.T) {
		m.CaptureDNS = false
		notsleep := m.AddPod(m.Nodes[0], "notsleep-1", "notsleep", true)
		before := resolver.Queries("udp", "httpbin.default.svc.cluster.local.", dns.TypeA)
		if r := query(t, notsleep, nameserver, "udp", "httpbin.default.svc.cluster.local.", dns.TypeA); r.Rcode != dns.RcodeNameError {
			t.Fatalf("rcode %s, want the test resolver's NXDOMAIN (it knows no services)", dns.RcodeToString[r.Rcode])
		}
		if n := resolver.Queries("udp", "httpbin.default.svc.cluster.local.", dns.TypeA) - before; n != 1 {
			t.Fatalf("test resolver asked %d times, want 1", n)
		}
	})

	t.Run("admin shows the DNS proxy per pod", func(t *testing.T) {
		st := m.Nodes[0].Proxy.DNSStatus()
		if st == nil || st.ClusterDomain != "cluster.local" || st.CacheEntries == 0 {
			t.Fatalf("DNS status %+v", st)
		}
		pods := map[string]bool{}
		for _, p := range st.Pods {
			pods[p.Name] = p.Captured
			if p.Name == "sleep-1" && (len(p.Nameservers) != 1 || p.Nameservers[0] != nameserver.String()) {
				t.Errorf("sleep-1 upstreams %v, want %s", p.Nameservers, nameserver)
			}
		}
		if !pods["sleep-1"] || pods["notsleep-1"] {
			t.Fatalf("captured per pod %v: want sleep-1 only", pods)
		}
	})
}

// addResolverPod runs the test resolver (dnsproxytest) on UDP and TCP addr
// in "testresolver-1", a pod outside the mesh on the second node.
func addResolverPod(t *testing.T, m *meshtest.Mesh, addr string) (*meshtest.Pod, *dnsproxytest.Resolver) {
	t.Helper()
	res := m.AddPod(m.Nodes[1], "testresolver-1", "outside", false)
	rf, err := res.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer rf.Close()
	pc, err := netnsutil.ListenUDP(rf, addr, netnsutil.SocketOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := netnsutil.ListenTCP(rf, addr, netnsutil.SocketOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return res, dnsproxytest.Serve(t, pc, ln)
}

// dnsCounter reads istio_dns_requests_total of one series on node n.
func dnsCounter(t *testing.T, n *meshtest.Node, workload, qtype, rcode, by string) float64 {
	t.Helper()
	fams, err := n.Metrics.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, f := range fams {
		if f.GetName() != "istio_dns_requests_total" {
			continue
		}
		for _, mt := range f.GetMetric() {
			l := map[string]string{}
			for _, lp := range mt.GetLabel() {
				l[lp.GetName()] = lp.GetValue()
			}
			if l["source_workload"] == workload && l["query_type"] == qtype && l["response_code"] == rcode && l["answered_by"] == by {
				sum += mt.GetCounter().GetValue()
			}
		}
	}
	return sum
}

// TestProcessDNSProxy: the real cmd/ztunnel serves the DNS proxy for a pod
// the node agent hands over with capture_dns over the ZDS socket: service
// names from discovery (xDS), other names forwarded to the resolvers of its
// -dns-resolv-conf (the pod's own resolvers being unknown), metrics on
// :15020 and the dns section of /config_dump.
func TestProcessDNSProxy(t *testing.T) {
	m := meshtest.New(t, 0)
	cp := newXDSControlPlane(t, m.CA)
	n := &meshtest.Node{Node: m.Cluster.AddNode("node1"), NodeName: "node1"}
	m.Nodes = append(m.Nodes, n)

	res := n.AddPod("testresolver-1")
	rf, err := res.Open()
	if err != nil {
		t.Fatal(err)
	}
	pc, err := netnsutil.ListenUDP(rf, "0.0.0.0:53", netnsutil.SocketOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := netnsutil.ListenTCP(rf, "0.0.0.0:53", netnsutil.SocketOptions{})
	if err != nil {
		t.Fatal(err)
	}
	rf.Close()
	resolver := dnsproxytest.Serve(t, pc, ln)
	resolvConf := filepath.Join(t.TempDir(), "resolv.conf")
	if err := os.WriteFile(resolvConf, []byte("nameserver "+res.IP.String()+"\noptions ndots:5\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	z := startZtunnel(t, cp, n, "-dns-resolv-conf", resolvConf)

	vip := netip.MustParseAddr("10.96.0.44")
	cp.set(discovery.AddressType, "default/echo.default.svc.cluster.local", &workloadapi.Address{Type: &workloadapi.Address_Service{Service: &workloadapi.Service{
		Name: "echo", Namespace: "default", Hostname: "echo.default.svc.cluster.local",
		Addresses: []*workloadapi.NetworkAddress{{Address: vip.AsSlice()}}, Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}}}}})

	np := n.AddPod("sleep-1")
	client := &meshtest.Pod{Pod: np, PodName: "sleep-1", Namespace: "default", ServiceAccount: "sleep", Node: n, UID: discovery.PodUID(meshtest.ClusterID, "default", "sleep-1")}
	cp.workload(&workloadapi.Workload{Uid: client.UID, Name: "sleep-1", Namespace: "default", Addresses: [][]byte{np.IP.AsSlice()},
		TrustDomain: m.CA.TrustDomain, ServiceAccount: "sleep", Node: "node1", WorkloadName: "sleep", CanonicalName: "sleep",
		ClusterId: meshtest.ClusterID, TunnelProtocol: workloadapi.TunnelProtocol_HBONE})
	f, err := np.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := redirect.NewNFTables(redirect.DefaultConfig().WithDNS()).Install(f); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := z.agent.AddWorkload(ctx, client.UID, inpod.WorkloadInfo{Name: "sleep-1", Namespace: "default", ServiceAccount: "sleep", CaptureDNS: true}, f); err != nil {
		t.Fatal(err)
	}
	z.snapshotSent(t)
	waitUntil(t, z.ready, "ztunnel ready")

	// The pod asks "its" resolver; the redirect takes the query to ztunnel.
	var r *dns.Msg
	waitUntil(t, func() bool {
		r = query(t, client, netip.AddrPortFrom(res.IP, 53), "udp", "echo.default.svc.cluster.local.", dns.TypeA)
		return len(answerIPs(r)) == 1
	}, "the service to reach ztunnel's discovery state")
	if got := answerIPs(r); got[0] != vip.String() || resolver.Total() != 0 {
		t.Fatalf("echo: answers %v (test resolver asked %d times), want %s from ztunnel", got, resolver.Total(), vip)
	}
	r = query(t, client, netip.AddrPortFrom(res.IP, 53), "tcp", dnsproxytest.External, dns.TypeA)
	if got := answerIPs(r); len(got) != 1 || got[0] != dnsproxytest.ExternalIP.String() || resolver.Queries("", dnsproxytest.External, dns.TypeA) != 1 {
		t.Fatalf("external: answers %v, resolver asked %d times", got, resolver.Queries("", dnsproxytest.External, dns.TypeA))
	}
	metrics := z.get(t, "127.0.0.1:15020", "/metrics")
	for _, want := range []string{
		`istio_dns_requests_total{answered_by="ztunnel",query_type="A",response_code="NOERROR",source_workload="sleep",source_workload_namespace="default"}`,
		`istio_dns_requests_total{answered_by="upstream",query_type="A",response_code="NOERROR",source_workload="sleep",source_workload_namespace="default"} 1`,
		`istio_dns_upstream_requests_total{protocol="tcp"} 1`,
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	dump := z.get(t, "127.0.0.1:15000", "/config_dump")
	for _, want := range []string{`"dns": {`, `"defaultUpstreams": [`, res.IP.String() + `:53"`, `"captured": true`} {
		if !strings.Contains(dump, want) {
			t.Errorf("config_dump lacks %s", want)
		}
	}
}

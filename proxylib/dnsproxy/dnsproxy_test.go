package dnsproxy

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sort"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/dnsproxy/dnsproxytest"
	"github.com/ambientmesh/ambient/proxylib/netnsutil"
)

// fakeServices is a discovery state of a few services.
type fakeServices struct {
	svcs      map[string]*workloadapi.Service
	endpoints map[string][]*workloadapi.Workload
}

func (f *fakeServices) ServiceByKey(k string) *workloadapi.Service { return f.svcs[k] }
func (f *fakeServices) Endpoints(k string) []*workloadapi.Workload { return f.endpoints[k] }
func (f *fakeServices) ServicesByHostname(h string) []*workloadapi.Service {
	var keys []string
	for k, svc := range f.svcs {
		if svc.Hostname == h {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	var out []*workloadapi.Service
	for _, k := range keys {
		out = append(out, f.svcs[k])
	}
	return out
}

func (f *fakeServices) add(name, ns string, ips ...string) string {
	host := name + "." + ns + ".svc.cluster.local"
	svc := &workloadapi.Service{Name: name, Namespace: ns, Hostname: host}
	for _, ip := range ips {
		svc.Addresses = append(svc.Addresses, &workloadapi.NetworkAddress{Address: netip.MustParseAddr(ip).AsSlice()})
	}
	f.svcs[discovery.ServiceKey(ns, host)] = svc
	return discovery.ServiceKey(ns, host)
}

func testServices() *fakeServices {
	f := &fakeServices{svcs: map[string]*workloadapi.Service{}, endpoints: map[string][]*workloadapi.Workload{}}
	f.add("echo", "default", "10.96.0.20")
	f.add("db", "data", "10.96.0.30", "fd00::30")
	key := f.add("headless", "default")
	f.endpoints[key] = []*workloadapi.Workload{
		{Uid: "a", Addresses: [][]byte{netip.MustParseAddr("10.244.1.7").AsSlice()}, Status: workloadapi.WorkloadStatus_HEALTHY},
		{Uid: "b", Addresses: [][]byte{netip.MustParseAddr("10.244.1.8").AsSlice()}, Status: workloadapi.WorkloadStatus_UNHEALTHY},
	}
	// ServiceEntry hosts: auto-allocated VIPs of both families; one
	// without VIPs answered with its static endpoint; one with neither
	// (resolution NONE); one host declared in two namespaces.
	f.addHost("api.example.com", "egress", "240.240.0.1", "2001:2::1")
	key = f.addHost("static.example.com", "default")
	f.endpoints[key] = []*workloadapi.Workload{{Uid: "s", Addresses: [][]byte{netip.MustParseAddr("192.0.2.10").AsSlice()}, Status: workloadapi.WorkloadStatus_HEALTHY}}
	f.addHost("none.example.com", "default")
	f.addHost("dup.example.com", "aaa", "240.240.0.2")
	f.addHost("dup.example.com", "default", "240.240.0.3")
	return f
}

// addHost adds a ServiceEntry host's service.
func (f *fakeServices) addHost(host, ns string, ips ...string) string {
	svc := &workloadapi.Service{Name: "se", Namespace: ns, Hostname: host}
	for _, ip := range ips {
		svc.Addresses = append(svc.Addresses, &workloadapi.NetworkAddress{Address: netip.MustParseAddr(ip).AsSlice()})
	}
	f.svcs[discovery.ServiceKey(ns, host)] = svc
	return discovery.ServiceKey(ns, host)
}

// recorder is a dns.ResponseWriter that keeps what was written.
type recorder struct {
	udp  bool
	mu   sync.Mutex
	msg  *dns.Msg
	wire int // bytes on the wire
}

func (r *recorder) LocalAddr() net.Addr {
	if r.udp {
		return &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: Port}
	}
	return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: Port}
}

func (r *recorder) RemoteAddr() net.Addr {
	if r.udp {
		return &net.UDPAddr{IP: net.IPv4(10, 244, 1, 5), Port: 40000}
	}
	return &net.TCPAddr{IP: net.IPv4(10, 244, 1, 5), Port: 40000}
}

func (r *recorder) WriteMsg(m *dns.Msg) error {
	// What the client receives: packed and parsed again.
	b, err := m.Pack()
	if err != nil {
		return err
	}
	got := new(dns.Msg)
	if err := got.Unpack(b); err != nil {
		return err
	}
	r.mu.Lock()
	r.msg, r.wire = got, len(b)
	r.mu.Unlock()
	return nil
}
func (r *recorder) Write(b []byte) (int, error) { return len(b), nil }
func (r *recorder) Close() error                { return nil }
func (r *recorder) TsigStatus() error           { return nil }
func (r *recorder) TsigTimersOnly(bool)         {}
func (r *recorder) Hijack()                     {}

type env struct {
	p   *Proxy
	h   dns.Handler
	up  *dnsproxytest.Resolver
	reg *prometheus.Registry
	// lastWire is the size of the last answer on the wire.
	lastWire int
}

func newEnv(t *testing.T, cache *Cache) *env {
	t.Helper()
	up := dnsproxytest.ServeLocal(t)
	reg := prometheus.NewRegistry()
	p, err := New(Config{Services: testServices(), Cache: cache, Metrics: NewMetrics(reg), Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	h := p.Handler(Client{Name: "sleep-1", Namespace: "default", Workload: func() string { return "sleep" },
		Upstreams: func() []string { return []string{up.Addr.String()} }})
	return &env{p: p, h: h, up: up, reg: reg}
}

// ask sends a query as a UDP (udp=true, with EDNS buffer size edns when
// > 0) or TCP client and returns the answer.
func (e *env) ask(t *testing.T, name string, qtype uint16, udp bool, edns uint16) *dns.Msg {
	t.Helper()
	req := new(dns.Msg)
	req.SetQuestion(name, qtype)
	if edns > 0 {
		req.SetEdns0(edns, false)
	}
	w := &recorder{udp: udp}
	e.h.ServeDNS(w, req)
	e.lastWire = w.wire
	if w.msg == nil {
		t.Fatalf("%s %s: no answer written", name, dns.TypeToString[qtype])
	}
	if w.msg.Id != req.Id {
		t.Fatalf("answer id %d, query id %d", w.msg.Id, req.Id)
	}
	return w.msg
}

func addrs(m *dns.Msg) []string {
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

func TestResolve(t *testing.T) {
	e := newEnv(t, nil)
	for _, tc := range []struct {
		name  string
		qtype uint16
		rcode int
		want  []string
		// local: answered by the proxy, the upstream never asked.
		local bool
	}{
		// Every search-domain form of a service, from a pod in "default".
		{"echo.", dns.TypeA, dns.RcodeSuccess, []string{"10.96.0.20"}, true},
		{"echo.default.", dns.TypeA, dns.RcodeSuccess, []string{"10.96.0.20"}, true},
		{"echo.default.svc.", dns.TypeA, dns.RcodeSuccess, []string{"10.96.0.20"}, true},
		{"echo.default.svc.cluster.local.", dns.TypeA, dns.RcodeSuccess, []string{"10.96.0.20"}, true},
		{"ECHO.Default.SVC.cluster.local.", dns.TypeA, dns.RcodeSuccess, []string{"10.96.0.20"}, true},
		// The resolver's search list appended (ndots:5): "echo", "echo.default", "db.data.svc".
		{"echo.default.svc.cluster.local.", dns.TypeA, dns.RcodeSuccess, []string{"10.96.0.20"}, true},
		{"echo.svc.cluster.local.", dns.TypeA, dns.RcodeSuccess, []string{"10.96.0.20"}, true},
		{"echo.default.default.svc.cluster.local.", dns.TypeA, dns.RcodeSuccess, []string{"10.96.0.20"}, true},
		{"db.data.default.svc.cluster.local.", dns.TypeA, dns.RcodeSuccess, []string{"10.96.0.30"}, true},
		{"db.data.svc.default.svc.cluster.local.", dns.TypeA, dns.RcodeSuccess, []string{"10.96.0.30"}, true},
		{"db.data.svc.cluster.local.cluster.local.", dns.TypeA, dns.RcodeSuccess, []string{"10.96.0.30"}, true},
		// Another namespace's service needs its namespace.
		{"db.data.", dns.TypeA, dns.RcodeSuccess, []string{"10.96.0.30"}, true},
		{"db.data.svc.cluster.local.", dns.TypeAAAA, dns.RcodeSuccess, []string{"fd00::30"}, true},
		// IPv4-only service, AAAA: NOERROR with no answer (NODATA), not forwarded.
		{"echo.default.svc.cluster.local.", dns.TypeAAAA, dns.RcodeSuccess, nil, true},
		// Headless: the healthy endpoints.
		{"headless.default.svc.cluster.local.", dns.TypeA, dns.RcodeSuccess, []string{"10.244.1.7"}, true},
		// Not a service: forwarded, the upstream's answer as it is.
		{"db.", dns.TypeA, dns.RcodeNameError, nil, false},
		{"db.default.svc.cluster.local.", dns.TypeA, dns.RcodeNameError, nil, false},
		{"echo.other.svc.cluster.local.", dns.TypeA, dns.RcodeNameError, nil, false},
		{dnsproxytest.External, dns.TypeA, dns.RcodeSuccess, []string{dnsproxytest.ExternalIP.String()}, false},
		{dnsproxytest.External, dns.TypeAAAA, dns.RcodeSuccess, []string{dnsproxytest.ExternalIPv6.String()}, false},
		{dnsproxytest.NX, dns.TypeA, dns.RcodeNameError, nil, false},
		{dnsproxytest.Fail, dns.TypeA, dns.RcodeServerFailure, nil, false},
		// ServiceEntry hosts, written in full: their VIPs (auto-allocated
		// ones included), the client's namespace first for a host declared
		// twice; without VIPs the static endpoints; a host with no address
		// (resolution NONE) goes to the pod's resolver.
		{"api.example.com.", dns.TypeA, dns.RcodeSuccess, []string{"240.240.0.1"}, true},
		{"API.Example.com.", dns.TypeAAAA, dns.RcodeSuccess, []string{"2001:2::1"}, true},
		{"static.example.com.", dns.TypeA, dns.RcodeSuccess, []string{"192.0.2.10"}, true},
		{"dup.example.com.", dns.TypeA, dns.RcodeSuccess, []string{"240.240.0.3"}, true},
		{"none.example.com.", dns.TypeA, dns.RcodeNameError, nil, false},
		// Other types for a service name go upstream too.
		{"echo.default.svc.cluster.local.", dns.TypeTXT, dns.RcodeNameError, nil, false},
	} {
		t.Run(tc.name+"/"+dns.TypeToString[tc.qtype], func(t *testing.T) {
			before := e.up.Queries("", tc.name, tc.qtype)
			m := e.ask(t, tc.name, tc.qtype, true, 0)
			if m.Rcode != tc.rcode {
				t.Fatalf("rcode %s, want %s", dns.RcodeToString[m.Rcode], dns.RcodeToString[tc.rcode])
			}
			if got := addrs(m); len(got) != len(tc.want) || (len(got) > 0 && got[0] != tc.want[0]) {
				t.Fatalf("answers %v, want %v", got, tc.want)
			}
			if len(m.Answer) > 0 && m.Answer[0].Header().Name != tc.name {
				t.Errorf("owner name %q, want the query's %q", m.Answer[0].Header().Name, tc.name)
			}
			asked := e.up.Queries("", tc.name, tc.qtype) - before
			if tc.local && (asked != 0 || !m.Authoritative || m.Answer != nil && m.Answer[0].Header().Ttl != LocalTTL) {
				t.Errorf("want a local answer (aa, ttl %d), got aa=%t, upstream asked %d times", LocalTTL, m.Authoritative, asked)
			}
			if !tc.local && asked+e.cached(tc.name, tc.qtype) == 0 {
				t.Errorf("want it forwarded, upstream never asked")
			}
		})
	}
	if got := counter(t, e.p.m.Requests.WithLabelValues("sleep", "default", "A", "NOERROR", AnsweredLocal)); got < 10 {
		t.Errorf("istio_dns_requests_total{answered_by=ztunnel,type=A,rcode=NOERROR} = %v, want >= 10", got)
	}
	if got := counter(t, e.p.m.Requests.WithLabelValues("sleep", "default", "A", "SERVFAIL", AnsweredUpstream)); got != 1 {
		t.Errorf("istio_dns_requests_total{rcode=SERVFAIL,answered_by=upstream} = %v, want 1", got)
	}
}

// cached reports whether the proxy's cache holds the answer (a repeated
// forwarded name in the table may be answered from it).
func (e *env) cached(name string, qtype uint16) int {
	req := new(dns.Msg)
	req.SetQuestion(name, qtype)
	k, _ := keyOf([]string{e.up.Addr.String()}, req)
	if _, ok := e.p.cache.Get(k); ok {
		return 1
	}
	return 0
}

func TestNXDOMAINKeepsAuthority(t *testing.T) {
	e := newEnv(t, nil)
	m := e.ask(t, dnsproxytest.NX, dns.TypeA, true, 0)
	if m.Rcode != dns.RcodeNameError || len(m.Ns) != 1 {
		t.Fatalf("rcode %s, authority %v: want NXDOMAIN with the upstream's SOA", dns.RcodeToString[m.Rcode], m.Ns)
	}
	if _, ok := m.Ns[0].(*dns.SOA); !ok {
		t.Fatalf("authority %v, want SOA", m.Ns[0])
	}
}

func TestTruncatedAnswerRetriedOverTCP(t *testing.T) {
	e := newEnv(t, nil)
	// The upstream truncates a plain (512-byte) UDP answer; the proxy asks
	// again over TCP and then has the full answer.
	m := e.ask(t, dnsproxytest.Big, dns.TypeA, false, 0) // TCP client
	if len(m.Answer) != dnsproxytest.BigCount || m.Truncated {
		t.Fatalf("TCP client: %d answers (tc=%t), want %d", len(m.Answer), m.Truncated, dnsproxytest.BigCount)
	}
	if e.up.Queries("tcp", dnsproxytest.Big, dns.TypeA) != 1 {
		t.Fatalf("upstream TCP queries %d, want 1", e.up.Queries("tcp", dnsproxytest.Big, dns.TypeA))
	}

	e = newEnv(t, nil)
	m = e.ask(t, dnsproxytest.Big, dns.TypeA, true, 0) // UDP client, 512 bytes
	if got := [2]int{e.up.Queries("udp", dnsproxytest.Big, dns.TypeA), e.up.Queries("tcp", dnsproxytest.Big, dns.TypeA)}; got != [2]int{1, 1} {
		t.Fatalf("upstream udp/tcp queries %v, want UDP then the TCP fallback", got)
	}
	if !m.Truncated || len(m.Answer) >= dnsproxytest.BigCount {
		t.Fatalf("UDP 512 client: tc=%t with %d answers: want the answer truncated to fit", m.Truncated, len(m.Answer))
	}
	if l := e.lastWire; l > dns.MinMsgSize {
		t.Fatalf("UDP answer of %d bytes exceeds 512", l)
	}
	// A client with a large EDNS buffer gets it all over UDP (from the cache).
	m = e.ask(t, dnsproxytest.Big, dns.TypeA, true, 4096)
	if m.Truncated || len(m.Answer) != dnsproxytest.BigCount {
		t.Fatalf("UDP EDNS 4096 client: tc=%t with %d answers, want all %d", m.Truncated, len(m.Answer), dnsproxytest.BigCount)
	}
}

func TestUpstreamDownIsServfail(t *testing.T) {
	reg := prometheus.NewRegistry()
	p, _ := New(Config{Services: testServices(), Metrics: NewMetrics(reg), Timeout: 300 * time.Millisecond})
	// A port nobody listens on (UDP: ICMP unreachable or a timeout).
	pc, _ := net.ListenPacket("udp", "127.0.0.1:0")
	dead := pc.LocalAddr().String()
	pc.Close()
	e := &env{p: p, h: p.Handler(Client{Namespace: "default", Upstreams: func() []string { return []string{dead} }})}
	m := e.ask(t, dnsproxytest.External, dns.TypeA, true, 0)
	if m.Rcode != dns.RcodeServerFailure {
		t.Fatalf("rcode %s, want SERVFAIL", dns.RcodeToString[m.Rcode])
	}
	if got := counter(t, p.m.UpstreamFailures.WithLabelValues("udp", "error")) + counter(t, p.m.UpstreamFailures.WithLabelValues("udp", "timeout")); got != 1 {
		t.Fatalf("istio_dns_upstream_failures_total = %v, want 1", got)
	}
	// Local answers still work without upstream.
	if m := e.ask(t, "echo.", dns.TypeA, true, 0); len(addrs(m)) != 1 {
		t.Fatalf("local answer without upstream: %v", m)
	}
	// No upstream at all.
	e.h = p.Handler(Client{Namespace: "default"})
	if m := e.ask(t, dnsproxytest.External, dns.TypeA, true, 0); m.Rcode != dns.RcodeServerFailure {
		t.Fatalf("no upstream: rcode %s, want SERVFAIL", dns.RcodeToString[m.Rcode])
	}
}

func TestCacheHonoursTTL(t *testing.T) {
	c := NewCache(16, 0)
	now := time.Unix(1000, 0)
	c.now = func() time.Time { return now }
	e := newEnv(t, c)
	ask := func() *dns.Msg { return e.ask(t, dnsproxytest.External, dns.TypeA, true, 0) }
	ask()
	now = now.Add(20 * time.Second)
	m := ask()
	if n := e.up.Queries("", dnsproxytest.External, dns.TypeA); n != 1 {
		t.Fatalf("upstream asked %d times, want 1 (second from cache)", n)
	}
	if ttl := m.Answer[0].Header().Ttl; ttl != dnsproxytest.ExternalTTL-20 {
		t.Fatalf("cached TTL %d, want %d (aged)", ttl, dnsproxytest.ExternalTTL-20)
	}
	if got := counter(t, e.p.m.Requests.WithLabelValues("sleep", "default", "A", "NOERROR", AnsweredCache)); got != 1 {
		t.Fatalf("cache answers counted %v, want 1", got)
	}
	// Another spelling of the name is the same entry, answered with the
	// question as asked.
	if m := e.ask(t, "EXTERNAL.example.", dns.TypeA, true, 0); m.Question[0].Name != "EXTERNAL.example." || len(m.Answer) != 1 {
		t.Fatalf("cached answer to another spelling: %v", m)
	}
	if n := e.up.Queries("", dnsproxytest.External, dns.TypeA); n != 1 {
		t.Fatalf("upstream asked %d times, want 1", n)
	}
	now = now.Add(41 * time.Second) // past the TTL
	ask()
	if n := e.up.Queries("", dnsproxytest.External, dns.TypeA); n != 2 {
		t.Fatalf("upstream asked %d times after expiry, want 2", n)
	}
	// Negative answers are kept for the SOA's TTL; SERVFAIL is never kept.
	e.ask(t, dnsproxytest.NX, dns.TypeA, true, 0)
	e.ask(t, dnsproxytest.NX, dns.TypeA, true, 0)
	e.ask(t, dnsproxytest.Fail, dns.TypeA, true, 0)
	e.ask(t, dnsproxytest.Fail, dns.TypeA, true, 0)
	if nx, fail := e.up.Queries("", dnsproxytest.NX, dns.TypeA), e.up.Queries("", dnsproxytest.Fail, dns.TypeA); nx != 1 || fail != 2 {
		t.Fatalf("upstream asked NX %d, SERVFAIL %d times; want 1 (cached) and 2 (never cached)", nx, fail)
	}
}

func TestCacheBound(t *testing.T) {
	c := NewCache(3, 0)
	msg := func(name string) (cacheKey, *dns.Msg) {
		req := new(dns.Msg)
		req.SetQuestion(name, dns.TypeA)
		m := new(dns.Msg)
		m.SetReply(req)
		m.Answer = []dns.RR{&dns.A{Hdr: dns.RR_Header{Name: name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60}, A: net.IPv4(192, 0, 2, 1)}}
		k, _ := keyOf([]string{"10.96.0.10:53"}, req)
		return k, m
	}
	for i := 0; i < 10; i++ {
		k, m := msg("n" + strconv.Itoa(i) + ".example.")
		c.Put(k, m)
		if i == 1 { // keep n0 recently used
			k0, _ := msg("n0.example.")
			c.Get(k0)
		}
	}
	if c.Len() != 3 {
		t.Fatalf("cache holds %d answers, bound is 3", c.Len())
	}
	for i, want := range map[int]bool{0: false, 7: true, 8: true, 9: true, 1: false} {
		k, _ := msg("n" + strconv.Itoa(i) + ".example.")
		if _, ok := c.Get(k); ok != want {
			t.Errorf("n%d cached=%t, want %t", i, ok, want)
		}
	}
}

func TestCandidates(t *testing.T) {
	for _, tc := range []struct {
		q    string
		want []svcRef
	}{
		{"a.", []svcRef{{"a", "ns"}}},
		{"a.b.", []svcRef{{"a", "b"}}},
		{"a.ns.svc.cluster.local.", []svcRef{{"a", "ns"}}},
		{"a.b.ns.svc.cluster.local.", []svcRef{{"a", "b"}}},
		{"www.example.com.", nil},
		{".", nil},
	} {
		got := candidates(tc.q, "ns", "cluster.local")
		if len(got) != len(tc.want) || (len(got) > 0 && got[0] != tc.want[0]) {
			t.Errorf("candidates(%q) = %v, want %v", tc.q, got, tc.want)
		}
	}
}

var defaultOpts = netnsutil.SocketOptions{ReuseAddr: true}

// TestServePod: the per-pod servers answer on UDP and TCP.
func TestServePod(t *testing.T) {
	p, _ := New(Config{Services: testServices()})
	// A free port on both transports.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	old := ListenHosts
	ListenHosts = []string{"127.0.0.1"}
	defer func() { ListenHosts = old }()
	s, err := p.ServePod(nil, Client{Namespace: "default"}, port, defaultOpts)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for _, network := range []string{"udp", "tcp"} {
		req := new(dns.Msg)
		req.SetQuestion("echo.default.svc.cluster.local.", dns.TypeA)
		cl := &dns.Client{Net: network, Timeout: 2 * time.Second}
		m, _, err := cl.ExchangeContext(context.Background(), req, net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err != nil {
			t.Fatalf("%s: %v", network, err)
		}
		if got := addrs(m); len(got) != 1 || got[0] != "10.96.0.20" {
			t.Fatalf("%s: answers %v", network, got)
		}
	}
}

func counter(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

// TestInflightBound: a pod's queries waiting on upstreams are bounded;
// beyond the bound it gets SERVFAIL at once, local answers still work.
func TestInflightBound(t *testing.T) {
	p, _ := New(Config{Services: testServices(), MaxInflight: 1, Timeout: 5 * time.Second})
	release := make(chan struct{})
	dialing := make(chan struct{}, 1)
	h := p.Handler(Client{Namespace: "default", Upstreams: func() []string { return []string{"192.0.2.53:53"} },
		Dial: func(ctx context.Context, _, _ string) (net.Conn, error) {
			dialing <- struct{}{}
			<-release
			return nil, errors.New("released")
		}})
	e := &env{p: p, h: h}
	done := make(chan *dns.Msg)
	go func() {
		req := new(dns.Msg)
		req.SetQuestion("slow.example.", dns.TypeA)
		w := &recorder{udp: true}
		h.ServeDNS(w, req)
		done <- w.msg
	}()
	<-dialing
	start := time.Now()
	if m := e.ask(t, "other.example.", dns.TypeA, true, 0); m.Rcode != dns.RcodeServerFailure || time.Since(start) > time.Second {
		t.Fatalf("over the bound: rcode %s after %v, want SERVFAIL at once", dns.RcodeToString[m.Rcode], time.Since(start))
	}
	if m := e.ask(t, "echo.", dns.TypeA, true, 0); len(addrs(m)) != 1 {
		t.Fatalf("local answer while upstreams are busy: %v", m)
	}
	if got := counter(t, p.m.UpstreamFailures.WithLabelValues("udp", "overloaded")); got != 1 {
		t.Fatalf("overloaded failures %v, want 1", got)
	}
	close(release)
	if m := <-done; m.Rcode != dns.RcodeServerFailure {
		t.Fatalf("released query: rcode %s", dns.RcodeToString[m.Rcode])
	}
}

package proxy

import (
	"context"
	"net"
	"net/netip"
	"strings"
	"testing"

	"google.golang.org/protobuf/types/known/anypb"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/dnsproxy/dnsproxytest"
)

func applyAddr(t *testing.T, s *discovery.State, name string, a *workloadapi.Address) {
	t.Helper()
	body, err := anypb.New(a)
	if err != nil {
		t.Fatal(err)
	}
	body.TypeUrl = discovery.AddressType
	if err := s.Apply(discovery.AddressType, []discovery.Resource{{Name: name, Version: "1", Body: body}}, nil); err != nil {
		t.Fatal(err)
	}
}

func wl(name, ip, node string, hbone bool, mut ...func(*workloadapi.Workload)) *workloadapi.Workload {
	w := &workloadapi.Workload{Uid: "c//Pod/default/" + name, Name: name, Namespace: "default", ServiceAccount: name,
		Addresses: [][]byte{netip.MustParseAddr(ip).AsSlice()}, Node: node}
	if hbone {
		w.TunnelProtocol = workloadapi.TunnelProtocol_HBONE
	}
	for _, f := range mut {
		f(w)
	}
	return w
}

func TestRouterResolve(t *testing.T) {
	s := discovery.NewState(discovery.AddressType)
	svcKey := "default/web.default.svc.cluster.local"
	wpKey := "default/wp.default.svc.cluster.local"
	inSvc := func(port uint32) func(*workloadapi.Workload) {
		return func(w *workloadapi.Workload) {
			w.Services = map[string]*workloadapi.PortList{svcKey: {Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: port}}}}
		}
	}
	gw := &workloadapi.GatewayAddress{Destination: &workloadapi.GatewayAddress_Hostname{Hostname: &workloadapi.NamespacedHostname{Namespace: "default", Hostname: "wp.default.svc.cluster.local"}}}
	for _, w := range []*workloadapi.Workload{
		wl("client", "10.0.1.1", "n1", true),
		wl("web-a", "10.0.1.2", "n1", true, inSvc(8080)),
		wl("web-b", "10.0.2.2", "n2", true, inSvc(8080)),
		wl("web-sick", "10.0.2.3", "n2", true, inSvc(8080), func(w *workloadapi.Workload) { w.Status = workloadapi.WorkloadStatus_UNHEALTHY }),
		wl("legacy", "10.0.2.9", "n2", false),
		wl("guarded", "10.0.2.7", "n2", true, func(w *workloadapi.Workload) { w.Waypoint = gw }),
		wl("wp", "10.0.2.8", "n2", false, func(w *workloadapi.Workload) {
			w.Services = map[string]*workloadapi.PortList{wpKey: {}}
		}),
	} {
		applyAddr(t, s, w.Uid, &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: w}})
	}
	applyAddr(t, s, svcKey, &workloadapi.Address{Type: &workloadapi.Address_Service{Service: &workloadapi.Service{Name: "web", Namespace: "default", Hostname: "web.default.svc.cluster.local",
		Addresses: []*workloadapi.NetworkAddress{{Address: []byte{10, 96, 0, 1}}}, Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}}}}})
	applyAddr(t, s, wpKey, &workloadapi.Address{Type: &workloadapi.Address_Service{Service: &workloadapi.Service{Name: "wp", Namespace: "default", Hostname: "wp.default.svc.cluster.local",
		Addresses: []*workloadapi.NetworkAddress{{Address: []byte{10, 96, 0, 2}}}}}})
	guardedSvc := "default/guarded.default.svc.cluster.local"
	applyAddr(t, s, guardedSvc, &workloadapi.Address{Type: &workloadapi.Address_Service{Service: &workloadapi.Service{Name: "guarded", Namespace: "default", Hostname: "guarded.default.svc.cluster.local",
		Addresses: []*workloadapi.NetworkAddress{{Address: []byte{10, 96, 0, 3}}}, Waypoint: gw}}})
	emptySvc := "default/empty.default.svc.cluster.local"
	applyAddr(t, s, emptySvc, &workloadapi.Address{Type: &workloadapi.Address_Service{Service: &workloadapi.Service{Name: "empty", Namespace: "default", Hostname: "empty.default.svc.cluster.local",
		Addresses: []*workloadapi.NetworkAddress{{Address: []byte{10, 96, 0, 4}}}}}})

	r := &Router{State: s, Node: "n1", TrustDomain: "cluster.local"}
	client := s.WorkloadByUID("c//Pod/default/client")
	wp := s.WorkloadByUID("c//Pod/default/wp")
	ap := netip.MustParseAddrPort
	cases := []struct {
		name      string
		src       *workloadapi.Workload
		dst       string
		kind      RouteKind
		target    string
		proxy     string
		expected  string
		waypoint  bool
		errReason string
	}{
		{"remote pod: HBONE to it", client, "10.0.2.2:8080", HBONE, "10.0.2.2:8080", "10.0.2.2:15008", "spiffe://cluster.local/ns/default/sa/web-b", false, ""},
		{"local pod: fast path", client, "10.0.1.2:8080", FastPath, "10.0.1.2:8080", "", "", false, ""},
		{"not captured: passthrough", client, "10.0.2.9:80", Passthrough, "10.0.2.9:80", "", "", false, ""},
		{"unknown address: passthrough", client, "192.0.2.1:443", Passthrough, "192.0.2.1:443", "", "", false, ""},
		{"pod with waypoint: to waypoint, pod target", client, "10.0.2.7:80", HBONE, "10.0.2.7:80", "10.0.2.8:15008", "spiffe://cluster.local/ns/default/sa/wp", true, ""},
		{"service with waypoint: service target", client, "10.96.0.3:80", HBONE, "10.96.0.3:80", "10.0.2.8:15008", "spiffe://cluster.local/ns/default/sa/wp", true, ""},
		{"waypoint itself goes direct", wp, "10.0.2.7:80", HBONE, "10.0.2.7:80", "10.0.2.7:15008", "spiffe://cluster.local/ns/default/sa/guarded", false, ""},
		{"service without endpoints", client, "10.96.0.4:80", 0, "", "", "", false, "no_healthy_upstream"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			rt, err := r.Resolve(c.src, ap(c.dst))
			if c.errReason != "" {
				if err == nil || !strings.Contains(err.Error(), c.errReason) {
					t.Fatalf("err = %v, want %s", err, c.errReason)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if rt.Kind != c.kind || rt.Target.String() != c.target || rt.Waypoint != c.waypoint {
				t.Fatalf("route = %v target %s waypoint %v", rt.Kind, rt.Target, rt.Waypoint)
			}
			if c.proxy != "" && rt.ProxyAddr.String() != c.proxy {
				t.Fatalf("proxy = %s, want %s", rt.ProxyAddr, c.proxy)
			}
			if c.expected != "" && (len(rt.Expected) != 1 || rt.Expected[0].String() != c.expected) {
				t.Fatalf("expected = %v, want %s", rt.Expected, c.expected)
			}
		})
	}

	t.Run("service VIP round robins over healthy endpoints with target port", func(t *testing.T) {
		seen := map[string]int{}
		for i := 0; i < 10; i++ {
			rt, err := r.Resolve(client, ap("10.96.0.1:80"))
			if err != nil {
				t.Fatal(err)
			}
			seen[rt.Target.String()]++
		}
		if seen["10.0.1.2:8080"] != 5 || seen["10.0.2.2:8080"] != 5 || len(seen) != 2 {
			t.Fatalf("distribution %v", seen)
		}
	})
}

// TestRouterServiceEntry: a ServiceEntry host's VIP routes to its static
// endpoint over plain TCP (the endpoint is outside the mesh); a DNS
// endpoint is resolved (here by a real DNS server on loopback); resolution
// NONE keeps the dialed destination; a hostname that does not resolve is a
// clear error, not a silent passthrough.
func TestRouterServiceEntry(t *testing.T) {
	s := discovery.NewState(discovery.AddressType)
	up := dnsproxytest.ServeLocal(t)
	res := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, up.Addr.String())
	}}
	r := &Router{State: s, Node: "n1", TrustDomain: "cluster.local",
		LookupHost: func(ctx context.Context, h string) ([]netip.Addr, error) { return res.LookupNetIP(ctx, "ip", h) }}
	svc := func(name, host, vip string, mode workloadapi.LoadBalancing_Mode) {
		sv := &workloadapi.Service{Name: name, Namespace: "egress", Hostname: host, Ports: []*workloadapi.Port{{ServicePort: 443, TargetPort: 443}}}
		if vip != "" {
			sv.Addresses = []*workloadapi.NetworkAddress{{Address: netip.MustParseAddr(vip).AsSlice()}}
		}
		if mode != workloadapi.LoadBalancing_UNSPECIFIED_MODE {
			sv.LoadBalancing = &workloadapi.LoadBalancing{Mode: mode}
		}
		applyAddr(t, s, discovery.ServiceKey("egress", host), &workloadapi.Address{Type: &workloadapi.Address_Service{Service: sv}})
	}
	ep := func(uid, host, addr string, svcHost string, target uint32) {
		w := &workloadapi.Workload{Uid: uid, Name: "se", Namespace: "egress", Status: workloadapi.WorkloadStatus_HEALTHY,
			Services: map[string]*workloadapi.PortList{discovery.ServiceKey("egress", svcHost): {Ports: []*workloadapi.Port{{ServicePort: 443, TargetPort: target}}}}}
		if addr != "" {
			w.Addresses = [][]byte{netip.MustParseAddr(addr).AsSlice()}
		}
		w.Hostname = host
		applyAddr(t, s, uid, &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: w}})
	}
	svc("static", "static.example.com", "240.240.0.1", 0)
	ep("c/networking.istio.io/ServiceEntry/egress/static/198.51.100.7", "", "198.51.100.7", "static.example.com", 8443)
	svc("dns", "external.example", "240.240.0.2", 0)
	ep("c/networking.istio.io/ServiceEntry/egress/dns/external.example", "external.example", "", "external.example", 443)
	svc("none", "none.example.com", "198.51.100.0", workloadapi.LoadBalancing_PASSTHROUGH)
	svc("nx", "nx.example", "240.240.0.3", 0)
	ep("c/networking.istio.io/ServiceEntry/egress/nx/nx.example", "nx.example", "", "nx.example", 443)

	for _, tc := range []struct {
		name, dst, want string
	}{
		{"static endpoint", "240.240.0.1:443", "198.51.100.7:8443"},
		{"DNS endpoint resolved", "240.240.0.2:443", dnsproxytest.ExternalIP.String() + ":443"},
		{"NONE keeps the destination", "198.51.100.0:443", "198.51.100.0:443"},
	} {
		rt, err := r.Resolve(nil, netip.MustParseAddrPort(tc.dst))
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if rt.Kind != Passthrough || rt.Target.String() != tc.want || rt.Service == nil {
			t.Fatalf("%s: %v to %s (service %v), want Passthrough to %s", tc.name, rt.Kind, rt.Target, rt.Service, tc.want)
		}
	}
	if _, err := r.Resolve(nil, netip.MustParseAddrPort("240.240.0.3:443")); err == nil || !strings.Contains(err.Error(), "endpoint_unresolved") {
		t.Fatalf("unresolvable endpoint: %v, want endpoint_unresolved", err)
	}
}

// TestPickAddr: which of a dual-stack endpoint's addresses a connection
// uses (Istio ztunnel's rule: the address dialled, else the client's
// family within the service's families).
func TestPickAddr(t *testing.T) {
	v4, v6 := netip.MustParseAddr("10.244.1.5"), netip.MustParseAddr("fd00:244:1::5")
	dual := [][]byte{v4.AsSlice(), v6.AsSlice()}
	vip4, vip6 := netip.MustParseAddr("10.96.0.1"), netip.MustParseAddr("fd00:96::1")
	for _, tc := range []struct {
		name  string
		addrs [][]byte
		dst   netip.Addr
		fam   workloadapi.IPFamilies
		want  netip.Addr
	}{
		{"IPv6 VIP picks the IPv6 address", dual, vip6, workloadapi.IPFamilies_DUAL, v6},
		{"IPv4 VIP picks the IPv4 address", dual, vip4, workloadapi.IPFamilies_DUAL, v4},
		{"the pod's own address dialled", dual, v6, workloadapi.IPFamilies_AUTOMATIC, v6},
		{"IPv4-mapped VIP is IPv4", dual, netip.AddrFrom16(vip4.As16()), workloadapi.IPFamilies_AUTOMATIC, v4},
		{"no IPv6 address: the first", [][]byte{v4.AsSlice()}, vip6, workloadapi.IPFamilies_AUTOMATIC, v4},
		{"IPv6-only service skips IPv4", dual, vip4, workloadapi.IPFamilies_IPV6_ONLY, v6},
		{"IPv4-only service, IPv6-only endpoint: none", [][]byte{v6.AsSlice()}, vip4, workloadapi.IPFamilies_IPV4_ONLY, netip.Addr{}},
		{"no client choice: the first", dual, netip.Addr{}, workloadapi.IPFamilies_AUTOMATIC, v4},
		{"garbage skipped", [][]byte{{1, 2, 3}, v6.AsSlice()}, vip4, workloadapi.IPFamilies_AUTOMATIC, v6},
	} {
		got, ok := PickAddr(tc.addrs, tc.dst, tc.fam)
		if got != tc.want || ok != tc.want.IsValid() {
			t.Errorf("%s: got %v %v, want %v", tc.name, got, ok, tc.want)
		}
	}
}

// TestResolveKeepsClientFamily: through a dual-stack service, HBONE goes
// to the endpoint's address of the family the client dialled.
func TestResolveKeepsClientFamily(t *testing.T) {
	s := discovery.NewState()
	r := &Router{State: s, Node: "n1", TrustDomain: "cluster.local"}
	key := discovery.ServiceKey("default", "web.default.svc.cluster.local")
	ep := wl("web-1", "10.244.2.5", "n2", true, func(w *workloadapi.Workload) {
		w.Addresses = append(w.Addresses, netip.MustParseAddr("fd00:244:2::5").AsSlice())
		w.Status = workloadapi.WorkloadStatus_HEALTHY
		w.Services = map[string]*workloadapi.PortList{key: {Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}}}}
	})
	applyAddr(t, s, ep.Uid, &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: ep}})
	applyAddr(t, s, key, &workloadapi.Address{Type: &workloadapi.Address_Service{Service: &workloadapi.Service{
		Name: "web", Namespace: "default", Hostname: "web.default.svc.cluster.local", IpFamilies: workloadapi.IPFamilies_DUAL,
		Addresses: []*workloadapi.NetworkAddress{{Address: netip.MustParseAddr("10.96.0.7").AsSlice()}, {Address: netip.MustParseAddr("fd00:96::7").AsSlice()}},
		Ports:     []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}}}}})
	for dst, want := range map[string]string{"[fd00:96::7]:80": "[fd00:244:2::5]:15008", "10.96.0.7:80": "10.244.2.5:15008"} {
		rt, err := r.Resolve(nil, netip.MustParseAddrPort(dst))
		if err != nil || rt.Kind != HBONE || rt.ProxyAddr.String() != want {
			t.Errorf("%s: %v via %v (%v), want HBONE via %s", dst, rt.Kind, rt.ProxyAddr, err, want)
		}
	}
}

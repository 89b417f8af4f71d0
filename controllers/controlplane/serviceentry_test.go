package controlplane

import (
	"context"
	"net/netip"
	"testing"
	"time"

	apinetworking "istio.io/api/networking/v1alpha3"
	apisecurity "istio.io/api/security/v1beta1"
	apitype "istio.io/api/type/v1beta1"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/ambientmesh/ambient/controllers/serviceentry"
	xds "github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
)

func statusAddrs(t *testing.T, name string) map[string]string {
	t.Helper()
	var se networkingv1.ServiceEntry
	if err := s.k8s.Get(context.Background(), client.ObjectKey{Namespace: "se", Name: name}, &se); err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, a := range se.Status.GetAddresses() {
		ip := netip.MustParseAddr(a.Value)
		fam := "v6"
		if ip.Is4() {
			fam = "v4"
		}
		out[a.Host+"/"+fam] = a.Value
	}
	return out
}

func vipStrings(svc *workloadapi.Service) map[string]bool {
	out := map[string]bool{}
	for _, a := range svc.GetAddresses() {
		ip, _ := netip.AddrFromSlice(a.GetAddress())
		out[ip.String()] = true
	}
	return out
}

// TestServiceEntries: ServiceEntries and WorkloadEntries reach a real
// discovery client as Istio's control plane sends them — one Service per
// host with the VIPs the allocator wrote into status (each resolution
// type), workloads for endpoints, a VM's WorkloadEntry with its identity
// selected by a ServiceEntry, policies selecting it, and use-waypoint —
// and the allocation survives a new allocator (a restart) and resolves a
// duplicated address in favour of the older entry.
func TestServiceEntries(t *testing.T) {
	ctx := context.Background()
	zt := ztunnel(t, "zt-se", "node-a", "10.200.0.9")
	state := startClient(t, token(t, zt, xds.TokenAudience), zt.Name, xds.RoleZtunnel)
	ensureNamespace(t, "se", map[string]string{ambientLabel: "ambient"})

	ports := []*apinetworking.ServicePort{{Number: 443, Name: "https", Protocol: "TLS"}, {Number: 80, Name: "http", Protocol: "HTTP", TargetPort: 8080}}
	mk := func(name string, res apinetworking.ServiceEntry_Resolution, host string, mut func(*networkingv1.ServiceEntry)) *networkingv1.ServiceEntry {
		se := &networkingv1.ServiceEntry{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "se"}}
		se.Spec.Hosts, se.Spec.Ports, se.Spec.Resolution = []string{host}, ports, res
		if mut != nil {
			mut(se)
		}
		return se
	}
	static := mk("static", apinetworking.ServiceEntry_STATIC, "static.example.com", func(se *networkingv1.ServiceEntry) {
		se.Spec.Endpoints = []*apinetworking.WorkloadEntry{{Address: "192.0.2.10"}}
	})
	dns := mk("dns", apinetworking.ServiceEntry_DNS, "dns.example.com", nil)
	none := mk("none", apinetworking.ServiceEntry_NONE, "none.example.com", nil)
	vm := mk("vm", apinetworking.ServiceEntry_STATIC, "vm.example.internal", func(se *networkingv1.ServiceEntry) {
		se.Labels = map[string]string{"istio.io/use-waypoint": "egress"}
		se.Spec.WorkloadSelector = &apinetworking.WorkloadSelector{Labels: map[string]string{"app": "vm"}}
	})
	we := &networkingv1.WorkloadEntry{ObjectMeta: metav1.ObjectMeta{Name: "vm-1", Namespace: "se", Labels: map[string]string{"app": "vm"}}}
	we.Spec.Address, we.Spec.ServiceAccount = "192.0.2.50", "vm-sa"
	pol := &securityv1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Name: "vm-allow", Namespace: "se"}}
	pol.Spec.Selector = &apitype.WorkloadSelector{MatchLabels: map[string]string{"app": "vm"}}
	pol.Spec.Rules = []*apisecurity.Rule{{From: []*apisecurity.Rule_From{{Source: &apisecurity.Source{Principals: []string{"cluster.local/ns/se/sa/client"}}}}}}
	gw := &gwv1.Gateway{ObjectMeta: metav1.ObjectMeta{Name: "egress", Namespace: "se"},
		Spec: gwv1.GatewaySpec{GatewayClassName: "istio-waypoint", Listeners: []gwv1.Listener{{Name: "mesh", Port: 15008, Protocol: "HBONE"}}}}
	for _, o := range []client.Object{static, dns, none, vm, we, pol, gw} {
		if err := s.k8s.Create(ctx, o); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = s.k8s.Delete(context.Background(), o) })
	}

	// The allocator writes one address of each family per host, in range.
	eventually(t, "allocated VIPs in status", func() bool {
		for _, n := range []string{"static", "dns", "vm"} {
			if len(statusAddrs(t, n)) != 2 {
				return false
			}
		}
		return true
	})
	seen := map[string]string{}
	for _, n := range []string{"static", "dns", "vm", "none"} {
		for k, v := range statusAddrs(t, n) {
			ip := netip.MustParseAddr(v)
			if !serviceentry.IPv4Range.Contains(ip) && !serviceentry.IPv6Range.Contains(ip) {
				t.Fatalf("%s: %s outside the ranges", k, v)
			}
			if prev, dup := seen[v]; dup {
				t.Fatalf("%s given to %s and %s", v, prev, k)
			}
			seen[v] = k
		}
	}
	if got := statusAddrs(t, "none"); len(got) != 0 {
		t.Fatalf("resolution NONE got addresses %v", got)
	}
	staticVIP := statusAddrs(t, "static")["static.example.com/v4"]

	eventually(t, "ServiceEntry services and workloads", func() bool {
		st, d, n, v := state.ServiceByKey("se/static.example.com"), state.ServiceByKey("se/dns.example.com"),
			state.ServiceByKey("se/none.example.com"), state.ServiceByKey("se/vm.example.internal")
		return st != nil && d != nil && n != nil && v != nil && len(st.Addresses) == 2 && len(d.Addresses) == 2 && len(v.Addresses) == 2 &&
			state.WorkloadByUID(xds.ServiceEntryUID("Kubernetes", "se", "static", "192.0.2.10")) != nil &&
			state.WorkloadByUID(xds.ServiceEntryUID("Kubernetes", "se", "dns", "dns.example.com")) != nil &&
			state.WorkloadByUID(xds.WorkloadEntryUID("Kubernetes", "se", "vm-1")) != nil && v.Waypoint != nil
	})
	if svc := state.ServiceByVIP(netip.MustParseAddr(staticVIP)); svc == nil || svc.Hostname != "static.example.com" || svc.Name != "static" {
		t.Fatalf("VIP %s resolves to %v", staticVIP, svc)
	}
	st := state.ServiceByKey("se/static.example.com")
	if !vipStrings(st)[staticVIP] || len(st.Ports) != 2 || st.Ports[1].ServicePort != 80 || st.Ports[1].TargetPort != 8080 {
		t.Fatalf("static service %v", st)
	}
	if eps := state.Endpoints("se/static.example.com"); len(eps) != 1 {
		t.Fatalf("static endpoints %v", eps)
	}
	if w := state.WorkloadByUID(xds.ServiceEntryUID("Kubernetes", "se", "dns", "dns.example.com")); w.Hostname != "dns.example.com" || len(w.Addresses) != 0 {
		t.Fatalf("DNS endpoint %v, want the host as its hostname", w)
	}
	if n := state.ServiceByKey("se/none.example.com"); len(n.Addresses) != 0 || n.GetLoadBalancing().GetMode() != workloadapi.LoadBalancing_PASSTHROUGH {
		t.Fatalf("NONE service %v", n)
	}
	if h := state.ServiceByKey("se/vm.example.internal").Waypoint.GetHostname().GetHostname(); h != "egress.se.svc.cluster.local" {
		t.Fatalf("vm service waypoint %q", h)
	}
	vmW := state.WorkloadByUID(xds.WorkloadEntryUID("Kubernetes", "se", "vm-1"))
	if vmW.ServiceAccount != "vm-sa" || vmW.Namespace != "se" || vmW.TrustDomain != "cluster.local" {
		t.Fatalf("WorkloadEntry identity %s/%s/%s", vmW.TrustDomain, vmW.Namespace, vmW.ServiceAccount)
	}
	if _, ok := vmW.Services["se/vm.example.internal"]; !ok {
		t.Fatalf("WorkloadEntry services %v, want the selecting ServiceEntry", vmW.Services)
	}
	eventually(t, "policy on the WorkloadEntry", func() bool {
		w := state.WorkloadByUID(xds.WorkloadEntryUID("Kubernetes", "se", "vm-1"))
		for _, p := range w.GetAuthorizationPolicies() {
			if p == "se/vm-allow" {
				return true
			}
		}
		return false
	})
	if a, ok := netip.AddrFromSlice(vmW.Addresses[0]); !ok || a.String() != "192.0.2.50" {
		t.Fatalf("WorkloadEntry address %v", vmW.Addresses)
	}

	t.Run("a restarted allocator keeps every address", func(t *testing.T) {
		before := map[string]map[string]string{}
		var rv = map[string]string{}
		for _, n := range []string{"static", "dns", "vm"} {
			before[n] = statusAddrs(t, n)
			var se networkingv1.ServiceEntry
			_ = s.k8s.Get(ctx, client.ObjectKey{Namespace: "se", Name: n}, &se)
			rv[n] = se.ResourceVersion
		}
		fresh := &serviceentry.Allocator{Client: s.k8s, Reader: s.k8s}
		if err := fresh.Sync(ctx); err != nil {
			t.Fatal(err)
		}
		for _, n := range []string{"static", "dns", "vm"} {
			var se networkingv1.ServiceEntry
			_ = s.k8s.Get(ctx, client.ObjectKey{Namespace: "se", Name: n}, &se)
			if se.ResourceVersion != rv[n] {
				t.Fatalf("%s rewritten by a fresh allocator: %v -> %v", n, before[n], statusAddrs(t, n))
			}
		}
	})

	t.Run("a duplicated address stays with the older entry", func(t *testing.T) {
		time.Sleep(1100 * time.Millisecond) // creation timestamps have second precision
		dup := mk("dup", apinetworking.ServiceEntry_DNS, "dup.example.com", nil)
		if err := s.k8s.Create(ctx, dup); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = s.k8s.Delete(context.Background(), dup) })
		eventually(t, "dup allocated", func() bool { return len(statusAddrs(t, "dup")) == 2 })
		// Someone copies static's address into dup's status.
		if err := s.k8s.Get(ctx, client.ObjectKeyFromObject(dup), dup); err != nil {
			t.Fatal(err)
		}
		dup.Status.Addresses = []*apinetworking.ServiceEntryAddress{{Host: "dup.example.com", Value: staticVIP}}
		if err := s.k8s.Status().Update(ctx, dup); err != nil {
			t.Fatal(err)
		}
		eventually(t, "dup moved off the older entry's address", func() bool {
			got := statusAddrs(t, "dup")
			return len(got) == 2 && got["dup.example.com/v4"] != staticVIP && got["dup.example.com/v4"] != ""
		})
		if got := statusAddrs(t, "static")["static.example.com/v4"]; got != staticVIP {
			t.Fatalf("the older entry's address moved: %s -> %s", staticVIP, got)
		}
		// The copy was never dup's (serviceentry.Owned): the VIP stayed
		// static's throughout (TestCopiedServiceEntryVIPIsNotPublished
		// holds the allocator off to see that).
		if svc := state.ServiceByVIP(netip.MustParseAddr(staticVIP)); svc == nil || svc.Hostname != "static.example.com" {
			t.Fatalf("VIP %s now resolves to %v", staticVIP, svc)
		}
	})

	t.Run("an address that cannot be a VIP is reported on the entry", func(t *testing.T) {
		bad := mk("wide", apinetworking.ServiceEntry_STATIC, "wide.example.com", func(se *networkingv1.ServiceEntry) {
			se.Spec.Addresses = []string{"198.51.100.0/24"}
			se.Spec.Endpoints = []*apinetworking.WorkloadEntry{{Address: "198.51.100.7"}}
		})
		if err := s.k8s.Create(ctx, bad); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = s.k8s.Delete(context.Background(), bad) })
		accepted := func() (string, string) {
			var se networkingv1.ServiceEntry
			if err := s.k8s.Get(ctx, client.ObjectKeyFromObject(bad), &se); err != nil {
				t.Fatal(err)
			}
			for _, c := range se.Status.GetConditions() {
				if c.Type == serviceentry.ConditionAccepted {
					return c.Status, c.Reason
				}
			}
			return "", ""
		}
		eventually(t, "Accepted=False InvalidAddress", func() bool {
			st, reason := accepted()
			return st == "False" && reason == serviceentry.ReasonInvalidAddress
		})
		if state.ServiceByKey("se/wide.example.com") != nil {
			t.Fatal("an entry with a /24 address is served")
		}
		// Fixed: the condition goes and the host is served.
		if err := s.k8s.Get(ctx, client.ObjectKeyFromObject(bad), bad); err != nil {
			t.Fatal(err)
		}
		bad.Spec.Addresses = []string{"198.51.100.1/32"}
		if err := s.k8s.Update(ctx, bad); err != nil {
			t.Fatal(err)
		}
		eventually(t, "condition removed and host served", func() bool {
			st, _ := accepted()
			svc := state.ServiceByKey("se/wide.example.com")
			return st == "" && svc != nil && vipStrings(svc)["198.51.100.1"]
		})
	})

	t.Run("deleting a ServiceEntry removes its service and endpoints", func(t *testing.T) {
		if err := s.k8s.Delete(ctx, dns); err != nil {
			t.Fatal(err)
		}
		eventually(t, "dns.example.com gone", func() bool {
			return state.ServiceByKey("se/dns.example.com") == nil &&
				state.WorkloadByUID(xds.ServiceEntryUID("Kubernetes", "se", "dns", "dns.example.com")) == nil
		})
	})

	t.Run("deleting the WorkloadEntry removes its workload", func(t *testing.T) {
		if err := s.k8s.Delete(ctx, we); err != nil {
			t.Fatal(err)
		}
		eventually(t, "workload gone", func() bool { return state.WorkloadByUID(xds.WorkloadEntryUID("Kubernetes", "se", "vm-1")) == nil })
	})
}

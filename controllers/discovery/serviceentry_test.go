package discovery

import (
	"net/netip"
	"slices"
	"testing"

	networkingv1alpha3 "istio.io/api/networking/v1alpha3"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/ambientmesh/ambient/controllers/serviceentry"
	"github.com/ambientmesh/ambient/controllers/waypointbind"
	xds "github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
)

func testSE(name string, mut func(*networkingv1.ServiceEntry)) *networkingv1.ServiceEntry {
	se := &networkingv1.ServiceEntry{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "app", Labels: map[string]string{"app": "ext"}}}
	se.Spec.Hosts = []string{"api.example.com"}
	se.Spec.Ports = []*networkingv1alpha3.ServicePort{{Number: 443, Name: "https", Protocol: "TLS"}, {Number: 80, Name: "http", Protocol: "HTTP", TargetPort: 8080}}
	mut(se)
	return se
}

// ownedBy: the VIPs se owns when it is the only entry.
func ownedBy(se *networkingv1.ServiceEntry) map[string][]netip.Addr {
	return serviceentry.Owned([]*networkingv1.ServiceEntry{se})[client.ObjectKeyFromObject(se)]
}

func addrStrings(as []*workloadapi.NetworkAddress) []string {
	var out []string
	for _, a := range as {
		ip, _ := netip.AddrFromSlice(a.GetAddress())
		out = append(out, ip.String())
	}
	return out
}

func workloadAddrs(w *workloadapi.Workload) []string {
	var out []string
	for _, b := range w.GetAddresses() {
		ip, _ := netip.AddrFromSlice(b)
		out = append(out, ip.String())
	}
	return out
}

// TestServiceEntryResolutions: each resolution type becomes the Services
// and Workloads Istio's control plane sends for it.
func TestServiceEntryResolutions(t *testing.T) {
	allocated := func(se *networkingv1.ServiceEntry) {
		se.Status.Addresses = []*networkingv1alpha3.ServiceEntryAddress{
			{Host: "api.example.com", Value: "240.240.0.7"}, {Host: "api.example.com", Value: "2001:2::7"}}
	}
	cases := []struct {
		name      string
		se        *networkingv1.ServiceEntry
		vips      []string
		lbMode    workloadapi.LoadBalancing_Mode
		workloads []*workloadapi.Workload // uid, addresses or hostname, services
	}{
		{
			name: "STATIC with endpoints and auto-allocated VIPs",
			se: testSE("static", func(se *networkingv1.ServiceEntry) {
				se.Spec.Resolution = networkingv1alpha3.ServiceEntry_STATIC
				se.Spec.Endpoints = []*networkingv1alpha3.WorkloadEntry{
					{Address: "192.0.2.10"},
					{Address: "192.0.2.11", Ports: map[string]uint32{"https": 8443}, ServiceAccount: "ext-sa"},
				}
				allocated(se)
			}),
			vips: []string{"240.240.0.7", "2001:2::7"},
			workloads: []*workloadapi.Workload{
				{Uid: "Kubernetes/networking.istio.io/ServiceEntry/app/static/192.0.2.10", Addresses: [][]byte{{192, 0, 2, 10}},
					Services: map[string]*workloadapi.PortList{"app/api.example.com": {Ports: []*workloadapi.Port{{ServicePort: 443, TargetPort: 443}, {ServicePort: 80, TargetPort: 8080}}}}},
				{Uid: "Kubernetes/networking.istio.io/ServiceEntry/app/static/192.0.2.11", Addresses: [][]byte{{192, 0, 2, 11}}, ServiceAccount: "ext-sa",
					Services: map[string]*workloadapi.PortList{"app/api.example.com": {Ports: []*workloadapi.Port{{ServicePort: 443, TargetPort: 8443}, {ServicePort: 80, TargetPort: 8080}}}}},
			},
		},
		{
			name: "DNS without endpoints: the host is its own endpoint",
			se: testSE("dns", func(se *networkingv1.ServiceEntry) {
				se.Spec.Resolution = networkingv1alpha3.ServiceEntry_DNS
				allocated(se)
			}),
			vips: []string{"240.240.0.7", "2001:2::7"},
			workloads: []*workloadapi.Workload{
				{Uid: "Kubernetes/networking.istio.io/ServiceEntry/app/dns/api.example.com", Hostname: "api.example.com",
					Services: map[string]*workloadapi.PortList{"app/api.example.com": {Ports: []*workloadapi.Port{{ServicePort: 443, TargetPort: 443}, {ServicePort: 80, TargetPort: 8080}}}}},
			},
		},
		{
			name: "DNS with hostname endpoints",
			se: testSE("dns-eps", func(se *networkingv1.ServiceEntry) {
				se.Spec.Resolution = networkingv1alpha3.ServiceEntry_DNS
				se.Spec.Endpoints = []*networkingv1alpha3.WorkloadEntry{{Address: "eu.api.example.com"}}
			}),
			workloads: []*workloadapi.Workload{
				{Uid: "Kubernetes/networking.istio.io/ServiceEntry/app/dns-eps/eu.api.example.com", Hostname: "eu.api.example.com",
					Services: map[string]*workloadapi.PortList{"app/api.example.com": {Ports: []*workloadapi.Port{{ServicePort: 443, TargetPort: 443}, {ServicePort: 80, TargetPort: 8080}}}}},
			},
		},
		{
			name: "NONE: no endpoints, no allocated VIP, original destination kept",
			se: testSE("none", func(se *networkingv1.ServiceEntry) {
				se.Spec.Resolution = networkingv1alpha3.ServiceEntry_NONE
				allocated(se) // a stale status is not used
			}),
			lbMode: workloadapi.LoadBalancing_PASSTHROUGH,
		},
		{
			name: "spec addresses win over allocation",
			se: testSE("fixed", func(se *networkingv1.ServiceEntry) {
				se.Spec.Resolution = networkingv1alpha3.ServiceEntry_STATIC
				se.Spec.Addresses = []string{"198.51.100.5/32"}
				allocated(se)
			}),
			vips: []string{"198.51.100.5"},
		},
		{
			name: "opted out of allocation",
			se: testSE("optout", func(se *networkingv1.ServiceEntry) {
				se.Spec.Resolution = networkingv1alpha3.ServiceEntry_DNS
				se.Labels["networking.istio.io/enable-autoallocate-ip"] = "false"
				allocated(se)
			}),
			workloads: []*workloadapi.Workload{{Uid: "Kubernetes/networking.istio.io/ServiceEntry/app/optout/api.example.com", Hostname: "api.example.com",
				Services: map[string]*workloadapi.PortList{"app/api.example.com": {Ports: []*workloadapi.Port{{ServicePort: 443, TargetPort: 443}, {ServicePort: 80, TargetPort: 8080}}}}}},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			v := view(nil, nil, nil)
			svcs := buildServiceEntryServices(testMesh, v, tc.se, ownedBy(tc.se))
			if len(svcs) != 1 {
				t.Fatalf("%d services, want 1", len(svcs))
			}
			s := svcs[0]
			if s.Name != tc.se.Name || s.Namespace != "app" || s.Hostname != "api.example.com" {
				t.Fatalf("service %s/%s host %s", s.Namespace, s.Name, s.Hostname)
			}
			if got := addrStrings(s.Addresses); !slices.Equal(got, tc.vips) {
				t.Fatalf("VIPs %v, want %v", got, tc.vips)
			}
			if got := s.GetLoadBalancing().GetMode(); got != tc.lbMode {
				t.Fatalf("load balancing mode %v, want %v", got, tc.lbMode)
			}
			if len(s.Ports) != 2 || s.Ports[0].TargetPort != 443 || s.Ports[1].ServicePort != 80 || s.Ports[1].TargetPort != 8080 {
				t.Fatalf("ports %v", s.Ports)
			}
			ws := buildServiceEntryWorkloads(testMesh, v, tc.se)
			if len(ws) != len(tc.workloads) {
				t.Fatalf("%d workloads, want %d", len(ws), len(tc.workloads))
			}
			for i, want := range tc.workloads {
				got := ws[i]
				if got.Uid != want.Uid || got.Hostname != want.Hostname || !slices.Equal(workloadAddrs(got), workloadAddrs(want)) || got.ServiceAccount != want.ServiceAccount {
					t.Fatalf("workload %d: uid %s host %q addrs %v sa %q; want %s %q %v %q", i, got.Uid, got.Hostname, workloadAddrs(got), got.ServiceAccount,
						want.Uid, want.Hostname, workloadAddrs(want), want.ServiceAccount)
				}
				if got.TunnelProtocol != workloadapi.TunnelProtocol_NONE || got.Status != workloadapi.WorkloadStatus_HEALTHY || got.TrustDomain != testMesh.TrustDomain {
					t.Fatalf("workload %d: tunnel %v status %v td %s", i, got.TunnelProtocol, got.Status, got.TrustDomain)
				}
				for k, pl := range want.Services {
					if !portsEqual(got.Services[k], pl) {
						t.Fatalf("workload %d services %v, want %s: %v", i, got.Services, k, pl)
					}
				}
			}
		})
	}
}

func portsEqual(a, b *workloadapi.PortList) bool {
	if len(a.GetPorts()) != len(b.GetPorts()) {
		return false
	}
	for i := range a.GetPorts() {
		if a.Ports[i].ServicePort != b.Ports[i].ServicePort || a.Ports[i].TargetPort != b.Ports[i].TargetPort {
			return false
		}
	}
	return true
}

func TestServiceEntryWideCIDRIsNotAVIP(t *testing.T) {
	se := testSE("cidr", func(se *networkingv1.ServiceEntry) { se.Spec.Addresses = []string{"198.51.100.0/24"} })
	if svcs := buildServiceEntryServices(testMesh, view(nil, nil, nil), se, ownedBy(se)); svcs != nil {
		t.Fatalf("a /24 became services %v", svcs)
	}
}

// TestWorkloadEntryIdentityAndSelection: a WorkloadEntry is a workload
// with its service account as identity, selected by the ServiceEntry whose
// workloadSelector matches its labels (spec labels too), with its named
// ports, the policies selecting it and a waypoint by the pod rules.
func TestWorkloadEntryIdentityAndSelection(t *testing.T) {
	se := testSE("vm-svc", func(se *networkingv1.ServiceEntry) {
		se.Spec.Hosts = []string{"vm.example.internal"}
		se.Spec.Resolution = networkingv1alpha3.ServiceEntry_STATIC
		se.Spec.WorkloadSelector = &networkingv1alpha3.WorkloadSelector{Labels: map[string]string{"app": "vm"}}
	})
	other := testSE("other", func(se *networkingv1.ServiceEntry) {
		se.Spec.Hosts = []string{"other.example.internal"}
		se.Spec.WorkloadSelector = &networkingv1alpha3.WorkloadSelector{Labels: map[string]string{"app": "db"}}
	})
	we := &networkingv1.WorkloadEntry{ObjectMeta: metav1.ObjectMeta{Name: "vm-1", Namespace: "app",
		Annotations: map[string]string{"ambient.istio.io/redirection": "enabled"}}}
	we.Spec.Address = "192.0.2.50"
	we.Spec.ServiceAccount = "vm-sa"
	we.Spec.Labels = map[string]string{"app": "vm", "istio.io/use-waypoint": "wp"}
	we.Spec.Ports = map[string]uint32{"https": 9443}
	wp := &waypoint{Namespace: "app", Name: "wp", TrafficType: waypointbind.TrafficAll}
	// A Kubernetes Service selecting the VM too (Istio's default), with a
	// named target port the entry declares and one it does not.
	k8sSvc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "vm", Namespace: "app"}, Spec: corev1.ServiceSpec{
		Selector: map[string]string{"app": "vm"}, Ports: []corev1.ServicePort{
			{Port: 8443, TargetPort: intstr.FromString("https")}, {Port: 9000, TargetPort: intstr.FromString("metrics")}, {Port: 7000}}}}
	v := view(nil, []*waypoint{wp}, map[string]string{"app/wp": "10.96.0.9"}, k8sSvc)
	v.serviceEntries = []*networkingv1.ServiceEntry{se, other}
	w := buildWorkloadEntry(testMesh, v, we)
	if w.Uid != xds.WorkloadEntryUID("Kubernetes", "app", "vm-1") || w.Uid != "Kubernetes/networking.istio.io/WorkloadEntry/app/vm-1" {
		t.Fatalf("uid %s", w.Uid)
	}
	if w.ServiceAccount != "vm-sa" || w.TrustDomain != "td.example" || w.Namespace != "app" {
		t.Fatalf("identity %s/%s/%s", w.TrustDomain, w.Namespace, w.ServiceAccount)
	}
	if !slices.Equal(workloadAddrs(w), []string{"192.0.2.50"}) || w.TunnelProtocol != workloadapi.TunnelProtocol_HBONE {
		t.Fatalf("addrs %v tunnel %v", workloadAddrs(w), w.TunnelProtocol)
	}
	if len(w.Services) != 2 || !portsEqual(w.Services["app/vm.example.internal"], &workloadapi.PortList{Ports: []*workloadapi.Port{{ServicePort: 443, TargetPort: 9443}, {ServicePort: 80, TargetPort: 8080}}}) ||
		!portsEqual(w.Services["app/vm.app.svc.cluster.local"], &workloadapi.PortList{Ports: []*workloadapi.Port{{ServicePort: 8443, TargetPort: 9443}, {ServicePort: 7000, TargetPort: 7000}}}) {
		t.Fatalf("services %v", w.Services)
	}
	if w.Waypoint == nil || w.Waypoint.GetAddress() == nil {
		t.Fatalf("waypoint %v, want wp's service address", w.Waypoint)
	}
	// Without the redirection annotation the VM gets plain TCP.
	we.Annotations = nil
	if w := buildWorkloadEntry(testMesh, v, we); w.TunnelProtocol != workloadapi.TunnelProtocol_NONE {
		t.Fatalf("tunnel %v without a ztunnel on the VM", w.TunnelProtocol)
	}
	// A hostname address is resolved by the proxy.
	we.Spec.Address = "vm-1.example.internal"
	if w := buildWorkloadEntry(testMesh, v, we); w.Hostname != "vm-1.example.internal" || len(w.Addresses) != 0 {
		t.Fatalf("hostname %q addrs %v", w.Hostname, w.Addresses)
	}
	// Pods are selected too, with named container ports.
	pod := testPod("vm-like", func(p *corev1.Pod) {
		p.Labels["app"] = "vm"
		p.Spec.Containers = []corev1.Container{{Name: "c", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 7070}}}}
	})
	ps := podServices(testMesh, v, pod)
	if !portsEqual(ps["app/vm.example.internal"], &workloadapi.PortList{Ports: []*workloadapi.Port{{ServicePort: 443, TargetPort: 443}, {ServicePort: 80, TargetPort: 7070}}}) {
		t.Fatalf("pod services %v", ps)
	}
}

// TestServiceEntryUseWaypoint: istio.io/use-waypoint on a ServiceEntry (or
// its namespace) binds its hosts to the waypoint, as for a Service; its
// endpoints are not bound (service traffic only).
func TestServiceEntryUseWaypoint(t *testing.T) {
	wp := &waypoint{Namespace: "app", Name: "egress", TrafficType: waypointbind.TrafficService}
	for _, tc := range []struct {
		name     string
		nsLabels map[string]string
		seLabels map[string]string
		want     bool
	}{
		{"label on the ServiceEntry", nil, map[string]string{"istio.io/use-waypoint": "egress"}, true},
		{"label on the namespace", map[string]string{"istio.io/use-waypoint": "egress"}, nil, true},
		{"none opts out of the namespace's", map[string]string{"istio.io/use-waypoint": "egress"}, map[string]string{"istio.io/use-waypoint": "none"}, false},
		{"the namespace waypoint, as for Services", nil, nil, true},
		{"none on the ServiceEntry", nil, map[string]string{"istio.io/use-waypoint": "none"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := view(tc.nsLabels, []*waypoint{wp}, map[string]string{"app/egress": "10.96.0.20"})
			se := testSE("ext", func(se *networkingv1.ServiceEntry) {
				se.Labels = tc.seLabels
				se.Spec.Resolution = networkingv1alpha3.ServiceEntry_DNS
			})
			s := buildServiceEntryServices(testMesh, v, se, nil)[0]
			if got := s.Waypoint != nil; got != tc.want {
				t.Fatalf("waypoint %v, want bound=%t", s.Waypoint, tc.want)
			}
			if tc.want {
				ip, _ := netip.AddrFromSlice(s.Waypoint.GetAddress().GetAddress())
				if ip.String() != "10.96.0.20" || s.Waypoint.HboneMtlsPort != 15008 {
					t.Fatalf("waypoint %v", s.Waypoint)
				}
			}
			for _, w := range buildServiceEntryWorkloads(testMesh, v, se) {
				if w.Waypoint != nil {
					t.Fatalf("endpoint %s bound to a waypoint", w.Uid)
				}
			}
		})
	}
}

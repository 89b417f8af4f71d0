package ztunnel

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"testing"
	"time"

	"github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/identity"
	"github.com/ambientmesh/ambient/proxylib/netnsutil"
	"github.com/ambientmesh/ambient/proxylib/waypoint"
	"github.com/ambientmesh/ambient/test/meshtest"
)

// TestServiceEntryEgress: a captured pod reaches a host outside the
// cluster (a process in a network namespace on the underlay, not a pod)
// through ztunnel by its ServiceEntry: the pod's DNS proxy answers the
// host with its auto-allocated VIP, the VIP carries traffic to the
// ServiceEntry's endpoint (target port mapped), and once the ServiceEntry
// carries istio.io/use-waypoint the traffic crosses the waypoint, where an
// AuthorizationPolicy targeting the ServiceEntry decides per request.
// Resources are the ones the control plane builds for a STATIC
// ServiceEntry with an allocated VIP (controllers/discovery).
func TestServiceEntryEgress(t *testing.T) {
	m := meshtest.New(t, 2, meshtest.WithDNS())
	wpState := m.NewWaypointState()
	m.SyncAll()

	// The external host: answers "ext <path> from <client ip>".
	ext := m.Cluster.AddExternal("ext")
	f, err := ext.Open()
	if err != nil {
		t.Fatal(err)
	}
	ln, err := netnsutil.ListenTCP(f, ext.IP.String()+":8080", netnsutil.SocketOptions{})
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	extSrv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		host, _, _ := net.SplitHostPort(r.RemoteAddr)
		io.WriteString(w, "ext "+r.URL.Path+" from "+netip.MustParseAddr(host).Unmap().String())
	})}
	go extSrv.Serve(ln)
	t.Cleanup(func() { extSrv.Close() })

	const host = "api.example.com"
	vip := netip.MustParseAddrPort("240.240.0.1:80")
	seKey := discovery.ServiceKey(meshtest.Namespace, host)
	ports := []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}}
	m.CP.Workload(&workloadapi.Workload{
		Uid:  discovery.ServiceEntryUID(meshtest.ClusterID, meshtest.Namespace, "api", ext.IP.String()),
		Name: "api", Namespace: meshtest.Namespace, Addresses: [][]byte{ext.IP.AsSlice()}, TrustDomain: m.CA.TrustDomain,
		ClusterId: meshtest.ClusterID, WorkloadType: workloadapi.WorkloadType_POD, WorkloadName: "api", CanonicalName: "api",
		CanonicalRevision: "latest", Status: workloadapi.WorkloadStatus_HEALTHY,
		Services: map[string]*workloadapi.PortList{seKey: {Ports: ports}},
	})
	seService := &workloadapi.Service{Name: "api", Namespace: meshtest.Namespace, Hostname: host,
		Addresses: []*workloadapi.NetworkAddress{{Address: vip.Addr().AsSlice()}}, Ports: ports}
	m.CP.Service(seService)

	// The pods' nameserver is never asked: ztunnel answers the host.
	nameserver := netip.MustParseAddrPort("192.0.2.53:53")
	m.DNSNameservers = []string{nameserver.String()}
	sleep := m.AddPod(m.Nodes[0], "sleep-1", "sleep", true)
	notsleep := m.AddPod(m.Nodes[0], "notsleep-1", "notsleep", true)

	get := func(p *meshtest.Pod, path string) (int, string) {
		t.Helper()
		resp, err := p.Client().Get("http://" + vip.String() + path)
		if err != nil {
			t.Fatalf("%s GET %s%s: %v", p.PodName, vip, path, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}

	t.Run("DNS proxy answers the ServiceEntry host with its VIP", func(t *testing.T) {
		r := query(t, sleep, nameserver, "udp", host+".", dns.TypeA)
		if got := answerIPs(r); r.Rcode != dns.RcodeSuccess || len(got) != 1 || got[0] != vip.Addr().String() {
			t.Fatalf("A %s: rcode %s answers %v, want %s", host, dns.RcodeToString[r.Rcode], got, vip.Addr())
		}
		m.Logs.WaitFor(t, "dns{pod=default/sleep-1}", "name="+host+". ", "answered_by=ztunnel")
	})

	t.Run("the VIP reaches the external host", func(t *testing.T) {
		code, body := get(sleep, "/direct")
		if want := "ext /direct from " + sleep.IP.String(); code != 200 || body != want {
			t.Fatalf("got %d %q, want 200 %q", code, body, want)
		}
		m.Logs.WaitFor(t, "dst.addr="+ext.IP.String()+":8080")
	})

	// A waypoint for the ServiceEntry (istio.io/use-waypoint): its pod on
	// node2, its Service, the real waypoint.
	wpVIP := netip.MustParseAddr("10.96.0.20")
	wpKey := discovery.ServiceKey(meshtest.Namespace, "waypoint.default.svc.cluster.local")
	wp := m.AddPod(m.Nodes[1], "waypoint-1", "waypoint", false, func(w *workloadapi.Workload) {
		w.WorkloadName, w.TunnelProtocol = "waypoint", workloadapi.TunnelProtocol_HBONE
		w.Services = map[string]*workloadapi.PortList{wpKey: {Ports: []*workloadapi.Port{{ServicePort: 15008, TargetPort: 15008}}}}
	})
	m.CP.Service(&workloadapi.Service{Name: "waypoint", Namespace: meshtest.Namespace, Hostname: "waypoint.default.svc.cluster.local",
		Addresses: []*workloadapi.NetworkAddress{{Address: wpVIP.AsSlice()}}, Ports: []*workloadapi.Port{{ServicePort: 15008, TargetPort: 15008}}})
	m.RunWaypoint(wp, waypoint.Config{Name: "waypoint", State: wpState, Registry: prometheus.NewRegistry(),
		Log: m.Logs.Logger("waypoint"), RootNamespace: meshtest.RootNamespace})
	seService.Waypoint = &workloadapi.GatewayAddress{Destination: &workloadapi.GatewayAddress_Address{Address: &workloadapi.NetworkAddress{Address: wpVIP.AsSlice()}}, HboneMtlsPort: 15008}
	m.CP.Service(seService)
	m.CP.L7(`
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-egress, namespace: default}
spec:
  targetRefs: [{group: networking.istio.io, kind: ServiceEntry, name: api}]
  rules:
  - from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}]
    to: [{operation: {methods: [GET], paths: [/allowed*]}}]
`)

	t.Run("use-waypoint: egress crosses the waypoint and its policy applies", func(t *testing.T) {
		code, body := get(sleep, "/allowed")
		if want := "ext /allowed from " + wp.IP.String(); code != 200 || body != want {
			t.Fatalf("sleep GET /allowed: %d %q, want 200 %q (from the waypoint)", code, body, want)
		}
		m.Logs.WaitFor(t, "proxy to "+vip.String()+" using HBONE via "+wp.IP.String()+":15008 type ToServerWaypoint")
		if code, body := get(sleep, "/other"); code != 403 {
			t.Fatalf("sleep GET /other: %d %q, want 403 from the waypoint", code, body)
		}
		if code, body := get(notsleep, "/allowed"); code != 403 {
			t.Fatalf("notsleep GET /allowed: %d %q, want 403 from the waypoint", code, body)
		}
		m.Logs.WaitFor(t, "RBAC rejected request", "notsleep")
	})
}

// TestWorkloadEntryVM: a VM outside the cluster running its own HBONE
// endpoint (as a VM with a ztunnel does) is a mesh workload through its
// WorkloadEntry: a captured pod reaches it by the VIP of the ServiceEntry
// selecting it over mTLS, ztunnel expecting the WorkloadEntry's service
// account as the VM's identity; when discovery names another identity,
// ztunnel refuses the VM's certificate.
func TestWorkloadEntryVM(t *testing.T) {
	m := meshtest.New(t, 1)
	m.SyncAll()
	vm := m.Cluster.AddExternal("vm")
	vmID := identity.Identity{TrustDomain: m.CA.TrustDomain, Namespace: meshtest.Namespace, ServiceAccount: "vm-sa"}
	certs := identity.NewStaticSource(m.CA.TrustDomain, m.CA.Roots())
	certs.Set(vmID, m.CA.Issue(t, vmID))
	f, err := vm.Open()
	if err != nil {
		t.Fatal(err)
	}
	srv, err := meshtest.Transport(t, certs).NewServer(f, "", vmID, hbone.HandlerFunc(
		func(ctx context.Context, req *hbone.Request, resp hbone.Responder) {
			s, err := resp.Accept()
			if err != nil {
				return
			}
			fmt.Fprintf(s, "vm: %s from %s", req.Target, req.Peer)
			s.CloseWrite()
			io.Copy(io.Discard, s)
			s.Close()
		}))
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve()
	t.Cleanup(func() { srv.Close() })

	const host = "vm.example.internal"
	vip := netip.MustParseAddrPort("240.240.0.2:80")
	seKey := discovery.ServiceKey(meshtest.Namespace, host)
	// As the control plane builds a WorkloadEntry with the ambient
	// redirection annotation, selected by a STATIC ServiceEntry.
	we := &workloadapi.Workload{
		Uid:  discovery.WorkloadEntryUID(meshtest.ClusterID, meshtest.Namespace, "vm-1"),
		Name: "vm-1", Namespace: meshtest.Namespace, Addresses: [][]byte{vm.IP.AsSlice()}, TrustDomain: m.CA.TrustDomain,
		ServiceAccount: "vm-sa", ClusterId: meshtest.ClusterID, WorkloadType: workloadapi.WorkloadType_POD, WorkloadName: "vm-1",
		TunnelProtocol: workloadapi.TunnelProtocol_HBONE, Status: workloadapi.WorkloadStatus_HEALTHY,
		Services: map[string]*workloadapi.PortList{seKey: {Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}}}},
	}
	m.CP.Workload(we)
	m.CP.Service(&workloadapi.Service{Name: "vm-svc", Namespace: meshtest.Namespace, Hostname: host,
		Addresses: []*workloadapi.NetworkAddress{{Address: vip.Addr().AsSlice()}}, Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}}})
	sleep := m.AddPod(m.Nodes[0], "sleep-1", "sleep", true)

	read := func() (string, error) {
		c, err := sleep.Dial(vip)
		if err != nil {
			return "", err
		}
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		b, err := io.ReadAll(c)
		return string(b), err
	}
	t.Run("reached over HBONE with the WorkloadEntry's identity", func(t *testing.T) {
		got, err := read()
		if want := "vm: " + netip.AddrPortFrom(vm.IP, 8080).String() + " from " + sleep.ID().String(); err != nil || got != want {
			t.Fatalf("got %q %v, want %q", got, err, want)
		}
		m.Logs.WaitFor(t, "using HBONE via "+vm.IP.String()+":15008")
	})
	t.Run("another identity in discovery: the VM's certificate is refused", func(t *testing.T) {
		we.ServiceAccount = "not-the-vm"
		m.CP.Workload(we)
		if got, err := read(); err == nil && got != "" {
			t.Fatalf("got %q: ztunnel accepted a peer whose identity discovery does not name", got)
		}
		m.Logs.WaitFor(t, "dst.identity=spiffe://"+m.CA.TrustDomain+"/ns/default/sa/not-the-vm", "peer identity is not an expected destination identity")
	})
}

// Package sidecar holds the namespaced integration tests of the sidecar
// (cmd/sidecar: proxylib/proxy serving one pod from inside it) living next
// to ambient pods served by ztunnels: real nftables redirection in each pod
// (the sidecar's owner-based one in sidecar pods), real HBONE with mTLS,
// the test control plane of test/meshtest.
package sidecar

import (
	"io"
	"net/netip"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/test/meshtest"
)

type coexistence struct {
	*meshtest.Mesh
	sleep, httpbin, outside *meshtest.Pod        // ambient sleep and httpbin, a plaintext pod
	scSleep, scHttpbin      *meshtest.SidecarPod // sidecar sleep and httpbin
	scLocal                 *meshtest.SidecarPod // a sidecar httpbin on the ambient pods' node
}

// newCoexistence: the seeds' coexistence layout. node1 runs ambient sleep
// and httpbin (captured by node1's ztunnel) and a pod outside the mesh;
// node2 runs sleep and httpbin with sidecars, node1 another sidecar httpbin.
func newCoexistence(t *testing.T) *coexistence {
	m := meshtest.New(t, 2, meshtest.WithServiceAccounts("sleep", "httpbin", "outside", "waypoint"), meshtest.WithTransportLog())
	m.SyncAll()
	c := &coexistence{Mesh: m}
	c.sleep = m.AddPod(m.Nodes[0], "sleep-1", "sleep", true)
	c.httpbin = m.AddPod(m.Nodes[0], "httpbin-1", "httpbin", true)
	c.outside = m.AddPod(m.Nodes[0], "outside-1", "outside", false)
	c.scSleep = m.AddSidecarPod(m.Nodes[1], "sc-sleep-1", "sc-sleep")
	c.scHttpbin = m.AddSidecarPod(m.Nodes[1], "sc-httpbin-1", "sc-httpbin")
	c.scLocal = m.AddSidecarPod(m.Nodes[0], "sc-httpbin-2", "sc-httpbin")
	c.httpbin.ServeHTTP(t, 80)
	c.scHttpbin.ServeHTTP(t, 80)
	c.scLocal.ServeHTTP(t, 80)
	return c
}

type gatherer interface {
	Gather() ([]*dto.MetricFamily, error)
}

// metricSum sums the counter series of metric name matching want.
func metricSum(t *testing.T, reg gatherer, name string, want map[string]string) float64 {
	t.Helper()
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, f := range fams {
		if f.GetName() != name {
			continue
		}
	next:
		for _, mt := range f.GetMetric() {
			l := map[string]string{}
			for _, lp := range mt.GetLabel() {
				l[lp.GetName()] = lp.GetValue()
			}
			for k, v := range want {
				if l[k] != v {
					continue next
				}
			}
			sum += mt.GetCounter().GetValue()
		}
	}
	return sum
}

// waitMetric waits until reg counts one of metric name matching want
// (metrics are recorded as the proxy handles the connection or request,
// maybe after the reply).
func waitMetric(t *testing.T, what string, reg gatherer, name string, want map[string]string) {
	t.Helper()
	for i := 0; i < 100; i++ {
		if metricSum(t, reg, name, want) > 0 {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s: no %s with %v", what, name, want)
}

// waitOpened waits for a connection matching want.
func waitOpened(t *testing.T, what string, reg gatherer, want map[string]string) {
	t.Helper()
	waitMetric(t, what, reg, "istio_tcp_connections_opened_total", want)
}

// expect: from reaches to and gets want, or is refused when want is "".
func expect(t *testing.T, from *meshtest.Pod, to netip.AddrPort, want string) {
	t.Helper()
	if want == "" {
		meshtest.ExpectRefused(t, from, to)
		return
	}
	meshtest.ExpectOK(t, from, to, want)
}

func spiffe(p *meshtest.Pod) string { return p.ID().String() }

// TestCoexistence: the seeds' ambient <-> sidecar paths.
func TestCoexistence(t *testing.T) {
	c := newCoexistence(t)
	m := c.Mesh
	httpbin80, scHttpbin80 := c.httpbin.Addr(80), c.scHttpbin.Addr(80)

	t.Run("ambient client reaches the sidecar pod over HBONE", func(t *testing.T) {
		meshtest.ExpectOK(t, c.sleep, scHttpbin80, "sc-httpbin-1")
		// The sidecar terminated the tunnel (mTLS, the client's identity)
		// and reports as Istio's sidecars do.
		waitOpened(t, "sidecar inbound", c.scHttpbin.Metrics, map[string]string{"reporter": "destination",
			"source_principal": spiffe(c.sleep), "destination_principal": spiffe(c.scHttpbin.Pod), "connection_security_policy": "mutual_tls"})
		waitOpened(t, "ztunnel outbound", m.Nodes[0].Metrics, map[string]string{"reporter": "source",
			"source_principal": spiffe(c.sleep), "destination_principal": spiffe(c.scHttpbin.Pod)})
		// Each hop's log names the peer identities, as in the seeds.
		m.Logs.WaitFor(t, "node1 ", "outbound{", "complete", "src.identity="+spiffe(c.sleep), "dst.identity="+spiffe(c.scHttpbin.Pod))
		m.Logs.WaitFor(t, "sc-httpbin-1 ", "inbound{", "peer_id="+spiffe(c.sleep)+"}: complete", "dst.identity="+spiffe(c.scHttpbin.Pod))
	})

	// On the client's own node the ztunnel has no local pod to fast-path
	// to (the sidecar serves it): it tunnels to the pod's :15008 too.
	t.Run("ambient client reaches a sidecar pod on its own node over HBONE", func(t *testing.T) {
		meshtest.ExpectOK(t, c.sleep, c.scLocal.Addr(80), "sc-httpbin-2")
		waitOpened(t, "sidecar inbound", c.scLocal.Metrics, map[string]string{"reporter": "destination",
			"source_principal": spiffe(c.sleep), "connection_security_policy": "mutual_tls"})
	})

	t.Run("sidecar client reaches the ambient pod with its own identity", func(t *testing.T) {
		meshtest.ExpectOK(t, c.scSleep.Pod, httpbin80, "httpbin-1")
		waitOpened(t, "destination ztunnel", m.Nodes[0].Metrics, map[string]string{"reporter": "destination",
			"source_principal": spiffe(c.scSleep.Pod), "destination_principal": spiffe(c.httpbin), "connection_security_policy": "mutual_tls"})
		waitOpened(t, "sidecar outbound", c.scSleep.Metrics, map[string]string{"reporter": "source",
			"source_principal": spiffe(c.scSleep.Pod), "destination_principal": spiffe(c.httpbin)})
		m.Logs.WaitFor(t, "sc-sleep-1 ", "outbound{", "complete", "src.identity="+spiffe(c.scSleep.Pod), "dst.identity="+spiffe(c.httpbin))
		m.Logs.WaitFor(t, "node1 ", "inbound{", "peer_id="+spiffe(c.scSleep.Pod)+"}: complete", "dst.identity="+spiffe(c.httpbin))
	})

	t.Run("sidecar to sidecar", func(t *testing.T) {
		meshtest.ExpectOK(t, c.scSleep.Pod, scHttpbin80, "sc-httpbin-1")
		waitOpened(t, "sidecar inbound", c.scHttpbin.Metrics, map[string]string{"reporter": "destination",
			"source_principal": spiffe(c.scSleep.Pod), "connection_security_policy": "mutual_tls"})
	})

	// An ambient service behind a waypoint: the sidecar sends to the
	// waypoint's :15008 as ztunnel would, with the service as the CONNECT
	// target and its own identity.
	t.Run("sidecar client to an ambient service behind a waypoint", func(t *testing.T) {
		wpVIP, appVIP := netip.MustParseAddr("10.96.0.20"), netip.MustParseAddrPort("10.96.0.30:9080")
		wpKey := discovery.ServiceKey("default", "waypoint.default.svc.cluster.local")
		gw := &workloadapi.GatewayAddress{Destination: &workloadapi.GatewayAddress_Address{Address: &workloadapi.NetworkAddress{Address: wpVIP.AsSlice()}}, HboneMtlsPort: 15008}
		wp := m.AddPod(m.Nodes[0], "waypoint-1", "waypoint", false, func(w *workloadapi.Workload) {
			w.Services = map[string]*workloadapi.PortList{wpKey: {Ports: []*workloadapi.Port{{ServicePort: 15008, TargetPort: 15008}}}}
		})
		m.CP.Service(&workloadapi.Service{Name: "waypoint", Namespace: "default", Hostname: "waypoint.default.svc.cluster.local",
			Addresses: []*workloadapi.NetworkAddress{{Address: wpVIP.AsSlice()}}, Ports: []*workloadapi.Port{{ServicePort: 15008, TargetPort: 15008}}})
		m.CP.Service(&workloadapi.Service{Name: "helloworld", Namespace: "default", Hostname: "helloworld.default.svc.cluster.local",
			Addresses: []*workloadapi.NetworkAddress{{Address: appVIP.Addr().AsSlice()}}, Ports: []*workloadapi.Port{{ServicePort: 9080, TargetPort: 9080}}, Waypoint: gw})
		m.StandInWaypoint(wp)
		conn, err := c.scSleep.Dial(appVIP)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		got, _ := io.ReadAll(conn)
		if want := "waypoint: " + appVIP.String() + " from " + spiffe(c.scSleep.Pod); string(got) != want {
			t.Fatalf("got %q, want %q", got, want)
		}
		conn.Close() // the hop's line is written when it ends
		m.Logs.WaitFor(t, "sc-sleep-1 ", "outbound{", "complete", "src.identity="+spiffe(c.scSleep.Pod),
			"dst.service=helloworld.default.svc.cluster.local", "dst.identity="+spiffe(wp))
	})

	// The identity each destination authorizes is the caller's own:
	// allowing only the sidecar client admits it and refuses the ambient
	// sleep, at the ztunnel and at the sidecar alike.
	t.Run("L4 authorization by the peer's identity", func(t *testing.T) {
		m.CP.Policy(meshtest.AllowPolicy("allow-sc-sleep", c.scSleep.ID().Principal()))
		defer m.CP.Remove(discovery.AuthorizationType, "default/allow-sc-sleep")
		tests := []struct {
			name string
			from *meshtest.Pod
			to   netip.AddrPort
			want string // "" = refused
		}{
			{"sidecar client to ambient httpbin", c.scSleep.Pod, httpbin80, "httpbin-1"},
			{"ambient sleep to ambient httpbin", c.sleep, httpbin80, ""},
			{"sidecar client to sidecar httpbin", c.scSleep.Pod, scHttpbin80, "sc-httpbin-1"},
			{"ambient sleep to sidecar httpbin", c.sleep, scHttpbin80, ""},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) { expect(t, tt.from, tt.to, tt.want) })
		}
		m.Logs.WaitFor(t, "RBAC rejected conn="+c.sleep.IP.String()+"("+spiffe(c.sleep)+")->"+scHttpbin80.String())
	})

	// PeerAuthentication STRICT: mTLS callers (ambient or sidecar) keep
	// working; the plaintext pod is refused by the ztunnel and the sidecar.
	t.Run("STRICT PeerAuthentication", func(t *testing.T) {
		meshtest.ExpectOK(t, c.outside, scHttpbin80, "sc-httpbin-1") // PERMISSIVE first
		m.CP.Policy(meshtest.StrictPolicy())
		defer m.CP.Remove(discovery.AuthorizationType, "default/converted_peer_authentication_default")
		tests := []struct {
			name string
			from *meshtest.Pod
			to   netip.AddrPort
			want string
		}{
			{"plaintext to ambient httpbin", c.outside, httpbin80, ""},
			{"plaintext to sidecar httpbin", c.outside, scHttpbin80, ""},
			{"sidecar client to ambient httpbin", c.scSleep.Pod, httpbin80, "httpbin-1"},
			{"ambient sleep to sidecar httpbin", c.sleep, scHttpbin80, "sc-httpbin-1"},
			{"sidecar to sidecar", c.scSleep.Pod, scHttpbin80, "sc-httpbin-1"},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) { expect(t, tt.from, tt.to, tt.want) })
		}
		m.Logs.WaitFor(t, "RBAC rejected conn="+c.outside.IP.String()+"(none)->"+scHttpbin80.String())
	})
}

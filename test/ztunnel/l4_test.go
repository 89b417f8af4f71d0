// Package ztunnel holds the namespaced integration tests of ztunnel's L4
// data path: node and pod network namespaces (test/netns), real nftables
// redirection (proxylib/redirect), real HBONE with mTLS between ztunnels,
// and a test control plane that feeds each ztunnel's discovery State with
// hand-built Istio workload-API resources. The mesh harness is
// test/meshtest.
package ztunnel

import (
	"fmt"
	"io"
	"net/netip"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi/security"
	"github.com/ambientmesh/ambient/proxylib/inpod"
	"github.com/ambientmesh/ambient/test/meshtest"
)

// seedsMesh is the seeds' L4 journey: sleep and notsleep on node1, httpbin
// replicas on node1 and node2 behind a service, and a pod outside the mesh.
type seedsMesh struct {
	*meshtest.Mesh
	sleep, notsleep, httpbin1, httpbin2, outside *meshtest.Pod
	vip                                          netip.AddrPort
}

func newSeedsMesh(t *testing.T) *seedsMesh {
	m := meshtest.New(t, 2)
	m.SyncAll()
	s := &seedsMesh{Mesh: m, vip: netip.MustParseAddrPort("10.96.0.10:8000")}
	svcKey := discovery.ServiceKey("default", "httpbin.default.svc.cluster.local")
	inService := func(w *workloadapi.Workload) {
		w.Services = map[string]*workloadapi.PortList{svcKey: {Ports: []*workloadapi.Port{{ServicePort: 8000, TargetPort: 80}}}}
	}
	s.sleep = m.AddPod(m.Nodes[0], "sleep-1", "sleep", true)
	s.notsleep = m.AddPod(m.Nodes[0], "notsleep-1", "notsleep", true)
	s.httpbin1 = m.AddPod(m.Nodes[1], "httpbin-1", "httpbin", true, inService)
	s.httpbin2 = m.AddPod(m.Nodes[0], "httpbin-2", "httpbin", true, inService)
	s.outside = m.AddPod(m.Nodes[1], "outside-1", "outside", false)
	m.CP.Service(&workloadapi.Service{Name: "httpbin", Namespace: "default", Hostname: "httpbin.default.svc.cluster.local",
		Addresses: []*workloadapi.NetworkAddress{{Address: s.vip.Addr().AsSlice()}},
		Ports:     []*workloadapi.Port{{ServicePort: 8000, TargetPort: 80}}})
	for _, h := range []*meshtest.Pod{s.httpbin1, s.httpbin2} {
		h.ServeHTTP(t, 80)
		h.ServeTCP(t, 9000, meshtest.CountThenReply)
		h.ServeTCP(t, 9001, meshtest.Echo)
	}
	return s
}

func TestSeedsL4(t *testing.T) {
	s := newSeedsMesh(t)
	m := s.Mesh

	t.Run("round robin over replicas on two nodes", func(t *testing.T) {
		seen := map[string]int{}
		var order []string
		for i := 0; i < 6; i++ {
			got, err := s.sleep.Get(s.vip)
			if err != nil {
				t.Fatalf("GET %s: %v", s.vip, err)
			}
			seen[got]++
			order = append(order, got)
		}
		if seen["httpbin-1"] != 3 || seen["httpbin-2"] != 3 {
			t.Fatalf("distribution %v (order %v), want 3/3", seen, order)
		}
		for i := 1; i < len(order); i++ {
			if order[i] == order[i-1] {
				t.Fatalf("not round robin: %v", order)
			}
		}
		m.Logs.WaitFor(t, "proxy to "+s.httpbin1.Addr(80).String()+" using HBONE via "+s.httpbin1.IP.String()+":15008 type Direct")
		m.Logs.WaitFor(t, "proxying to "+s.httpbin2.Addr(80).String()+" using node local fast path")
	})

	t.Run("allow policy admits sleep, refuses notsleep", func(t *testing.T) {
		m.CP.Policy(meshtest.AllowPolicy("allow-sleep", s.sleep.ID().Principal()))
		defer m.CP.Remove(discovery.AuthorizationType, "default/allow-sleep")
		meshtest.ExpectOK(t, s.sleep, s.httpbin1.Addr(80), "httpbin-1")
		meshtest.ExpectRefused(t, s.notsleep, s.httpbin1.Addr(80))
		m.Logs.WaitFor(t, "RBAC rejected conn="+s.notsleep.IP.String()+"(spiffe://cluster.local/ns/default/sa/notsleep)->"+s.httpbin1.Addr(80).String())
	})

	t.Run("same-node fast path still enforces policy", func(t *testing.T) {
		m.CP.Policy(meshtest.AllowPolicy("allow-sleep", s.sleep.ID().Principal()))
		defer m.CP.Remove(discovery.AuthorizationType, "default/allow-sleep")
		meshtest.ExpectOK(t, s.sleep, s.httpbin2.Addr(80), "httpbin-2")
		meshtest.ExpectRefused(t, s.notsleep, s.httpbin2.Addr(80))
		m.Logs.WaitFor(t, "proxying to "+s.httpbin2.Addr(80).String()+" using node local fast path")
		m.Logs.WaitFor(t, "RBAC rejected conn="+s.notsleep.IP.String()+"(spiffe://cluster.local/ns/default/sa/notsleep)->"+s.httpbin2.Addr(80).String())
	})

	t.Run("L7 rule without waypoint refuses both", func(t *testing.T) {
		// The control plane drops rules needing L7 attributes; the ALLOW
		// policy arrives without groups and matches nothing (fail closed).
		m.CP.Policy(&security.Authorization{Name: "allow-sleep", Namespace: "default", Scope: security.Scope_NAMESPACE, Action: security.Action_ALLOW})
		defer m.CP.Remove(discovery.AuthorizationType, "default/allow-sleep")
		meshtest.ExpectRefused(t, s.sleep, s.httpbin1.Addr(80))
		meshtest.ExpectRefused(t, s.notsleep, s.httpbin1.Addr(80))
	})

	t.Run("outside the mesh: PERMISSIVE allowed, STRICT refused", func(t *testing.T) {
		meshtest.ExpectOK(t, s.outside, s.httpbin1.Addr(80), "httpbin-1")
		m.Logs.WaitFor(t, "inbound{", "peer_ip="+s.outside.IP.String()+" peer_id=none", "complete dur=")
		m.CP.Policy(meshtest.StrictPolicy())
		defer m.CP.Remove(discovery.AuthorizationType, "default/converted_peer_authentication_default")
		meshtest.ExpectRefused(t, s.outside, s.httpbin1.Addr(80))
		m.Logs.WaitFor(t, "RBAC rejected conn="+s.outside.IP.String()+"(none)->"+s.httpbin1.Addr(80).String())
		// mTLS callers are unaffected by STRICT.
		meshtest.ExpectOK(t, s.sleep, s.httpbin1.Addr(80), "httpbin-1")
	})

	t.Run("metrics move by the bytes sent", func(t *testing.T) {
		reg := s.httpbin1.Node.Metrics
		// Earlier connections must have finished so their bytes are in.
		waitUntil(t, func() bool { return s.httpbin1.Node.Proxy.Tracker().Len() == 0 }, "earlier connections to finish")
		before := counter(t, reg, "istio_tcp_received_bytes_total", "destination", "sleep")
		opened := counter(t, reg, "istio_tcp_connections_opened_total", "destination", "sleep")
		const size = 100000
		c, err := s.sleep.Dial(s.httpbin1.Addr(9000))
		if err != nil {
			t.Fatal(err)
		}
		c.Write(make([]byte, size))
		c.(interface{ CloseWrite() error }).CloseWrite()
		reply, _ := io.ReadAll(c)
		c.Close()
		if string(reply) != fmt.Sprintf("got %d", size) {
			t.Fatalf("reply %q", reply)
		}
		waitUntil(t, func() bool {
			return counter(t, reg, "istio_tcp_received_bytes_total", "destination", "sleep")-before == size
		}, "received bytes to grow by exactly %d", size)
		if got := counter(t, reg, "istio_tcp_connections_opened_total", "destination", "sleep") - opened; got != 1 {
			t.Fatalf("opened grew by %v, want 1", got)
		}
	})

	t.Run("half-close: all bytes arrive after the client ends its side", func(t *testing.T) {
		for _, dst := range []*meshtest.Pod{s.httpbin1, s.httpbin2} { // HBONE and fast path
			c, err := s.sleep.Dial(dst.Addr(9000))
			if err != nil {
				t.Fatal(err)
			}
			c.Write([]byte(strings.Repeat("x", 12345)))
			c.(interface{ CloseWrite() error }).CloseWrite()
			reply, err := io.ReadAll(c)
			c.Close()
			if string(reply) != "got 12345" {
				t.Fatalf("%s: reply %q, %v", dst.PodName, reply, err)
			}
		}
	})

	t.Run("upstream refuses: fails fast with a reason, nothing leaks", func(t *testing.T) {
		c, err := s.sleep.Dial(s.httpbin1.Addr(9999))
		if err == nil {
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			n, _ := c.Read(make([]byte, 1))
			c.Close()
			if n != 0 {
				t.Fatal("read data from a refused upstream")
			}
		}
		m.Logs.WaitFor(t, "dst.addr="+s.httpbin1.Addr(9999).String(), "reason=upstream_connect_failed")
		waitUntil(t, func() bool {
			return s.httpbin1.Node.Proxy.Tracker().Len() == 0 && s.sleep.Node.Proxy.Tracker().Len() == 0
		}, "tracked connections to drop to zero")
	})

	t.Run("policy change closes a tunnel no longer allowed", func(t *testing.T) {
		for _, dst := range []*meshtest.Pod{s.httpbin1, s.httpbin2} {
			c, err := s.notsleep.Dial(dst.Addr(9001))
			if err != nil {
				t.Fatal(err)
			}
			roundTrip(t, c, "ping")
			m.CP.Policy(meshtest.AllowPolicy("allow-sleep", s.sleep.ID().Principal()))
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			n, err := c.Read(make([]byte, 10))
			if err == nil || n != 0 {
				t.Fatalf("%s: connection still open after policy change (n=%d err=%v)", dst.PodName, n, err)
			}
			c.Close()
			m.Logs.WaitFor(t, "dst.addr="+dst.Addr(9001).String(), "reason=policy_changed")
			m.CP.Remove(discovery.AuthorizationType, "default/allow-sleep")
		}
	})

	t.Run("re-adoption keeps open connections and serves new ones", func(t *testing.T) {
		c, err := s.sleep.Dial(s.httpbin1.Addr(9001))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		roundTrip(t, c, "before")
		f, err := s.httpbin1.Open()
		if err != nil {
			t.Fatal(err)
		}
		// What the node agent does after its own restart: AddWorkload again.
		if err := s.httpbin1.Node.Proxy.AddWorkload(s.httpbin1.UID, inpod.WorkloadInfo{Name: "httpbin-1", Namespace: "default", ServiceAccount: "httpbin"}, f); err != nil {
			t.Fatal(err)
		}
		m.Logs.WaitFor(t, "workload re-adopted", s.httpbin1.UID)
		roundTrip(t, c, "after re-adoption")
		meshtest.ExpectOK(t, s.sleep, s.httpbin1.Addr(80), "httpbin-1")
	})

	t.Run("capture and release a running pod without restart", func(t *testing.T) {
		// outside-1 keeps running: its server stays up across capture/release.
		s.outside.ServeHTTP(t, 8080)
		meshtest.ExpectOK(t, s.sleep, s.outside.Addr(8080), "outside-1") // passthrough
		m.Logs.WaitFor(t, "proxying to "+s.outside.Addr(8080).String()+" using passthrough")
		s.outside.Capture(m)
		meshtest.ExpectOK(t, s.sleep, s.outside.Addr(8080), "outside-1")
		m.Logs.WaitFor(t, "proxy to "+s.outside.Addr(8080).String()+" using HBONE via")
		m.Logs.WaitFor(t, "peer_id=spiffe://cluster.local/ns/default/sa/sleep}: got CONNECT request to "+s.outside.Addr(8080).String())
		s.outside.Release(m)
		meshtest.ExpectOK(t, s.outside, s.httpbin1.Addr(80), "httpbin-1")
	})
}

func roundTrip(t *testing.T, c interface {
	Write([]byte) (int, error)
	Read([]byte) (int, error)
}, msg string) {
	t.Helper()
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c.(io.Reader), buf); err != nil || string(buf) != msg {
		t.Fatalf("echo %q, %v", buf, err)
	}
}

func waitUntil(t *testing.T, cond func() bool, format string, args ...any) {
	t.Helper()
	for i := 0; i < 500; i++ {
		if cond() {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for "+format, args...)
}

// counter sums a metric over series with the reporter and source workload.
func counter(t *testing.T, reg interface {
	Gather() ([]*dto.MetricFamily, error)
}, name, reporter, srcWorkload string) float64 {
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, f := range fams {
		if f.GetName() != name {
			continue
		}
		for _, mt := range f.GetMetric() {
			l := map[string]string{}
			for _, lp := range mt.GetLabel() {
				l[lp.GetName()] = lp.GetValue()
			}
			if l["reporter"] == reporter && l["source_workload"] == srcWorkload {
				sum += mt.GetCounter().GetValue()
			}
		}
	}
	return sum
}

// TestSOCKS5: a pod asks ztunnel's :15080 for a destination explicitly; the
// connection takes the same outbound path (HBONE with sleep's identity).
func TestSOCKS5(t *testing.T) {
	m := meshtest.New(t, 2)
	m.SyncAll()
	sleep := m.AddPod(m.Nodes[0], "sleep-1", "sleep", true)
	httpbin := m.AddPod(m.Nodes[1], "httpbin-1", "httpbin", true)
	httpbin.ServeTCP(t, 9000, meshtest.CountThenReply)

	c, err := sleep.Dial(netip.MustParseAddrPort("127.0.0.1:15080"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ip := httpbin.IP.As4()
	c.Write([]byte{5, 1, 0})
	c.Write([]byte{5, 1, 0, 1, ip[0], ip[1], ip[2], ip[3], 0x23, 0x28}) // port 9000
	hdr := make([]byte, 12)
	if _, err := io.ReadFull(c, hdr); err != nil || hdr[0] != 5 || hdr[1] != 0 || hdr[3] != 0 {
		t.Fatalf("socks5 replies %v, %v", hdr, err)
	}
	c.Write([]byte("hello"))
	c.(interface{ CloseWrite() error }).CloseWrite()
	reply, _ := io.ReadAll(c)
	if string(reply) != "got 5" {
		t.Fatalf("reply %q", reply)
	}
	m.Logs.WaitFor(t, "peer_id=spiffe://cluster.local/ns/default/sa/sleep}: got CONNECT request to "+httpbin.Addr(9000).String())

	// Only the pod itself may ask: from another host, sleep's :15080 must
	// not be a SOCKS5 proxy (it would tunnel as sleep's identity).
	outsider := m.AddPod(m.Nodes[1], "outsider-1", "notsleep", false)
	if oc, err := outsider.Dial(sleep.Addr(15080)); err == nil {
		oc.SetDeadline(time.Now().Add(5 * time.Second))
		oc.Write([]byte{5, 1, 0})
		greeting := make([]byte, 2)
		_, rerr := io.ReadFull(oc, greeting)
		oc.Close()
		t.Fatalf("%s reachable from another host (greeting %v, %v), want refused", sleep.Addr(15080), greeting, rerr)
	}

	// A bad request gets a SOCKS error reply, not a connection.
	bad, err := sleep.Dial(netip.MustParseAddrPort("127.0.0.1:15080"))
	if err != nil {
		t.Fatal(err)
	}
	defer bad.Close()
	bad.Write([]byte{5, 1, 0, 5, 2, 0, 1, 10, 0, 0, 1, 0, 80}) // BIND
	resp, _ := io.ReadAll(bad)
	if len(resp) < 4 || resp[3] != 7 {
		t.Fatalf("BIND reply %v, want command-not-supported", resp)
	}
}

package meshtest

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/hbone/meshtransport"
	"github.com/ambientmesh/ambient/proxylib/identity"
	"github.com/ambientmesh/ambient/proxylib/inpod"
	"github.com/ambientmesh/ambient/proxylib/proxy"
	"github.com/ambientmesh/ambient/proxylib/redirect"
	"github.com/ambientmesh/ambient/proxylib/telemetry"
	"github.com/ambientmesh/ambient/proxylib/waypoint"
)

// SidecarAppUID owns the app's sockets in sidecar pods (Pod.AppUID); the
// test process's own user (root) plays the sidecar's.
const SidecarAppUID = 1000

// SidecarPod is a pod served by its own sidecar, wired as cmd/sidecar wires
// it (proxylib/boot): the in-pod proxy unprivileged (no marks), the pod's
// redirection letting the sidecar's user pass, its own discovery State, and
// only its own identity's certificate.
type SidecarPod struct {
	*Pod
	Proxy   *proxy.Proxy
	L7      *waypoint.Server
	State   *discovery.State
	Metrics *prometheus.Registry
}

// AddSidecarPod creates a pod on n whose sidecar serves it; discovery
// publishes it as an injected pod is published (HBONE, native tunnel, no
// waypoint). The node's ztunnel does not capture it.
func (m *Mesh) AddSidecarPod(n *Node, name, sa string, mut ...func(*workloadapi.Workload)) *SidecarPod {
	m.T.Helper()
	p := m.AddPod(n, name, sa, false, append([]func(*workloadapi.Workload){func(w *workloadapi.Workload) {
		w.TunnelProtocol, w.NativeTunnel = workloadapi.TunnelProtocol_HBONE, true
	}}, mut...)...)
	p.AppUID = SidecarAppUID
	f, err := p.Open()
	if err != nil {
		m.T.Fatal(err)
	}
	// What `sidecar init` installs, with the test process as the sidecar.
	if err := redirect.NewNFTables(redirect.SidecarConfig(0, redirect.Exclusions{})).Install(f); err != nil {
		m.T.Fatal(err)
	}
	certs := identity.NewStaticSource(m.CA.TrustDomain, m.CA.Roots())
	id := m.CA.ID(Namespace, sa)
	certs.Set(id, m.CA.Issue(m.T, id))
	tr, err := meshtransport.New(meshtransport.ForSidecar(meshtransport.Config{Protocol: TransportProtocol(), Certs: certs, Log: m.Logs.Logger(name).V(2)}))
	if err != nil {
		m.T.Fatal(err)
	}
	sp := &SidecarPod{Pod: p, Metrics: prometheus.NewRegistry()}
	var demand func(ctx context.Context, names ...string) error
	if m.ScopedSidecars {
		sp.State, demand = m.CP.NewSidecarState(p.UID)
	} else {
		sp.State = m.CP.NewState(discovery.SidecarTypes...)
	}
	m.CP.SyncEmpty(sp.State)
	sp.Proxy, err = proxy.New(proxy.Config{Log: m.Logs.Logger(name), State: sp.State, Certs: certs,
		Metrics: telemetry.NewMetrics(sp.Metrics), NewDialer: tr.NewDialer, NewHBONEServer: tr.NewServer,
		ConnectTimeout: 3 * time.Second, Unprivileged: true, Demand: demand})
	if err != nil {
		m.T.Fatal(err)
	}
	// The pod's L7 from the waypoint's engine, as cmd/sidecar wires it.
	if sp.L7, err = waypoint.NewSidecar(waypoint.SidecarConfig{Pod: name, Namespace: Namespace, Identity: id, State: sp.State,
		Registry: sp.Metrics, Demand: demand, Log: m.Logs.Logger(name)}); err != nil {
		m.T.Fatal(err)
	}
	sp.Proxy.SetL7(sp.L7)
	m.T.Cleanup(sp.L7.Close)
	m.T.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		sp.Proxy.Drain(ctx)
	})
	if err := sp.Proxy.AddWorkload(p.UID, inpod.WorkloadInfo{Name: name, Namespace: Namespace, ServiceAccount: sa}, f); err != nil {
		m.T.Fatal(err)
	}
	sp.Proxy.SnapshotDone()
	return sp
}

// Package meshtest is the namespaced mesh harness shared by the integration
// tests of ztunnel (test/ztunnel) and of the waypoint (test/waypoint): a
// cluster of node and pod network namespaces (test/netns), a ztunnel
// (proxylib/proxy) per node with real redirection (proxylib/redirect) and
// real HBONE with mTLS between ztunnels, and a test control plane that feeds
// every discovery State with hand-built Istio workload-API resources.
//
// The tests need root (see test/netns). All workloads live in namespace
// "default" of trust domain hbonetest.DefaultTrustDomain.
package meshtest

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/dnsproxy"
	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/hbone/hbonetest"
	"github.com/ambientmesh/ambient/proxylib/hbone/meshtransport"
	"github.com/ambientmesh/ambient/proxylib/identity"
	"github.com/ambientmesh/ambient/proxylib/proxy"
	"github.com/ambientmesh/ambient/proxylib/redirect"
	"github.com/ambientmesh/ambient/proxylib/telemetry"
	"github.com/ambientmesh/ambient/test/netns"
)

// ClusterID is the cluster every workload belongs to.
const ClusterID = "Kubernetes"

// RootNamespace is the mesh's root namespace, as the operator and the
// control plane have it: the mesh namespace (its policies are mesh-wide).
// Every proxy and every policy translation of the suites uses it.
const RootNamespace = "ambient-system"

// Namespace is the Kubernetes namespace of every workload.
const Namespace = "default"

// DefaultServiceAccounts are the service accounts whose certificates every
// node's ztunnel holds unless WithServiceAccounts says otherwise.
var DefaultServiceAccounts = []string{"sleep", "notsleep", "httpbin", "waypoint", "outside"}

// Mesh is a cluster with a ztunnel per node.
type Mesh struct {
	T       testing.TB
	Cluster *netns.Cluster
	CA      *hbonetest.CA
	CP      *ControlPlane
	Logs    *Logs
	Nodes   []*Node
	// Redirect captures pods (Pod.Capture); nftables with the default
	// configuration unless a test replaces it before capturing.
	Redirect redirect.Redirector
	// WaypointStates are the States made by NewWaypointState.
	WaypointStates []*discovery.State
	// DNSRedirect is Redirect with DNS capture (WithDNS); CaptureDNS makes
	// Pod.Capture use it and serve the pod's DNS proxy, forwarding to
	// DNSNameservers (host:port, the pods' resolv.conf). Tests may change
	// both between captures.
	DNSRedirect redirect.Redirector
	CaptureDNS  bool
	// ScopedSidecars: sidecars added from now on get a sidecar's scoped
	// discovery (ControlPlane.NewSidecarState) and look the rest up.
	ScopedSidecars bool
	DNSNameservers []string

	serviceAccounts []string
	dualStack       bool
	logTransport    bool
	dns             bool
	onDemand        bool
}

// Node is a node namespace and its ztunnel.
type Node struct {
	*netns.Node
	// NodeName is the Kubernetes node name ("node1"); the embedded Name is
	// the namespace's (prefixed) name.
	NodeName string
	State    *discovery.State
	Proxy    *proxy.Proxy
	Metrics  *prometheus.Registry
	// DNS is the node's DNS proxy (WithDNS), nil otherwise.
	DNS *dnsproxy.Proxy
}

// Option configures New.
type Option func(*Mesh)

// WithServiceAccounts replaces DefaultServiceAccounts.
func WithServiceAccounts(sas ...string) Option {
	return func(m *Mesh) { m.serviceAccounts = sas }
}

// WithDNS gives every ztunnel a DNS proxy (its debug access log kept in
// Logs) and captures pods' DNS (CaptureDNS) with DNSRedirect.
func WithDNS() Option {
	return func(m *Mesh) {
		m.dns, m.CaptureDNS = true, true
		m.DNSRedirect = redirect.NewNFTables(redirect.DefaultConfig().WithDNS())
	}
}

// WithDualStack publishes every pod with both of its addresses (IPv4
// first, as the control plane lists a dual-stack pod's status.podIPs); pods
// always have both, this only says whether discovery knows the IPv6 one.
func WithDualStack() Option {
	return func(m *Mesh) { m.dualStack = true }
}

// WithOnDemand makes every ztunnel node-scoped: its State holds services,
// its node's workloads and what it looked up (ControlPlane.NewScopedState).
func WithOnDemand() Option {
	return func(m *Mesh) { m.onDemand = true }
}

// WithTransportLog makes each ztunnel's HBONE transport log to its node's
// logger at V(2) (so only its errors show) instead of discarding its logs.
func WithTransportLog() Option {
	return func(m *Mesh) { m.logTransport = true }
}

// New builds a cluster of nodes nodes, "node1", "node2", …, each with a
// ztunnel.
func New(t testing.TB, nodes int, opts ...Option) *Mesh {
	c := netns.NewCluster(t)
	m := &Mesh{T: t, Cluster: c, CA: hbonetest.NewCA(t, hbonetest.DefaultTrustDomain), CP: &ControlPlane{t: t},
		Logs: &Logs{t: t}, Redirect: redirect.NewNFTables(redirect.DefaultConfig()), serviceAccounts: DefaultServiceAccounts}
	for _, o := range opts {
		o(m)
	}
	// The mesh settings the control plane sends the L7 proxies (a
	// sidecar's engine learns the root namespace only from them).
	mesh, err := discovery.MeshResource(discovery.MeshSettings{RootNamespace: RootNamespace})
	if err != nil {
		t.Fatal(err)
	}
	m.CP.Push(discovery.L7ResourceType, discovery.MeshKey(discovery.MeshSettings{RootNamespace: RootNamespace}), mesh)
	for i := 0; i < nodes; i++ {
		m.AddNode(fmt.Sprintf("node%d", i+1))
	}
	return m
}

// AddNode adds a node namespace running a ztunnel that holds certificates
// for the mesh's service accounts.
func (m *Mesh) AddNode(name string) *Node {
	n := &Node{Node: m.Cluster.AddNode(name), NodeName: name, Metrics: prometheus.NewRegistry()}
	var demand func(ctx context.Context, names ...string) error
	if m.onDemand {
		n.State, demand = m.CP.NewScopedState(name)
	} else {
		n.State = m.CP.NewState()
	}
	certs := identity.NewStaticSource(m.CA.TrustDomain, m.CA.Roots())
	for _, sa := range m.serviceAccounts {
		id := m.CA.ID(Namespace, sa)
		certs.Set(id, m.CA.Issue(m.T, id))
	}
	log := m.Logs.Logger(name)
	tlog := logr.Discard()
	if m.logTransport {
		tlog = log.V(2)
	}
	f := newTransport(m.T, certs, tlog)
	if m.dns {
		var err error
		if n.DNS, err = dnsproxy.New(dnsproxy.Config{Services: n.State, Metrics: dnsproxy.NewMetrics(n.Metrics),
			Log: m.Logs.LoggerV(name, 1), Timeout: time.Second}); err != nil {
			m.T.Fatal(err)
		}
	}
	p, err := proxy.New(proxy.Config{Log: log, State: n.State, Certs: certs, Node: name,
		Metrics: telemetry.NewMetrics(n.Metrics), NewDialer: f.NewDialer, NewHBONEServer: f.NewServer,
		ConnectTimeout: 3 * time.Second, DNS: n.DNS, Demand: demand})
	if err != nil {
		m.T.Fatal(err)
	}
	n.Proxy = p
	m.T.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		p.Drain(ctx)
	})
	m.Nodes = append(m.Nodes, n)
	return n
}

// AddPod creates a pod on n and publishes its workload (after mut);
// captured pods get the redirection rules and are handed to the node's
// ztunnel (Pod.Capture).
func (m *Mesh) AddPod(n *Node, name, sa string, captured bool, mut ...func(*workloadapi.Workload)) *Pod {
	np := n.AddPod(name)
	p := &Pod{Pod: np, PodName: name, Namespace: Namespace, ServiceAccount: sa, Node: n, UID: discovery.PodUID(ClusterID, Namespace, name)}
	addrs := [][]byte{np.IP.AsSlice()}
	if m.dualStack {
		addrs = append(addrs, np.IP6.AsSlice())
	}
	p.Workload = &workloadapi.Workload{Uid: p.UID, Name: name, Namespace: Namespace, Addresses: addrs,
		TrustDomain: m.CA.TrustDomain, ServiceAccount: sa, Node: n.NodeName, WorkloadName: strings.TrimRight(name, "-0123456789"),
		CanonicalName: strings.TrimRight(name, "-0123456789"), CanonicalRevision: "v1", ClusterId: ClusterID,
		WorkloadType: workloadapi.WorkloadType_POD, Status: workloadapi.WorkloadStatus_HEALTHY}
	for _, f := range mut {
		f(p.Workload)
	}
	if captured {
		p.Capture(m)
	} else {
		m.CP.Workload(p.Workload)
	}
	return p
}

// SyncAll marks every node's State fully synced.
func (m *Mesh) SyncAll() {
	for _, n := range m.Nodes {
		m.CP.SyncEmpty(n.State)
	}
}

// NewWaypointState registers a synced discovery State that also receives
// L7 resources, for a waypoint; call it before pods are added so that it
// sees every resource.
func (m *Mesh) NewWaypointState() *discovery.State {
	s := m.CP.NewState(discovery.AddressType, discovery.AuthorizationType, discovery.L7ResourceType)
	m.CP.SyncEmpty(s)
	m.WaypointStates = append(m.WaypointStates, s)
	return s
}

// TransportProtocol is the HBONE transport under test: HTTP/2 unless
// ZTUNNEL_TEST_TRANSPORT names another (HTTP3).
func TransportProtocol() hbone.Protocol {
	return hbone.Protocol(os.Getenv("ZTUNNEL_TEST_TRANSPORT"))
}

// Transport is the transport under test, as ztunnel wires it in pods,
// for certs, with its logs discarded.
func Transport(t testing.TB, certs hbone.CertSource) *meshtransport.Transport {
	return newTransport(t, certs, logr.Discard())
}

func newTransport(t testing.TB, certs hbone.CertSource, log logr.Logger) *meshtransport.Transport {
	tr, err := meshtransport.New(meshtransport.ForPods(meshtransport.Config{Protocol: TransportProtocol(), Certs: certs, Log: log}))
	if err != nil {
		t.Fatal(err)
	}
	return tr
}

// Package proxy is ztunnel's L4 data path: per captured pod it serves
// outbound capture (:15001), inbound plaintext (:15006), inbound HBONE
// (:15008) and SOCKS5 (:15080) inside the pod's network namespace, routes
// with discovery state, authorizes at the destination, and tunnels over an
// HBONE transport. The waypoint reuses Router, Relay, Tracker and the
// inbound authorization pieces.
package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/go-logr/logr"

	"github.com/ambientmesh/ambient/proxylib/admin/adminapi"
	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/dnsproxy"
	"github.com/ambientmesh/ambient/proxylib/handover"
	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/identity"
	"github.com/ambientmesh/ambient/proxylib/inpod"
	"github.com/ambientmesh/ambient/proxylib/netnsutil"
	"github.com/ambientmesh/ambient/proxylib/proxyerr"
	"github.com/ambientmesh/ambient/proxylib/rbac"
	"github.com/ambientmesh/ambient/proxylib/redirect"
	"github.com/ambientmesh/ambient/proxylib/telemetry"
)

// Ports ztunnel listens on inside each captured pod (docs/interfaces.md).
const (
	OutboundPort = 15001
	InboundPort  = 15006
	HBONEPort    = hbone.Port
	SOCKS5Port   = 15080
	// SOCKS5Host is the only address the SOCKS5 listener binds: the pod's
	// loopback, never an address the network can reach.
	SOCKS5Host = "127.0.0.1"
)

// HBONEServer serves a pod's HBONE listener (see hbone.Server).
type HBONEServer = hbone.Server

// Config wires a Proxy. State, Certs, NewDialer and NewHBONEServer are required.
type Config struct {
	Log         logr.Logger
	State       *discovery.State
	Certs       hbone.CertSource
	Node        string
	TrustDomain string
	Metrics     *telemetry.Metrics
	// LookupHost resolves endpoints known by hostname only (ServiceEntry
	// DNS resolution, WorkloadEntries with a hostname); default: the
	// system resolver of ztunnel's own network namespace.
	LookupHost func(ctx context.Context, host string) ([]netip.Addr, error)
	// NewDialer returns an HBONE dialer whose sockets are opened in ns (the
	// pod's namespace, so the source address is the pod's) with the mark.
	NewDialer func(ns *os.File) (hbone.Dialer, error)
	// Demand looks up addresses State does not hold (Router.Demand); nil
	// when the control plane pushes every address.
	Demand func(ctx context.Context, names ...string) error
	// NewHBONEServer listens on host:15008 inside ns and returns a server
	// presenting local's certificate.
	NewHBONEServer func(ns *os.File, host string, local identity.Identity, h hbone.Handler) (HBONEServer, error)
	// ListenHost overrides the listeners' bind address ("" = all). Tests that
	// run several pods in one namespace bind each to its pod address.
	ListenHost func(w WorkloadInfo) string
	// CertsReady reports whether every served pod holds a certificate, for
	// Ready (the readiness probe); nil means yes.
	CertsReady func() bool
	// ConnectTimeout bounds upstream dials (default 10s).
	ConnectTimeout time.Duration
	// Unprivileged is the sidecar: the proxy runs as its own user inside the
	// one pod it serves, without CAP_NET_ADMIN, so its sockets carry no mark
	// (SO_MARK needs that capability); the pod's redirection lets them pass
	// by owner instead (redirect.Config.SkipOwnerUIDs).
	Unprivileged bool
	// Handover, when set, offers and accepts resumable sessions on direct
	// tunnels, so an upgrade can hand connections over (proxylib/handover,
	// Proxy.HandOver and TakeOver); nil: never (the waypoint, tests).
	Handover *handover.Registry
	// DNS, when set, serves the DNS proxy (:15053 on the pod's loopback) in
	// pods whose DNS the node agent redirects (WorkloadInfo.CaptureDNS).
	DNS *dnsproxy.Proxy
}

// listenOptions are the in-pod listeners' socket options.
func (p *Proxy) listenOptions() netnsutil.SocketOptions {
	o := netnsutil.PodListenOptions
	if p.cfg.Unprivileged {
		o.Mark = 0
	}
	return o
}

// dialOptions are the in-pod upstream sockets' options.
func (p *Proxy) dialOptions() netnsutil.SocketOptions {
	if p.cfg.Unprivileged {
		return netnsutil.SocketOptions{}
	}
	return netnsutil.SocketOptions{Mark: netnsutil.Mark}
}

// WorkloadInfo is what the node agent tells about a pod (ZDS AddWorkload).
type WorkloadInfo struct {
	UID string
	inpod.WorkloadInfo
}

// Proxy is one node's ztunnel data path.
type Proxy struct {
	cfg      Config
	log      logr.Logger
	router   *Router
	tracker  *Tracker
	ids      atomic.Uint64
	snapshot atomic.Bool
	draining atomic.Bool // Drain started: no new pods, no listeners
	stopOnce sync.Once
	l7       atomic.Pointer[L7]

	mu   sync.Mutex
	pods map[string]*pod // by uid
}

// New returns a Proxy; it re-authorizes open connections on every policy
// or workload change.
func New(cfg Config) (*Proxy, error) {
	if cfg.State == nil || cfg.Certs == nil || cfg.NewDialer == nil || cfg.NewHBONEServer == nil {
		return nil, errors.New("proxy: State, Certs, NewDialer and NewHBONEServer are required")
	}
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = 10 * time.Second
	}
	if cfg.TrustDomain == "" {
		cfg.TrustDomain = cfg.Certs.TrustDomain()
	}
	if cfg.Metrics == nil {
		cfg.Metrics = telemetry.NewMetrics(nil)
	}
	p := &Proxy{
		cfg:     cfg,
		log:     cfg.Log,
		router:  &Router{State: cfg.State, Node: cfg.Node, TrustDomain: cfg.TrustDomain, LookupHost: cfg.LookupHost, Demand: cfg.Demand},
		tracker: NewTracker(),
		pods:    map[string]*pod{},
	}
	cfg.State.OnChange(func(discovery.Change) { p.revalidate() })
	return p, nil
}

// Router exposes the proxy's router (shared with the admin endpoints).
func (p *Proxy) Router() *Router { return p.router }

// Tracker exposes the connection tracker.
func (p *Proxy) Tracker() *Tracker { return p.tracker }

// Ready reports whether discovery has fully synced and certificates are
// available: the readiness the probe reports.
func (p *Proxy) Ready() bool {
	return p.cfg.State.Ready() && (p.cfg.CertsReady == nil || p.cfg.CertsReady())
}

// awaitDiscovery holds a connection until discovery has synced, for at
// most ConnectTimeout, then refuses it (fail closed: policy is unknown
// until then). A fresh ztunnel listens in a pod's namespace as soon as
// the node agent hands the pod over, beside the ztunnel it replaces
// (SO_REUSEPORT), so its first connections can arrive before its first
// discovery response. Certificates need no check here: the handshake
// that uses one waits for its fetch (identity.Store.Certificate).
func (p *Proxy) awaitDiscovery(ctx context.Context) error {
	if err := p.cfg.State.HoldUntilReady(ctx, p.cfg.ConnectTimeout); err != nil {
		return proxyerr.New(proxyerr.NotReady, "%v", err)
	}
	return nil
}

// pod is one captured pod: its namespace, listeners and HBONE dialer.
type pod struct {
	info   WorkloadInfo
	ns     *os.File
	dialer hbone.Dialer
	hbone  HBONEServer
	lns    []net.Listener
	// preserve: the node agent installed the return-path rules (ZDS
	// preserve_source) and we found them, so dialApp may connect from the
	// client's address.
	preserve atomic.Bool
	// tproxy: the node agent captures the pod's inbound with TPROXY (ZDS
	// inbound_tproxy), so no NAT entry holds an inbound client's tuple.
	tproxy atomic.Bool
	dnsMu  sync.Mutex
	dns    *dnsproxy.PodServer // nil: DNS not captured
}

// identity is the pod's SPIFFE identity.
func (p *Proxy) podIdentity(info WorkloadInfo) identity.Identity {
	if w := p.workloadOf(info); w != nil {
		return p.router.WorkloadIdentity(w)
	}
	sa := info.ServiceAccount
	if sa == "" {
		sa = "default"
	}
	return identity.Identity{TrustDomain: p.cfg.TrustDomain, Namespace: info.Namespace, ServiceAccount: sa}
}

var _ inpod.WorkloadHandler = (*Proxy)(nil)

// SnapshotDone implements inpod.WorkloadHandler.
func (p *Proxy) SnapshotDone() { p.snapshot.Store(true) }

// AddWorkload opens the pod's four listeners inside ns. The Proxy owns ns
// from now on (closed by DelWorkload). Adding a known uid again replaces it
// (re-adoption after a restart of the node agent).
func (p *Proxy) AddWorkload(uid string, wi inpod.WorkloadInfo, ns *os.File) error {
	info := WorkloadInfo{UID: uid, WorkloadInfo: wi}
	if info.UID == "" || ns == nil {
		return errors.New("proxy: AddWorkload needs a uid and a namespace")
	}
	if p.draining.Load() {
		// Listening now would pull the pod's new connections to an instance
		// that is going away; the instance replacing us takes the pod.
		return errors.New("proxy: draining (shutting down), not taking new pods")
	}
	p.mu.Lock()
	old := p.pods[info.UID]
	if old != nil && sameNamespace(old.ns, ns) {
		// Re-adoption of a pod we already serve: keep its listeners and
		// connections untouched.
		old.info = info
		p.mu.Unlock()
		old.preserve.Store(p.canPreserve(info, ns))
		old.tproxy.Store(info.InboundTPROXY)
		ns.Close()
		if err := p.syncDNS(old); err != nil {
			return err
		}
		p.log.Info("workload re-adopted", "uid", info.UID, "preserveSource", old.preserve.Load(), "inboundTPROXY", info.InboundTPROXY)
		return nil
	}
	delete(p.pods, info.UID)
	p.mu.Unlock()
	if old != nil {
		// Open connections keep running; only the listeners are replaced.
		p.closePod(old, false)
		if old.ns != ns {
			old.ns.Close()
		}
	}
	pd := &pod{info: info, ns: ns}
	pd.preserve.Store(p.canPreserve(info, ns))
	pd.tproxy.Store(info.InboundTPROXY)
	if err := p.openPod(pd); err != nil {
		p.closePod(pd, false)
		return err
	}
	p.mu.Lock()
	p.pods[info.UID] = pd
	p.mu.Unlock()
	p.log.Info("workload added", "uid", info.UID, "name", info.Name, "namespace", info.Namespace, "preserveSource", pd.preserve.Load(), "inboundTPROXY", info.InboundTPROXY)
	return nil
}

// canPreserve decides whether inbound connections to the pod may come from
// the client's address: the node agent says it installed the return path,
// and the policy rule is really there. Without it a transparent dial's
// replies would leave through eth0 and the connection would hang, so any
// doubt means no (fail safe: the app then sees the pod's own address).
func (p *Proxy) canPreserve(info WorkloadInfo, ns *os.File) bool {
	if !info.PreserveSource {
		return false
	}
	ok, err := redirect.HasSourceRouting(ns)
	if err != nil || !ok {
		reason := "policy routing missing in the pod's namespace"
		if err != nil {
			reason = err.Error()
		}
		p.log.Info("source preservation off for workload: node agent announced it but "+reason, "uid", info.UID)
		return false
	}
	return true
}

func (p *Proxy) openPod(pd *pod) error {
	host := ""
	if p.cfg.ListenHost != nil {
		host = p.cfg.ListenHost(pd.info)
	}
	listen := func(host string, port int) (net.Listener, error) {
		opts := p.listenOptions()
		// The plaintext inbound listener is always transparent (ztunnel
		// holds CAP_NET_ADMIN), so TPROXY capture can hand it connections
		// for the app's address; with NAT capture it changes nothing. A
		// mesh switching modes then needs no new listener.
		opts.Transparent = port == InboundPort && !p.cfg.Unprivileged
		ln, err := netnsutil.ListenTCP(pd.ns, net.JoinHostPort(host, strconv.Itoa(port)), opts)
		if err != nil {
			return nil, fmt.Errorf("listen :%d in pod %s: %w", port, pd.info.UID, err)
		}
		pd.lns = append(pd.lns, ln)
		return ln, nil
	}
	var err error
	if pd.dialer, err = p.cfg.NewDialer(pd.ns); err != nil {
		return fmt.Errorf("hbone dialer for %s: %w", pd.info.UID, err)
	}
	out, err := listen(host, OutboundPort)
	if err != nil {
		return err
	}
	in, err := listen(host, InboundPort)
	if err != nil {
		return err
	}
	// SOCKS5 serves the pod's own processes only: on another host's
	// connection it would open tunnels with this pod's identity.
	socks, err := listen(SOCKS5Host, SOCKS5Port)
	if err != nil {
		return err
	}
	local := p.podIdentity(pd.info)
	handler := hbone.HandlerFunc(func(ctx context.Context, req *hbone.Request, resp hbone.Responder) {
		p.serveHBONE(ctx, pd, req, resp)
	})
	// A replaced server may still be releasing the port (re-adoption).
	for i := 0; ; i++ {
		if pd.hbone, err = p.cfg.NewHBONEServer(pd.ns, host, local, handler); err == nil {
			break
		}
		if i == 20 || !errors.Is(err, syscall.EADDRINUSE) {
			return fmt.Errorf("hbone server for %s: %w", pd.info.UID, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := p.syncDNS(pd); err != nil {
		return err
	}
	go p.acceptLoop(out, func(c net.Conn) { p.serveOutbound(pd, c, netip.AddrPort{}) })
	go p.acceptLoop(in, func(c net.Conn) { p.servePlaintextInbound(pd, c) })
	go p.acceptLoop(socks, func(c net.Conn) { p.serveSOCKS5(pd, c) })
	go func() {
		if err := pd.hbone.Serve(); err != nil && !errors.Is(err, net.ErrClosed) {
			p.log.V(1).Info("hbone server stopped", "uid", pd.info.UID, "err", err.Error())
		}
	}()
	return nil
}

func (pd *pod) stopDNS() {
	pd.dnsMu.Lock()
	defer pd.dnsMu.Unlock()
	if pd.dns != nil {
		pd.dns.Close()
		pd.dns = nil
	}
}

// syncDNS starts or stops the pod's DNS proxy as its info says.
func (p *Proxy) syncDNS(pd *pod) error {
	p.mu.Lock()
	want := pd.info.CaptureDNS && p.cfg.DNS != nil && !p.draining.Load()
	noProxy := pd.info.CaptureDNS && p.cfg.DNS == nil
	p.mu.Unlock()
	if noProxy {
		p.log.Info("the node agent captures this pod's DNS but this proxy has no DNS proxy: the pod's DNS queries fail", "uid", pd.info.UID)
	}
	pd.dnsMu.Lock()
	defer pd.dnsMu.Unlock()
	switch {
	case want && pd.dns == nil:
		c := dnsproxy.Client{Name: pd.info.Name, Namespace: pd.info.Namespace,
			Workload: func() string {
				p.mu.Lock()
				info := pd.info
				p.mu.Unlock()
				return telemetry.PeerOf(p.workloadOf(info), nil).Workload
			},
			Upstreams: func() []string {
				p.mu.Lock()
				defer p.mu.Unlock()
				return pd.info.DNSNameservers
			},
			Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
				return netnsutil.Dial(ctx, pd.ns, network, addr, p.dialOptions())
			}}
		s, err := p.cfg.DNS.ServePod(pd.ns, c, dnsproxy.Port, p.listenOptions())
		if err != nil {
			return fmt.Errorf("dns proxy for %s: %w", pd.info.UID, err)
		}
		pd.dns = s
	case !want && pd.dns != nil:
		pd.dns.Close()
		pd.dns = nil
	}
	return nil
}

func (p *Proxy) acceptLoop(ln net.Listener, serve func(net.Conn)) {
	for {
		c, err := ln.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return
		}
		go serve(c)
	}
}

// DelWorkload closes the pod's listeners and its connections.
func (p *Proxy) DelWorkload(uid string) error {
	p.mu.Lock()
	pd := p.pods[uid]
	delete(p.pods, uid)
	p.mu.Unlock()
	if pd == nil {
		return fmt.Errorf("proxy: unknown workload %q", uid)
	}
	p.closePod(pd, true)
	p.log.Info("workload removed", "uid", uid)
	return nil
}

func (p *Proxy) closePod(pd *pod, closeConns bool) {
	for _, ln := range pd.lns {
		ln.Close()
	}
	pd.stopDNS()
	if pd.hbone != nil {
		if closeConns {
			pd.hbone.Close()
		} else {
			// Replaced (re-adoption): open tunnels run to their end.
			pd.hbone.Drain()
		}
	}
	if closeConns {
		p.tracker.CloseOwned(pd.info.UID, proxyerr.ConnectionClosed)
	}
	if pd.dialer != nil {
		pd.dialer.Close()
	}
	if closeConns {
		pd.ns.Close()
	}
}

// DNSStatus describes the DNS proxy for the admin endpoint: the pods
// served, whether their DNS is captured, and their resolvers. nil without
// a DNS proxy.
func (p *Proxy) DNSStatus() *adminapi.DNS {
	if p.cfg.DNS == nil {
		return nil
	}
	d := &adminapi.DNS{ClusterDomain: p.cfg.DNS.ClusterDomain(), DefaultUpstreams: p.cfg.DNS.DefaultUpstreams(),
		CacheEntries: p.cfg.DNS.Cache().Len(), Pods: []adminapi.DNSPod{}}
	if d.DefaultUpstreams == nil {
		d.DefaultUpstreams = []string{}
	}
	for _, pd := range p.podList() {
		p.mu.Lock()
		info := pd.info
		p.mu.Unlock()
		pd.dnsMu.Lock()
		serving := pd.dns != nil
		pd.dnsMu.Unlock()
		d.Pods = append(d.Pods, adminapi.DNSPod{Name: info.Name, Namespace: info.Namespace, UID: info.UID,
			Captured: serving, Nameservers: append([]string{}, info.DNSNameservers...)})
	}
	sort.Slice(d.Pods, func(i, j int) bool {
		if d.Pods[i].Namespace != d.Pods[j].Namespace {
			return d.Pods[i].Namespace < d.Pods[j].Namespace
		}
		return d.Pods[i].Name < d.Pods[j].Name
	})
	return d
}

// Workloads lists the uids of the pods this proxy serves.
func (p *Proxy) Workloads() []WorkloadInfo {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]WorkloadInfo, 0, len(p.pods))
	for _, pd := range p.pods {
		out = append(out, pd.info)
	}
	return out
}

// clusterID prefixes discovery's pod uids (Istio's default, as the control plane).
const clusterID = "Kubernetes"

// discoveryUID is the uid discovery gives a captured pod. The node agent names
// pods by their Kubernetes UID (as Istio's ZDS does); discovery by
// Kubernetes//Pod/<ns>/<name>.
func (info WorkloadInfo) discoveryUID() string {
	return discovery.PodUID(clusterID, info.Namespace, info.Name)
}

// workloadOf is the captured pod's workload in discovery, nil if unknown.
func (p *Proxy) workloadOf(info WorkloadInfo) *workloadapi.Workload {
	if w := p.cfg.State.WorkloadByUID(info.UID); w != nil {
		return w
	}
	if info.Name == "" || info.Namespace == "" {
		return nil
	}
	return p.cfg.State.WorkloadByUID(info.discoveryUID())
}

// localPod returns the captured pod serving workload uid (a discovery uid),
// if on this node.
func (p *Proxy) localPod(uid string) *pod {
	p.mu.Lock()
	defer p.mu.Unlock()
	if pd := p.pods[uid]; pd != nil {
		return pd
	}
	for _, pd := range p.pods {
		if pd.info.Name != "" && pd.info.discoveryUID() == uid {
			return pd
		}
	}
	return nil
}

// Drain is ztunnel's shutdown (SIGTERM): it refuses new pods, closes every
// in-pod listener at once (HBONE included, whose connections get GOAWAY),
// so the kernel hands new connections to the instance sharing the ports,
// lets open connections run until they end or ctx ends, then closes them.
// Pods stay known, so a DelWorkload meanwhile still releases them. It
// reports whether every connection ended on its own.
func (p *Proxy) Drain(ctx context.Context) bool {
	p.StopAccepting()
	done := p.tracker.Drain(ctx)
	for _, pd := range p.podList() {
		if pd.hbone != nil {
			pd.hbone.Close()
		}
		if pd.dialer != nil {
			pd.dialer.Close()
		}
	}
	return done
}

// StopAccepting is Drain's first step (it may be taken earlier, to hand
// connections over before the drain): refuse new pods, close every in-pod
// listener. Idempotent.
func (p *Proxy) StopAccepting() {
	p.stopOnce.Do(func() {
		p.draining.Store(true)
		for _, pd := range p.podList() {
			p.stopListening(pd)
		}
	})
}

// Draining reports whether Drain has started.
func (p *Proxy) Draining() bool { return p.draining.Load() }

func (p *Proxy) podList() []*pod {
	p.mu.Lock()
	defer p.mu.Unlock()
	pods := make([]*pod, 0, len(p.pods))
	for _, pd := range p.pods {
		pods = append(pods, pd)
	}
	return pods
}

// stopListening closes the pod's listeners; open connections and tunnels
// keep running.
func (p *Proxy) stopListening(pd *pod) {
	for _, ln := range pd.lns {
		ln.Close()
	}
	pd.stopDNS()
	if pd.hbone != nil {
		pd.hbone.Drain()
	}
}

// revalidate closes connections the current policies no longer allow.
func (p *Proxy) revalidate() {
	n := p.tracker.Revalidate(func(dstUID string, c rbac.Conn) bool {
		w := p.cfg.State.WorkloadByUID(dstUID)
		if w == nil {
			return false
		}
		return p.router.Authorize(w, c).Allowed
	})
	if n > 0 {
		p.log.Info("closed connections no longer allowed by policy", "count", n)
	}
}

func (p *Proxy) nextID() uint64 { return p.ids.Add(1) }

// SnapshotReceived reports whether the node agent has sent its first full
// snapshot of captured pods (readiness waits for it).
func (p *Proxy) SnapshotReceived() bool { return p.snapshot.Load() }

func sameNamespace(a, b *os.File) bool {
	ia, errA := netnsutil.Inode(a)
	ib, errB := netnsutil.Inode(b)
	return errA == nil && errB == nil && ia == ib
}

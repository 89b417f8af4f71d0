package dnsproxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/go-logr/logr"
	"github.com/miekg/dns"

	"github.com/ambientmesh/ambient/proxylib/netnsutil"
)

// Config wires a Proxy. Services is required.
type Config struct {
	Services Services
	// ClusterDomain builds service hostnames (default cluster.local).
	ClusterDomain string
	// Upstreams (host:port) serve pods whose own resolvers are unknown:
	// ztunnel's resolv.conf by default (see ResolvConf).
	Upstreams []string
	// Timeout bounds one upstream exchange (default 2s); a query tries at
	// most MaxUpstreams resolvers.
	Timeout time.Duration
	// MaxInflight bounds one pod's queries waiting on upstreams (default
	// 128); beyond it the proxy answers SERVFAIL at once, so a pod flooding
	// its resolver costs ztunnel bounded sockets and goroutines.
	MaxInflight int
	Cache       *Cache // nil: NewCache(0, 0)
	Metrics     *Metrics
	Log         logr.Logger
}

// MaxUpstreams is how many resolvers a forwarded query tries, as glibc's
// MAXNS.
const MaxUpstreams = 3

// Proxy is the node's DNS proxy; ServePod serves it in one pod.
type Proxy struct {
	cfg   Config
	cache *Cache
	m     *Metrics
	log   logr.Logger
}

// New returns a Proxy.
func New(cfg Config) (*Proxy, error) {
	if cfg.Services == nil {
		return nil, errors.New("dnsproxy: Services is required")
	}
	if cfg.ClusterDomain == "" {
		cfg.ClusterDomain = "cluster.local"
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 2 * time.Second
	}
	if cfg.Cache == nil {
		cfg.Cache = NewCache(0, 0)
	}
	if cfg.MaxInflight <= 0 {
		cfg.MaxInflight = 128
	}
	if cfg.Metrics == nil {
		cfg.Metrics = NewMetrics(nil)
	}
	return &Proxy{cfg: cfg, cache: cfg.Cache, m: cfg.Metrics, log: cfg.Log}, nil
}

// ClusterDomain is the domain of service hostnames.
func (p *Proxy) ClusterDomain() string { return p.cfg.ClusterDomain }

// DefaultUpstreams serve pods whose own resolvers are unknown.
func (p *Proxy) DefaultUpstreams() []string { return append([]string(nil), p.cfg.Upstreams...) }

// Cache is the proxy's cache of forwarded answers.
func (p *Proxy) Cache() *Cache { return p.cache }

// Client is the captured pod a server answers.
type Client struct {
	// Name and Namespace of the pod; Namespace anchors short names.
	Name, Namespace string
	// Workload is the source_workload label (nil or "": unknown).
	Workload func() string
	// Upstreams returns the pod's own resolvers (host:port); nil or empty:
	// the proxy's Config.Upstreams.
	Upstreams func() []string
	// Dial opens a connection to an upstream ("udp" or "tcp"): from inside
	// the pod's namespace with ztunnel's mark in ztunnel. nil: this
	// process's namespace, unmarked (tests).
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
}

func (c Client) upstreams(def []string) []string {
	if c.Upstreams != nil {
		if u := c.Upstreams(); len(u) > 0 {
			return u
		}
	}
	return def
}

func (c Client) workload() string {
	if c.Workload != nil {
		if w := c.Workload(); w != "" {
			return w
		}
	}
	return "unknown"
}

func (c Client) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	if c.Dial != nil {
		return c.Dial(ctx, network, addr)
	}
	var d net.Dialer
	return d.DialContext(ctx, network, addr)
}

// Handler answers c's queries.
func (p *Proxy) Handler(c Client) dns.Handler {
	return &handler{p: p, c: c, inflight: make(chan struct{}, p.cfg.MaxInflight)}
}

type handler struct {
	p        *Proxy
	c        Client
	inflight chan struct{} // forwarded queries of this pod waiting on upstreams
}

// result is what happened to one query, for the metrics and the log.
type result struct {
	by       string
	upstream string
	err      error
}

// ServeDNS implements dns.Handler: one query, one answer.
func (h *handler) ServeDNS(w dns.ResponseWriter, req *dns.Msg) {
	start := time.Now()
	proto := "tcp"
	if _, ok := w.LocalAddr().(*net.UDPAddr); ok {
		proto = "udp"
	}
	ctx, cancel := context.WithTimeout(context.Background(), MaxUpstreams*h.p.cfg.Timeout+time.Second)
	defer cancel()
	resp, res := h.resolve(ctx, req, proto)
	if proto == "udp" {
		size := dns.MinMsgSize
		if opt := req.IsEdns0(); opt != nil && int(opt.UDPSize()) > size {
			size = int(opt.UDPSize())
		}
		// A TCP fallback answer may not fit the client's datagram: it gets
		// the truncated answer (TC set) and asks again over TCP.
		resp.Truncate(size)
	}
	// Counted before the answer leaves: whoever sees the answer (a test,
	// a scraping client right after) sees the count.
	qtype, rcode := queryType(req), rcodeName(resp)
	h.p.m.Requests.WithLabelValues(h.c.workload(), orUnknown(h.c.Namespace), qtype, rcode, res.by).Inc()
	if err := w.WriteMsg(resp); err != nil && res.err == nil {
		res.err = fmt.Errorf("write answer: %w", err)
	}
	h.record(req, resp, proto, res, time.Since(start))
}

func queryType(req *dns.Msg) string {
	if len(req.Question) > 0 {
		return typeName(req.Question[0].Qtype)
	}
	return "NONE"
}

func rcodeName(resp *dns.Msg) string {
	if rcode := dns.RcodeToString[resp.Rcode]; rcode != "" {
		return rcode
	}
	return strconv.Itoa(resp.Rcode)
}

func (h *handler) resolve(ctx context.Context, req *dns.Msg, proto string) (*dns.Msg, result) {
	if len(req.Question) != 1 {
		return reply(req, dns.RcodeFormatError), result{by: AnsweredLocal}
	}
	if req.Opcode != dns.OpcodeQuery {
		return reply(req, dns.RcodeNotImplemented), result{by: AnsweredLocal}
	}
	q := req.Question[0]
	if q.Qclass == dns.ClassINET && (q.Qtype == dns.TypeA || q.Qtype == dns.TypeAAAA) {
		if svc := lookup(h.p.cfg.Services, q.Name, h.c.Namespace, h.p.cfg.ClusterDomain); svc != nil {
			m := reply(req, dns.RcodeSuccess)
			m.Authoritative = true
			m.Answer = records(q.Name, q.Qtype, serviceAddrs(h.p.cfg.Services, svc))
			return m, result{by: AnsweredLocal}
		}
	}
	return h.forward(ctx, req, proto)
}

// reply is the proxy's own answer to req with rcode.
func reply(req *dns.Msg, rcode int) *dns.Msg {
	m := new(dns.Msg)
	m.SetRcode(req, rcode)
	m.RecursionAvailable = true
	m.Compress = true
	if opt := req.IsEdns0(); opt != nil {
		m.SetEdns0(max(opt.UDPSize(), dns.MinMsgSize), opt.Do())
	}
	return m
}

// forward asks the pod's resolvers (the cache first). The first resolver
// that answers decides, whatever its rcode: NXDOMAIN and SERVFAIL reach the
// client as the upstream sent them. Only when none answers does the proxy
// make a SERVFAIL itself.
func (h *handler) forward(ctx context.Context, req *dns.Msg, proto string) (*dns.Msg, result) {
	ups := h.c.upstreams(h.p.cfg.Upstreams)
	if len(ups) == 0 {
		h.p.m.UpstreamFailures.WithLabelValues(proto, "no_upstream").Inc()
		return reply(req, dns.RcodeServerFailure), result{by: AnsweredLocal, err: errors.New("no upstream resolver")}
	}
	key, cacheable := keyOf(ups, req)
	if cacheable {
		if m, ok := h.p.cache.Get(key); ok {
			// The client's id and question as it spelled it (0x20 case).
			m.Id, m.Question = req.Id, append([]dns.Question(nil), req.Question...)
			return m, result{by: AnsweredCache}
		}
	}
	select {
	case h.inflight <- struct{}{}:
		defer func() { <-h.inflight }()
	default:
		h.p.m.UpstreamFailures.WithLabelValues(proto, "overloaded").Inc()
		return reply(req, dns.RcodeServerFailure), result{by: AnsweredLocal,
			err: fmt.Errorf("%d queries of this pod already wait on upstreams", cap(h.inflight))}
	}
	var errs []error
	for _, up := range ups[:min(len(ups), MaxUpstreams)] {
		r, err := h.exchange(ctx, req, proto, up)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if r.Truncated && proto == "udp" {
			if full, err := h.exchange(ctx, req, "tcp", up); err == nil {
				r = full
			} else {
				errs = append(errs, err) // the truncated answer is still an answer
			}
		}
		if cacheable {
			h.p.cache.Put(key, r)
		}
		r.Id = req.Id
		return r, result{by: AnsweredUpstream, upstream: up, err: errors.Join(errs...)}
	}
	return reply(req, dns.RcodeServerFailure), result{by: AnsweredLocal, err: errors.Join(errs...)}
}

// exchange sends req to one upstream over network and reads its answer.
func (h *handler) exchange(ctx context.Context, req *dns.Msg, network, upstream string) (*dns.Msg, error) {
	h.p.m.UpstreamRequests.WithLabelValues(network).Inc()
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, h.p.cfg.Timeout)
	defer cancel()
	r, err := func() (*dns.Msg, error) {
		conn, err := h.c.dial(ctx, network, upstream)
		if err != nil {
			return nil, err
		}
		defer conn.Close()
		cl := &dns.Client{Net: network, Timeout: h.p.cfg.Timeout, UDPSize: dns.MaxMsgSize}
		r, _, err := cl.ExchangeWithConnContext(ctx, req.Copy(), &dns.Conn{Conn: conn})
		return r, err
	}()
	if err != nil {
		reason := "error"
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, context.DeadlineExceeded) {
			reason = "timeout"
		}
		h.p.m.UpstreamFailures.WithLabelValues(network, reason).Inc()
		return nil, fmt.Errorf("%s %s: %w", network, upstream, err)
	}
	h.p.m.UpstreamDuration.Observe(time.Since(start).Seconds())
	return r, nil
}

// record counts the query and writes its access-log line (debug; a query
// no upstream answered is logged at info).
func (h *handler) record(req, resp *dns.Msg, proto string, res result, dur time.Duration) {
	qtype, rcode, name := queryType(req), rcodeName(resp), ""
	if len(req.Question) > 0 {
		name = req.Question[0].Name
	}
	line := fmt.Sprintf("dns{pod=%s/%s}: query proto=%s id=%d name=%s type=%s rcode=%s answered_by=%s answers=%d truncated=%t dur=%s",
		h.c.Namespace, h.c.Name, proto, req.Id, name, qtype, rcode, res.by, len(resp.Answer), resp.Truncated, dur.Round(time.Microsecond))
	if res.upstream != "" {
		line += " upstream=" + res.upstream
	}
	if res.err != nil {
		line += fmt.Sprintf(" error=%q", res.err.Error())
	}
	if res.err != nil && res.by != AnsweredUpstream {
		h.p.log.Info(line)
		return
	}
	h.p.log.V(1).Info(line)
}

func typeName(t uint16) string {
	if s, ok := dns.TypeToString[t]; ok {
		return s
	}
	return "TYPE" + strconv.Itoa(int(t))
}

func orUnknown(s string) string {
	if s == "" {
		return "unknown"
	}
	return s
}

// PodServer is the proxy serving one pod: UDP and TCP on the pod's
// loopback (the redirection's REDIRECT sends locally generated packets to
// 127.0.0.1 / ::1).
type PodServer struct {
	servers []*dns.Server
}

// ListenHosts are the addresses the per-pod servers bind; an IPv6 one is
// skipped when the pod has no IPv6 loopback.
var ListenHosts = []string{"127.0.0.1", "::1"}

// ServePod serves c inside namespace ns (nil: this process's) on
// ListenHosts port port (0: Port) with the listeners' socket options.
func (p *Proxy) ServePod(ns *os.File, c Client, port int, opts netnsutil.SocketOptions) (*PodServer, error) {
	if port == 0 {
		port = Port
	}
	h := p.Handler(c)
	s := &PodServer{}
	for i, host := range ListenHosts {
		addr := net.JoinHostPort(host, strconv.Itoa(port))
		pc, err := netnsutil.ListenUDP(ns, addr, opts)
		if err != nil {
			if i > 0 && strings.Contains(host, ":") {
				continue // no IPv6 in the pod
			}
			s.Close()
			return nil, fmt.Errorf("dns: listen udp %s: %w", addr, err)
		}
		ln, err := netnsutil.ListenTCP(ns, addr, opts)
		if err != nil {
			pc.Close()
			s.Close()
			return nil, fmt.Errorf("dns: listen tcp %s: %w", addr, err)
		}
		for _, srv := range []*dns.Server{{PacketConn: pc, Handler: h}, {Listener: ln, Handler: h}} {
			started, failed := make(chan struct{}), make(chan error, 1)
			srv.NotifyStartedFunc = func() { close(started) }
			go func() {
				if err := srv.ActivateAndServe(); err != nil {
					failed <- err
					p.log.V(1).Info("dns server stopped", "pod", c.Namespace+"/"+c.Name, "err", err.Error())
				}
			}()
			select {
			case <-started:
				s.servers = append(s.servers, srv)
			case err := <-failed:
				s.Close()
				return nil, fmt.Errorf("dns: serve %s: %w", addr, err)
			}
		}
	}
	return s, nil
}

// Close stops the pod's servers.
func (s *PodServer) Close() error {
	var errs []error
	for _, srv := range s.servers {
		if err := srv.Shutdown(); err != nil {
			errs = append(errs, err)
		}
	}
	s.servers = nil
	return errors.Join(errs...)
}

// ResolvConf reads the nameservers of a resolv.conf as host:port.
func ResolvConf(path string) ([]string, error) {
	cc, err := dns.ClientConfigFromFile(path)
	if err != nil {
		return nil, err
	}
	out := make([]string, 0, len(cc.Servers))
	for _, s := range cc.Servers {
		out = append(out, net.JoinHostPort(s, cc.Port))
	}
	return out, nil
}

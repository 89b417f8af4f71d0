package waypoint

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/ambientmesh/ambient/proxylib/authz"
	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/identity"
	"github.com/ambientmesh/ambient/proxylib/l7"
	"github.com/ambientmesh/ambient/proxylib/lb"
	"github.com/ambientmesh/ambient/proxylib/proxyerr"
	"github.com/ambientmesh/ambient/proxylib/route"
	"github.com/ambientmesh/ambient/proxylib/telemetry"
)

// connInfo is one accepted tunnel: who is calling, what it addressed.
type connInfo struct {
	s      *Server
	peer   hbone.Request
	dst    destination
	srcIP  netip.Addr
	srcWL  *workloadapi.Workload
	source telemetry.Peer
	fwd    l7.Forwarding
	// plaintext: a sidecar's caller without mTLS (PERMISSIVE).
	plaintext bool
	// outbound: a sidecar's own pod is the caller (ServeOutbound).
	outbound bool
	mu       sync.Mutex
	snap     snapshot
	series   lastSeries // metrics of the connection's last label set
}

// snapshot is the L7 configuration and the policies bound to this tunnel's
// destination, refreshed when discovery changes.
type snapshot struct {
	cfg      *l7Config
	policies []*authz.Policy
}

// newConnInfo describes an accepted tunnel. Its peer (c.peer.Peer) is the
// caller that policy, routing, telemetry and forwarding headers see: the
// verified HBONE peer, or the caller a hair-pinning destination names.
func newConnInfo(s *Server, req *hbone.Request, dst destination) *connInfo {
	c := &connInfo{s: s, peer: *req, dst: dst}
	c.srcIP = s.clientAddr(req, dst)
	c.srcWL = s.cfg.State.WorkloadByAddr(c.srcIP)
	c.peer.Peer = s.caller(req, dst)
	caller := c.peer.Peer
	c.source = telemetry.PeerOf(c.srcWL, &caller)
	c.fwd = l7.Forwarding{ClientIP: c.srcIP, ProxyID: s.cfg.Identity.String()}
	if !caller.IsZero() {
		c.fwd.PeerID = caller.String()
	}
	c.current()
	return c
}

// isHairpin reports whether the peer is the destination itself, sending a
// connection that reached it without passing this waypoint.
func (s *Server) isHairpin(req *hbone.Request, dst destination) bool {
	// A sidecar's peer with its pod's identity is another replica, never
	// a hair-pin: its caller header is not believed.
	return !s.cfg.Sidecar && dst.workload != nil && s.workloadIdentity(dst.workload) == req.Peer
}

// caller is the identity the tunnel is authorized as. A hair-pinning
// destination's ztunnel authorized the real caller and names it in
// hbone.HeaderHairpinCaller; no (or no valid) name means a caller without
// identity, never the destination's own: that would let a plaintext client
// pass as the workload it calls. Any other peer's header is ignored.
func (s *Server) caller(req *hbone.Request, dst destination) identity.Identity {
	if !s.isHairpin(req, dst) {
		return req.Peer
	}
	id, err := identity.Parse(req.Header.Get(hbone.HeaderHairpinCaller))
	if err != nil {
		return identity.Identity{}
	}
	return id
}

// callerID names the caller in logs ("none" without identity).
func (c *connInfo) callerID() string {
	if c.peer.Peer.IsZero() {
		return "none"
	}
	return c.peer.Peer.String()
}

// clientAddr is the caller's address for policy (ipBlocks), forwarding
// headers and logs; never anything the HTTP client sent. The tunnel's own
// source is the client pod (its ztunnel dials from inside it). The peer's
// Forwarded for= may replace it only with what the peer knows first hand:
// an address of a workload with the peer's own identity, or any address
// when the peer is the destination itself, hair-pinning a direct caller to
// its waypoint. Any other claim about someone else's address is ignored,
// so one workload cannot borrow another's address to pass an ipBlocks rule.
func (s *Server) clientAddr(req *hbone.Request, dst destination) netip.Addr {
	peerAddr := req.PeerAddr.Addr().Unmap()
	src, err := hbone.ParseSource(req.Header)
	if err != nil || !src.Addr.IsValid() {
		return peerAddr
	}
	fwd := src.Addr.Unmap()
	if w := s.cfg.State.WorkloadByAddr(fwd); w != nil && s.workloadIdentity(w) == req.Peer {
		return fwd
	}
	if s.isHairpin(req, dst) {
		return fwd
	}
	return peerAddr
}

// refresh picks up a new L7 configuration for the next request on a
// long-lived connection (routes and policies change under it).
func (c *connInfo) current() snapshot {
	cfg := c.s.l7.Load()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.snap.cfg != cfg {
		c.snap = snapshot{cfg: cfg}
		if !c.outbound { // the destination enforces its own policies
			c.snap.policies = authz.Select(cfg.policies, c.s.policyTarget(c.dst, cfg.root))
		}
	}
	return c.snap
}

// authorize evaluates L4 or L7 policy for this tunnel's destination.
func (c *connInfo) authorize(snap snapshot, r *http.Request) authz.Decision {
	if c.outbound {
		return authz.Decision{Allowed: true}
	}
	if p, broken := snap.cfg.brokenFor(c.policyNamespace()); broken {
		return authz.Decision{Policy: p, Reason: "policy could not be decoded: failing closed"}
	}
	req := &authz.Request{
		Peer: c.peer.Peer, SourceIP: c.srcIP, RemoteIP: c.srcIP,
		DestIP: c.dst.target.Addr(), DestPort: c.dst.target.Port(),
	}
	if r != nil {
		req.HTTP, req.Method, req.Host, req.Header = true, r.Method, r.Host, r.Header
		req.Path = r.URL.Path
	}
	return authz.Evaluate(snap.policies, req)
}

func (c *connInfo) policyNamespace() string {
	if c.dst.ingress {
		return c.s.cfg.Namespace
	}
	if c.dst.service != nil {
		return c.dst.service.Namespace
	}
	return c.dst.workload.Namespace
}

// outcome is what happened to one request, for metrics and the access log.
type outcome struct {
	status   int
	flags    proxyerr.Reason
	backend  *workloadapi.Service
	endpoint *workloadapi.Workload
	route    string
	upstream string

	bodyInMemory bool // the request body arrived with its head (l7.BodyBuffered)
}

// ServeL7 handles one HTTP request: policy, routing, load balancing,
// forwarding with retries; it always returns a response.
func (c *connInfo) ServeL7(in *http.Request) *http.Response {
	start := time.Now()
	span, traced := l7.StartSpan(in.Header, c.s.cfg.Tracing)
	o := &outcome{bodyInMemory: l7.BodyBuffered(in.Body)}
	reqBody := &countingBody{r: in.Body}
	in.Body = reqBody
	resp := c.handle(c.current(), in, o)
	o.status = resp.StatusCode
	if rwc, ok := resp.Body.(io.ReadWriteCloser); ok && resp.StatusCode == http.StatusSwitchingProtocols {
		// An upgraded connection (WebSocket): the body is the raw stream and
		// must stay writable; the request is recorded when it ends.
		resp.Body = &upgradedBody{ReadWriteCloser: rwc, onClose: func() {
			c.record(in, o, start, reqBody.n, 0, "", nil)
		}}
		return resp
	}
	respBody := &countingBody{r: resp.Body}
	resp.Body = respBody
	respBody.onClose = func() {
		c.record(in, o, start, reqBody.n, respBody.n, resp.Header.Get("Grpc-Status"), resp.Trailer)
		if traced {
			c.s.log.Info("span", "trace_id", span.TraceID, "span_id", span.SpanID, "parent_id", span.Parent,
				"name", in.Method+" "+in.URL.Path, "duration_ms", time.Since(start).Milliseconds(), "status", o.status)
		}
	}
	return resp
}

func (c *connInfo) handle(snap snapshot, in *http.Request, o *outcome) *http.Response {
	if d := c.authorize(snap, in); !d.Allowed {
		o.flags = proxyerr.AuthorizationPolicyRejection
		c.s.log.Info("RBAC rejected request", "peer", c.callerID(), "method", in.Method, "path", in.URL.Path,
			"target", c.dst.target.String(), "policy", d.Policy, "reason", d.Reason)
		return textResponse(in, http.StatusForbidden, "RBAC: access denied")
	}
	if c.dst.workload != nil {
		o.endpoint = c.dst.workload
		return c.forward(in, o, nil, nil, func() (netip.AddrPort, func(lb.Outcome), bool) {
			return c.dst.target, func(lb.Outcome) {}, true
		})
	}
	lookup := c.serviceRoute
	if c.dst.ingress {
		lookup = c.ingressRoute
	}
	m, resp := lookup(snap, in, o)
	if resp != nil {
		return resp
	}
	o.route = m.Rule.Route
	if m.Rule.Invalid != "" {
		o.flags = "invalid_route"
		return textResponse(in, http.StatusInternalServerError, "route "+m.Rule.Route+": "+m.Rule.Invalid)
	}
	if m.IsRedirect() {
		code, loc := m.Redirect(in)
		resp := textResponse(in, code, "")
		resp.Header.Set("Location", loc)
		return resp
	}
	b, ok := m.Rule.PickBackend(nil)
	if !ok || b.Invalid != "" {
		o.flags = "invalid_backend"
		return textResponse(in, http.StatusInternalServerError, "no valid backend: "+b.Invalid)
	}
	bsvc := c.s.cfg.State.ServiceByKey(discovery.ServiceKey(b.Service.Namespace, c.s.ServiceHostname(b.Service.Namespace, b.Service.Name)))
	if bsvc == nil {
		o.flags = "backend_not_found"
		return textResponse(in, http.StatusInternalServerError, "backend service "+b.Service.String()+" not found")
	}
	o.backend = bsvc
	return c.forward(in, o, &m, &b, c.pickFrom(bsvc, b.Port, o))
}

// serviceRoute matches a request to the addressed Service against the
// routes attached to it. With none attached the request goes to the
// Service itself (the response is returned: the request is done); with
// routes of which none match, 404.
func (c *connInfo) serviceRoute(snap snapshot, in *http.Request, o *outcome) (route.Match, *http.Response) {
	svc := c.dst.service
	port := c.dst.target.Port()
	key := route.ServiceKey{Namespace: svc.Namespace, Name: svc.Name}
	m, ok := snap.cfg.routes.Lookup(key, port, c.peer.Peer.Namespace, in)
	if ok {
		return m, nil
	}
	if snap.cfg.routes.HasRoutesFor(key, port, c.peer.Peer.Namespace) {
		o.flags = "no_route"
		return m, textResponse(in, http.StatusNotFound, "no route matched")
	}
	o.backend = svc
	return m, c.forward(in, o, nil, nil, c.pickFrom(svc, port, o))
}

// pickFrom load-balances over a service's healthy endpoints. An ingress
// gateway sends to a Service with a waypoint through that waypoint only
// when the control plane says the Service wants it
// (istio.io/ingress-use-waypoint); otherwise it picks the endpoint itself.
func (c *connInfo) pickFrom(svc *workloadapi.Service, port uint16, o *outcome) func() (netip.AddrPort, func(lb.Outcome), bool) {
	if vip, ok := waypointTarget(svc, port); ok && c.dst.ingress && c.s.ingressUsesWaypoint(svc) {
		return func() (netip.AddrPort, func(lb.Outcome), bool) { return vip, func(lb.Outcome) {}, true }
	}
	return func() (netip.AddrPort, func(lb.Outcome), bool) {
		tiers, addrs := c.s.endpointsOf(svc, port, c.dst.target.Addr())
		k, done, ok := c.s.balancer(discovery.ServiceKey(svc.Namespace, svc.Hostname)).PickTiered(tiers)
		if !ok {
			return netip.AddrPort{}, nil, false
		}
		ep := addrs[k]
		o.endpoint = ep.w
		return ep.addr, done, true
	}
}

// maxReplayBody is the largest request body buffered so that it can be
// retried; larger bodies are sent once.
const maxReplayBody = 64 << 10

// forward sends the request to endpoints chosen by pick, retrying per the
// route's policy (connect failures and the listed status codes).
func (c *connInfo) forward(in *http.Request, o *outcome, m *route.Match, b *route.Backend,
	pick func() (netip.AddrPort, func(lb.Outcome), bool)) *http.Response {
	// No client address on the onward tunnel: pooled connections carry the
	// requests of many clients, so it would name the wrong one for most of
	// them. The app sees the waypoint's address (as in Istio) and each
	// request's own client in X-Forwarded-For.
	ctx := in.Context()
	var rule *route.Rule
	if m != nil {
		rule = m.Rule
	}
	var cancel context.CancelFunc = func() {}
	if rule != nil && rule.Timeout > 0 {
		ctx, cancel = context.WithTimeout(ctx, rule.Timeout)
	}
	attempts := 1
	var retry *route.Retry
	if rule != nil && rule.Retry != nil {
		retry = rule.Retry
		attempts += retry.Attempts
	}
	// The body is read into memory to replay it on retries, and when it is
	// there already (then the upstream request goes out in one write).
	var replay []byte
	if (attempts > 1 || o.bodyInMemory) && in.ContentLength != 0 {
		if in.ContentLength > 0 && in.ContentLength <= maxReplayBody {
			buf, err := io.ReadAll(io.LimitReader(in.Body, maxReplayBody+1))
			if err != nil {
				cancel()
				return textResponse(in, http.StatusBadRequest, "reading request body")
			}
			replay = buf
		} else {
			attempts = 1 // streaming body: cannot be replayed
		}
	}
	var lastErr error
	for try := 0; try < attempts; try++ {
		if try > 0 && retry != nil && retry.Backoff > 0 {
			select {
			case <-time.After(retry.Backoff << (try - 1)):
			case <-ctx.Done():
			}
		}
		if ctx.Err() != nil {
			break
		}
		ep, done, ok := pick()
		if !ok {
			cancel()
			o.flags = proxyerr.NoHealthyUpstream
			return textResponse(in, http.StatusServiceUnavailable, "no healthy upstream")
		}
		o.upstream = ep.String()
		tryCtx, tryCancel := ctx, context.CancelFunc(func() {})
		if rule != nil && rule.BackendTimeout > 0 {
			tryCtx, tryCancel = context.WithTimeout(ctx, rule.BackendTimeout)
		}
		out := l7.Outbound(withPickedEndpoint(tryCtx, o.endpoint), in, c.fwd)
		if replay != nil {
			out.Body = io.NopCloser(bytes.NewReader(replay))
			out.ContentLength = int64(len(replay))
		}
		if m != nil {
			m.ApplyRequest(out, *b)
		}
		resp, err := c.upstream().RoundTrip(out, ep, c.upstreamHTTP2(in))
		if err != nil {
			tryCancel()
			done(lb.ConnectFailure)
			lastErr = err
			c.s.log.V(1).Info("upstream attempt failed", "endpoint", ep.String(), "try", try, "err", err.Error())
			continue
		}
		if resp.StatusCode >= 500 {
			done(lb.ServerError)
		} else {
			done(lb.Success)
		}
		if try+1 < attempts && retry != nil && retry.Codes[resp.StatusCode] {
			io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
			resp.Body.Close()
			tryCancel()
			continue
		}
		if m != nil {
			m.ApplyResponse(resp.Header, *b)
		}
		if rwc, ok := resp.Body.(io.ReadWriteCloser); ok && resp.StatusCode == http.StatusSwitchingProtocols {
			resp.Body = &upgradedBody{ReadWriteCloser: rwc, onClose: func() { tryCancel(); cancel() }}
			return resp
		}
		resp.Body = &cancelOnClose{ReadCloser: resp.Body, cancel: func() { tryCancel(); cancel() }}
		return resp
	}
	cancel()
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		o.flags = "upstream_request_timeout"
		return textResponse(in, http.StatusGatewayTimeout, "upstream request timeout")
	}
	o.flags = proxyerr.ReasonOf(lastErr)
	if o.flags == proxyerr.ConnectionClosed {
		o.flags = proxyerr.UpstreamConnectFailed
	}
	return textResponse(in, http.StatusServiceUnavailable, "upstream connect error: "+errString(lastErr))
}

// upstreamHTTP2 says whether a request goes onward as HTTP/2. Inside the
// mesh the client's protocol is the app's (a client speaks h2c only to a
// server that does). At ingress the client's HTTP/2 is negotiated with the
// gateway (ALPN), not with the backend: only gRPC, which needs it, goes on
// as HTTP/2.
func (c *connInfo) upstreamHTTP2(in *http.Request) bool {
	if c.dst.ingress {
		return route.IsGRPC(in)
	}
	return in.ProtoMajor == 2
}

func errString(err error) string {
	if err == nil {
		return "unknown"
	}
	return err.Error()
}

// upgradedBody keeps an upgraded stream writable and runs onClose once.
type upgradedBody struct {
	io.ReadWriteCloser
	onClose func()
	once    sync.Once
}

func (u *upgradedBody) Close() error {
	err := u.ReadWriteCloser.Close()
	u.once.Do(u.onClose)
	return err
}

type cancelOnClose struct {
	io.ReadCloser
	cancel func()
}

func (c *cancelOnClose) Close() error {
	err := c.ReadCloser.Close()
	c.cancel()
	return err
}

// textResponse is a locally generated response; gRPC callers get the
// status as grpc-status too, so clients see an RPC error, not a broken
// stream.
func textResponse(in *http.Request, status int, msg string) *http.Response {
	h := http.Header{}
	if route.IsGRPC(in) {
		h.Set("Content-Type", "application/grpc")
		h.Set("Grpc-Status", grpcCode(status))
		h.Set("Grpc-Message", msg)
		return &http.Response{StatusCode: http.StatusOK, Header: h, Body: http.NoBody, ContentLength: 0, ProtoMajor: 2}
	}
	body := ""
	if msg != "" {
		body = msg + "\n"
		h.Set("Content-Type", "text/plain")
	}
	return &http.Response{StatusCode: status, Header: h, Body: io.NopCloser(strings.NewReader(body)), ContentLength: int64(len(body))}
}

// grpcCode maps an HTTP status to a gRPC status code (as Envoy does).
func grpcCode(status int) string {
	switch status {
	case http.StatusForbidden:
		return "7" // PERMISSION_DENIED
	case http.StatusNotFound:
		return "12" // UNIMPLEMENTED
	case http.StatusServiceUnavailable, http.StatusBadGateway:
		return "14" // UNAVAILABLE
	case http.StatusGatewayTimeout:
		return "4" // DEADLINE_EXCEEDED
	case http.StatusUnauthorized:
		return "16"
	}
	return "13" // INTERNAL
}

// countingBody counts bytes and runs onClose once at EOF or Close.
type countingBody struct {
	r       io.ReadCloser
	n       int64
	onClose func()
	done    bool
}

func (b *countingBody) Read(p []byte) (int, error) {
	if b.r == nil {
		return 0, io.EOF
	}
	n, err := b.r.Read(p)
	b.n += int64(n)
	return n, err
}

func (b *countingBody) Close() error {
	var err error
	if b.r != nil {
		err = b.r.Close()
	}
	if !b.done && b.onClose != nil {
		b.done = true
		b.onClose()
	}
	return err
}

func statusString(code int) string { return strconv.Itoa(code) }

package h2

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/go-logr/logr"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/ambientmesh/ambient/proxylib/hbone"
)

// DialerConfig configures a Dialer. Certs is required.
type DialerConfig struct {
	Certs hbone.CertSource
	// DialContext opens the TCP connection (e.g. from a pod's network
	// namespace with SO_MARK); net.Dialer when nil.
	DialContext func(ctx context.Context, network, addr string) (net.Conn, error)
	// MaxStreamsPerConn caps tunnels per connection; another connection is
	// opened when every pooled one is full. Default 100.
	MaxStreamsPerConn int
	// IdleConnTimeout closes pooled connections with no tunnels. Default 5m.
	IdleConnTimeout time.Duration
	// HandshakeTimeout bounds TCP connect + TLS. Default 10s.
	HandshakeTimeout time.Duration
	// StreamIdleTimeout resets a tunnel idle in both directions; 0 disables.
	StreamIdleTimeout time.Duration
	// PingInterval/PingTimeout detect dead connections. Defaults 30s/15s.
	PingInterval, PingTimeout time.Duration
	Tuning                    Tuning
	Log                       logr.Logger
}

// Dialer opens HBONE tunnels over pooled HTTP/2 connections.
type Dialer struct {
	cfg DialerConfig
	log logr.Logger

	mu      sync.Mutex
	pools   map[poolKey]*pool
	closed  bool
	janitor *time.Timer
}

var _ hbone.Dialer = (*Dialer)(nil)

// ErrDialerClosed is returned by Dial after Close.
var ErrDialerClosed = errors.New("hbone: dialer closed")

// poolKey: a connection is only shared by tunnels with the same source
// identity (its client certificate), the same accepted peer identities (what
// its handshake verified) and the same proxy address.
type poolKey struct {
	source   string
	expected string
	addr     netip.AddrPort
}

// pool is the set of connections for one key.
type pool struct {
	mu      sync.Mutex
	conns   []*clientConn
	dialing chan struct{} // non-nil while a connection is being opened
}

type clientConn struct {
	c     *conn
	local net.Addr
}

// NewDialer validates cfg.
func NewDialer(cfg DialerConfig) (*Dialer, error) {
	if cfg.Certs == nil {
		return nil, errors.New("hbone/h2: dialer needs a certificate source")
	}
	if cfg.MaxStreamsPerConn <= 0 {
		cfg.MaxStreamsPerConn = 100
	}
	if cfg.IdleConnTimeout <= 0 {
		cfg.IdleConnTimeout = 5 * time.Minute
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = 10 * time.Second
	}
	if cfg.PingInterval <= 0 {
		cfg.PingInterval = DefaultPingInterval
	}
	if cfg.PingTimeout <= 0 {
		cfg.PingTimeout = DefaultPingTimeout
	}
	if cfg.DialContext == nil {
		cfg.DialContext = (&net.Dialer{KeepAlive: 30 * time.Second}).DialContext
	}
	if cfg.Tuning.MaxReadFrameSize == 0 {
		cfg.Tuning.MaxReadFrameSize = DefaultDialerFrameSize
	}
	cfg.Tuning = cfg.Tuning.withDefaults()
	d := &Dialer{cfg: cfg, log: cfg.Log.WithName("hbone-dialer"), pools: map[poolKey]*pool{}}
	d.janitor = time.AfterFunc(cfg.IdleConnTimeout, d.prune)
	return d, nil
}

// prune drops closed connections and empty pools (connections close
// themselves after IdleConnTimeout without tunnels), then re-arms.
func (d *Dialer) prune() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return
	}
	for key, p := range d.pools {
		p.mu.Lock()
		p.takeLocked(0) // max 0: reserves nothing, only drops dead connections
		empty := len(p.conns) == 0 && p.dialing == nil
		p.mu.Unlock()
		if empty {
			delete(d.pools, key)
		}
	}
	d.janitor.Reset(d.cfg.IdleConnTimeout)
}

// Dial opens a tunnel to req.Target through the HBONE proxy at
// req.ProxyAddr, reusing a pooled connection when one has room.
func (d *Dialer) Dial(ctx context.Context, req hbone.DialRequest) (hbone.Stream, error) {
	if len(req.Expected) == 0 {
		return nil, hbone.ErrNoExpectedIdentity
	}
	if !req.Target.IsValid() || req.Target.Port() == 0 {
		return nil, fmt.Errorf("%w: %v", hbone.ErrBadAuthority, req.Target)
	}
	p, key, err := d.pool(req)
	if err != nil {
		return nil, err
	}
	for attempt := 0; ; attempt++ {
		c, err := d.reserve(ctx, p, key, req)
		if err != nil {
			return nil, err
		}
		st, err := d.roundTrip(ctx, c, req)
		if err == nil {
			return st, nil
		}
		// A connection that received GOAWAY (or died) before our stream
		// started is retried on another; anything else is final.
		if attempt < 2 && retryable(err) && ctx.Err() == nil {
			continue
		}
		return nil, err
	}
}

// retryable: the stream was refused before the peer processed it (GOAWAY,
// REFUSED_STREAM, or the connection died before an answer).
func retryable(err error) bool {
	return errors.Is(err, errGoAway) || errors.Is(err, errRefused) || errors.Is(err, errConnClosed)
}

func (d *Dialer) pool(req hbone.DialRequest) (*pool, poolKey, error) {
	exp := make([]string, len(req.Expected))
	for i, id := range req.Expected {
		exp[i] = id.String()
	}
	slices.Sort(exp)
	key := poolKey{source: req.Source.String(), expected: strings.Join(slices.Compact(exp), ","), addr: req.ProxyAddr}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil, key, ErrDialerClosed
	}
	p := d.pools[key]
	if p == nil {
		p = &pool{}
		d.pools[key] = p
	}
	return p, key, nil
}

// reserve returns a pooled connection with a reserved stream slot, opening
// a new connection when none has room (one dial per key at a time).
func (d *Dialer) reserve(ctx context.Context, p *pool, key poolKey, req hbone.DialRequest) (*clientConn, error) {
	for {
		p.mu.Lock()
		if c := p.takeLocked(d.cfg.MaxStreamsPerConn); c != nil {
			p.mu.Unlock()
			return c, nil
		}
		if wait := p.dialing; wait != nil {
			p.mu.Unlock()
			select {
			case <-wait:
				continue
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
		p.dialing = make(chan struct{})
		p.mu.Unlock()

		c, err := d.connect(ctx, req)
		p.mu.Lock()
		close(p.dialing)
		p.dialing = nil
		if err != nil {
			p.mu.Unlock()
			return nil, err
		}
		p.conns = append(p.conns, c)
		p.mu.Unlock()
	}
}

// takeLocked reserves a stream on the first usable connection and drops
// connections that closed or received GOAWAY (their streams finish on
// their own; the connection closes when the last one ends).
func (p *pool) takeLocked(max int) *clientConn {
	kept := p.conns[:0]
	var found *clientConn
	for _, cc := range p.conns {
		c := cc.c
		c.mu.Lock()
		usable := !c.closed && !c.goAwayRecv && !c.goAwaySent
		if usable && found == nil && len(c.streams)+c.reserved < min(max, int(c.peerMaxStreams)) {
			c.reserved++
			found = cc
		}
		c.mu.Unlock()
		if usable {
			kept = append(kept, cc)
		}
	}
	clear(p.conns[len(kept):])
	p.conns = kept
	return found
}

// connect opens and verifies one TLS connection and starts HTTP/2 on it.
func (d *Dialer) connect(ctx context.Context, req hbone.DialRequest) (*clientConn, error) {
	ctx, cancel := context.WithTimeout(ctx, d.cfg.HandshakeTimeout)
	defer cancel()
	raw, err := d.cfg.DialContext(ctx, "tcp", req.ProxyAddr.String())
	if err != nil {
		return nil, fmt.Errorf("hbone: connect %s: %w", req.ProxyAddr, err)
	}
	batch := newRecordBatcher(raw)
	tc := tls.Client(batch, hbone.ClientTLSConfig(d.cfg.Certs, req.Source, req.Expected, "h2"))
	if err := tc.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, fmt.Errorf("hbone: TLS handshake with %s: %w", req.ProxyAddr, err)
	}
	if p := tc.ConnectionState().NegotiatedProtocol; p != "h2" {
		tc.Close()
		return nil, fmt.Errorf("hbone: %s negotiated ALPN %q, want h2", req.ProxyAddr, p)
	}
	limits := Limits{MaxHeaderListSize: DefaultMaxHeaderListSize}
	c := newConn(raw, newBatchedTLS(tc, batch), false, d.cfg.Tuning, limits)
	c.idleTimeout = d.cfg.IdleConnTimeout
	if err := c.start(); err != nil {
		raw.Close()
		return nil, fmt.Errorf("hbone: HTTP/2 with %s: %w", req.ProxyAddr, err)
	}
	go c.serve()
	c.keepalive(d.cfg.PingInterval, d.cfg.PingTimeout)
	d.log.V(1).Info("connection opened", "proxy", req.ProxyAddr.String(), "source", req.Source.String())
	return &clientConn{c: c, local: tc.LocalAddr()}, nil
}

// roundTrip sends CONNECT on a reserved slot of cc and waits for 200. ctx
// bounds only the wait for the response; the tunnel lives until Close.
func (d *Dialer) roundTrip(ctx context.Context, cc *clientConn, req hbone.DialRequest) (hbone.Stream, error) {
	c := cc.c
	authority := req.Target.String()
	t := newTunnel(c, 0)
	t.response = make(chan responseResult, 1)
	t.local = cc.local
	t.remote = tunnelAddr(authority)
	t.idle = newIdleWatch(d.cfg.StreamIdleTimeout, func() { t.abort(http2.ErrCodeCancel, ErrStreamIdle, true) })
	fields := make([]hpack.HeaderField, 0, 2+len(req.Header))
	fields = append(fields,
		hpack.HeaderField{Name: ":method", Value: http.MethodConnect},
		hpack.HeaderField{Name: ":authority", Value: authority})
	for k, vs := range req.Header {
		name := strings.ToLower(k)
		for _, v := range vs {
			fields = append(fields, hpack.HeaderField{Name: name, Value: v})
		}
	}
	c.mu.Lock()
	maxFrame := c.peerMaxFrame
	c.mu.Unlock()
	opened, reserved := false, true
	_, err := c.w.headers(func() uint32 {
		// Under the writer lock: ids go on the wire in the order allocated.
		c.mu.Lock()
		defer c.mu.Unlock()
		c.reserved--
		reserved = false
		if c.closed {
			return 0
		}
		t.id = c.nextID
		c.nextID += 2
		t.sendWindow = int64(c.peerInitialWindow)
		c.addLocked(t)
		opened = true
		return t.id
	}, fields, false, maxFrame)
	if reserved { // the writer failed before the stream got an id
		c.mu.Lock()
		c.reserved--
		c.mu.Unlock()
	}
	if !opened {
		t.idle.stop()
		return nil, fmt.Errorf("hbone: CONNECT %s via %s: %w", authority, req.ProxyAddr, errConnClosed)
	}
	if err != nil {
		t.abort(http2.ErrCodeCancel, err, false)
		return nil, fmt.Errorf("hbone: CONNECT %s via %s: %w", authority, req.ProxyAddr, errConnClosed)
	}
	var res responseResult
	select {
	case res = <-t.response:
	case <-ctx.Done():
		t.Close()
		return nil, fmt.Errorf("hbone: CONNECT %s via %s: %w", authority, req.ProxyAddr, ctx.Err())
	}
	if res.err != nil {
		t.Close()
		return nil, fmt.Errorf("hbone: CONNECT %s via %s: %w", authority, req.ProxyAddr, res.err)
	}
	if res.status != http.StatusOK {
		t.Close()
		return nil, fmt.Errorf("hbone: CONNECT %s via %s: %w", authority, req.ProxyAddr, &hbone.RejectedError{Status: res.status})
	}
	t.respHeader = res.header
	return t, nil
}

// Close drains the pool: new dials fail, each connection is shut down
// gracefully once its tunnels end. It does not wait.
func (d *Dialer) Close() error {
	d.mu.Lock()
	d.closed = true
	d.janitor.Stop()
	pools := d.pools
	d.pools = map[poolKey]*pool{}
	d.mu.Unlock()
	for _, p := range pools {
		p.mu.Lock()
		for _, cc := range p.conns {
			cc.c.goAway(http2.ErrCodeNo)
		}
		p.conns = nil
		p.mu.Unlock()
	}
	return nil
}

// Stats reports pooled connections and open tunnels, for admin endpoints
// and tests.
type Stats struct {
	Conns, Streams int
}

// Stats counts usable pooled connections and our tunnels on them.
func (d *Dialer) Stats() Stats {
	d.mu.Lock()
	pools := make([]*pool, 0, len(d.pools))
	for _, p := range d.pools {
		pools = append(pools, p)
	}
	d.mu.Unlock()
	var s Stats
	for _, p := range pools {
		p.mu.Lock()
		for _, cc := range p.conns {
			c := cc.c
			c.mu.Lock()
			if !c.closed && !c.goAwayRecv && !c.goAwaySent {
				s.Conns++
				s.Streams += len(c.streams)
			}
			c.mu.Unlock()
		}
		p.mu.Unlock()
	}
	return s
}

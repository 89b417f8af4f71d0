package h2

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
	"golang.org/x/net/http2"

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
	cfg       DialerConfig
	transport *http2.Transport
	log       logr.Logger

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
	cc     *http2.ClientConn
	tls    *tls.Conn
	batch  *recordBatcher
	active atomic.Int32 // our tunnels on it (capped by MaxStreamsPerConn)
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
	// Windows live in net/http's HTTP2Config, reached through the HTTP/1
	// transport that ConfigureTransports links to the HTTP/2 one.
	t1 := &http.Transport{HTTP2: &http.HTTP2Config{
		MaxReceiveBufferPerConnection: int(cfg.Tuning.ConnWindow),
		MaxReceiveBufferPerStream:     int(cfg.Tuning.StreamWindow),
		MaxReadFrameSize:              int(cfg.Tuning.MaxReadFrameSize),
	}}
	t2, err := http2.ConfigureTransports(t1)
	if err != nil {
		return nil, err
	}
	t2.MaxReadFrameSize = cfg.Tuning.MaxReadFrameSize
	t2.MaxHeaderListSize = DefaultMaxHeaderListSize
	t2.IdleConnTimeout = cfg.IdleConnTimeout
	t2.ReadIdleTimeout = cfg.PingInterval
	t2.PingTimeout = cfg.PingTimeout
	t2.StrictMaxConcurrentStreams = true
	d := &Dialer{cfg: cfg, transport: t2, log: cfg.Log.WithName("hbone-dialer"), pools: map[poolKey]*pool{}}
	d.janitor = time.AfterFunc(cfg.IdleConnTimeout, d.prune)
	return d, nil
}

// prune drops closed connections and empty pools (x/net closes idle
// connections itself after IdleConnTimeout), then re-arms.
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

func retryable(err error) bool {
	if errors.Is(err, http2.ErrNoCachedConn) {
		return true
	}
	// x/net has no typed errors for these; its messages are matched.
	msg := err.Error()
	return strings.Contains(msg, "GOAWAY") || strings.Contains(msg, "client connection lost") ||
		strings.Contains(msg, "client conn not usable") || strings.Contains(msg, "connection not usable") ||
		strings.Contains(msg, "REFUSED_STREAM")
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
// their own; x/net closes them when the last one ends).
func (p *pool) takeLocked(max int) *clientConn {
	kept := p.conns[:0]
	var found *clientConn
	for _, c := range p.conns {
		st := c.cc.State()
		if st.Closed || st.Closing || !c.cc.CanTakeNewRequest() {
			continue
		}
		kept = append(kept, c)
		if found == nil && int(c.active.Load()) < max {
			if c.cc.ReserveNewRequest() {
				c.active.Add(1)
				found = c
			}
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
	cc, err := d.transport.NewClientConn(newBatchedTLS(tc, batch))
	if err != nil {
		tc.Close()
		return nil, fmt.Errorf("hbone: HTTP/2 with %s: %w", req.ProxyAddr, err)
	}
	d.log.V(1).Info("connection opened", "proxy", req.ProxyAddr.String(), "source", req.Source.String())
	return &clientConn{cc: cc, tls: tc, batch: batch}, nil
}

// roundTrip sends CONNECT on a reserved slot of c and waits for 200. ctx
// bounds only the wait for the response; the tunnel lives until Close.
func (d *Dialer) roundTrip(ctx context.Context, c *clientConn, req hbone.DialRequest) (hbone.Stream, error) {
	var released atomic.Bool
	release := func() {
		if released.CompareAndSwap(false, true) {
			c.active.Add(-1)
		}
	}
	streamCtx, cancel := context.WithCancel(context.Background())
	stop := context.AfterFunc(ctx, cancel)
	pw := newBodyPipe()
	if holdFrames {
		pw.more = c.batch.moreFollows
	}
	authority := req.Target.String()
	hr := &http.Request{
		Method:        http.MethodConnect,
		URL:           &url.URL{Host: authority},
		Host:          authority,
		Header:        req.Header.Clone(),
		Body:          bodyReader{pw},
		ContentLength: -1,
		Proto:         "HTTP/2.0",
		ProtoMajor:    2,
	}
	if hr.Header == nil {
		hr.Header = http.Header{}
	}
	resp, err := c.cc.RoundTrip(hr.WithContext(streamCtx))
	stopped := stop()
	if err != nil || !stopped {
		cancel()
		pw.Close()
		release()
		if err == nil {
			resp.Body.Close()
			err = ctx.Err()
		}
		return nil, fmt.Errorf("hbone: CONNECT %s via %s: %w", authority, req.ProxyAddr, err)
	}
	if resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		cancel()
		pw.Close()
		release()
		return nil, fmt.Errorf("hbone: CONNECT %s via %s: %w", authority, req.ProxyAddr, &hbone.RejectedError{Status: resp.StatusCode})
	}
	st := &clientStream{
		body:    resp.Body,
		pw:      pw,
		cancel:  cancel,
		release: release,
		local:   c.tls.LocalAddr(),
		remote:  tunnelAddr(authority),
	}
	st.idle = newIdleWatch(d.cfg.StreamIdleTimeout, func() { st.Close() })
	return st, nil
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
		for _, c := range p.conns {
			go c.cc.Shutdown(context.Background())
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
		for _, c := range p.conns {
			if st := c.cc.State(); !st.Closed && !st.Closing {
				s.Conns++
				s.Streams += int(c.active.Load())
			}
		}
		p.mu.Unlock()
	}
	return s
}

package h3

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/go-logr/logr"
	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"github.com/ambientmesh/ambient/proxylib/hbone"
)

// Dialer defaults; zero fields in DialerConfig take these.
const (
	DefaultMaxStreamsPerConn = 100
	DefaultPoolIdleTimeout   = 30 * time.Second
	DefaultKeepAlive         = 15 * time.Second
)

// DialerConfig configures a pooling HBONE-over-HTTP/3 dialer.
type DialerConfig struct {
	Certs hbone.CertSource
	Log   logr.Logger
	// MaxStreamsPerConn caps tunnels per pooled QUIC connection; beyond it a
	// new connection is opened.
	MaxStreamsPerConn int
	// HandshakeTimeout bounds the QUIC+TLS handshake; the fallback dialer keeps
	// it short so a peer without QUIC is detected quickly.
	HandshakeTimeout time.Duration
	// PoolIdleTimeout evicts a connection that has carried no tunnel this long.
	PoolIdleTimeout time.Duration
	// IdleTimeout is the QUIC idle timeout; KeepAlive pings keep pooled
	// connections with idle tunnels alive.
	IdleTimeout time.Duration
	KeepAlive   time.Duration
	// ListenPacket opens the dialer's UDP socket (e.g. inside a pod's network
	// namespace, with SO_MARK); an unbound socket on all addresses when nil.
	ListenPacket func() (*net.UDPConn, error)
}

// Dialer opens HBONE tunnels over HTTP/3, pooling QUIC connections per
// (source identity, expected identities, proxy address).
type Dialer struct {
	cfg DialerConfig
	udp *net.UDPConn
	tr  *quic.Transport
	h3  *http3.Transport

	mu     sync.Mutex
	pools  map[string]*pool
	live   int // open QUIC connections, pooled or draining
	closed bool
}

var _ hbone.Dialer = (*Dialer)(nil)

// ErrDialerClosed is returned by Dial after Close.
var ErrDialerClosed = errors.New("h3: dialer closed")

// NewDialer opens the dialer's UDP socket (one for all connections).
func NewDialer(cfg DialerConfig) (*Dialer, error) {
	if cfg.Certs == nil {
		return nil, errors.New("h3: dialer needs Certs")
	}
	if cfg.MaxStreamsPerConn <= 0 {
		cfg.MaxStreamsPerConn = DefaultMaxStreamsPerConn
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if cfg.PoolIdleTimeout <= 0 {
		cfg.PoolIdleTimeout = DefaultPoolIdleTimeout
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = DefaultIdleTimeout
	}
	if cfg.KeepAlive <= 0 {
		cfg.KeepAlive = DefaultKeepAlive
	}
	var udp *net.UDPConn
	var err error
	if cfg.ListenPacket != nil {
		if udp, err = cfg.ListenPacket(); err == nil {
			tuneUDP(cfg.Log, udp)
		}
	} else {
		udp, err = listenUDP(cfg.Log, ":0")
	}
	if err != nil {
		return nil, fmt.Errorf("h3: dialer socket: %w", err)
	}
	return &Dialer{
		cfg:   cfg,
		udp:   udp,
		tr:    &quic.Transport{Conn: udp},
		h3:    &http3.Transport{MaxResponseHeaderBytes: maxHeaderBytes, DisableCompression: true},
		pools: map[string]*pool{},
	}, nil
}

// Dial opens a tunnel to req.Target through the HBONE proxy at req.ProxyAddr.
func (d *Dialer) Dial(ctx context.Context, req hbone.DialRequest) (hbone.Stream, error) {
	if len(req.Expected) == 0 {
		return nil, hbone.ErrNoExpectedIdentity
	}
	if req.Source.IsZero() || !req.ProxyAddr.IsValid() || !req.Target.IsValid() {
		return nil, errors.New("h3: dial request needs Source, ProxyAddr and Target")
	}
	p, err := d.pool(req)
	if err != nil {
		return nil, err
	}
	// A connection may turn out unusable (GOAWAY, closed) only when the
	// stream is opened; then the next connection is tried.
	for attempt := 0; ; attempt++ {
		c, err := p.get(ctx, d)
		if err != nil {
			return nil, err
		}
		rs, err := c.cc.OpenRequestStream(ctx)
		if err != nil {
			c.markDraining()
			c.release()
			if attempt < 2 && ctx.Err() == nil {
				continue
			}
			return nil, fmt.Errorf("h3: opening stream to %s: %w", req.ProxyAddr, err)
		}
		return d.connect(ctx, c, rs, req)
	}
}

// connect sends the CONNECT request and waits for the answer.
func (d *Dialer) connect(ctx context.Context, c *conn, rs *http3.RequestStream, req hbone.DialRequest) (hbone.Stream, error) {
	fail := func(err error) (hbone.Stream, error) {
		rs.CancelWrite(errCodeReset)
		rs.CancelRead(errCodeReset)
		c.release()
		return nil, err
	}
	stop := context.AfterFunc(ctx, func() { rs.CancelRead(errCodeReset); rs.CancelWrite(errCodeReset) })
	defer stop()
	authority := req.Target.String()
	hreq := &http.Request{
		Method: http.MethodConnect,
		Host:   authority,
		URL:    &url.URL{Host: authority},
		Header: req.Header.Clone(),
	}
	if hreq.Header == nil {
		hreq.Header = http.Header{}
	}
	if err := rs.SendRequestHeader(hreq); err != nil {
		return fail(fmt.Errorf("h3: sending CONNECT to %s: %w", req.ProxyAddr, err))
	}
	resp, err := rs.ReadResponse()
	if err != nil {
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		return fail(fmt.Errorf("h3: CONNECT %s via %s: %w", authority, req.ProxyAddr, err))
	}
	if resp.StatusCode != http.StatusOK {
		return fail(&hbone.RejectedError{Status: resp.StatusCode})
	}
	return newStream(rs, c.qc.LocalAddr(), c.qc.RemoteAddr(), c.release), nil
}

// Close stops new tunnels; pooled connections close once their tunnels end.
func (d *Dialer) Close() error {
	d.mu.Lock()
	d.closed = true
	pools := make([]*pool, 0, len(d.pools))
	for _, p := range d.pools {
		pools = append(pools, p)
	}
	d.mu.Unlock()
	for _, p := range pools {
		p.drain()
	}
	d.maybeCloseTransport()
	return nil
}

func (d *Dialer) maybeCloseTransport() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.closed || d.tr == nil {
		return
	}
	if d.live > 0 {
		return
	}
	d.tr.Close()
	d.udp.Close()
	d.tr = nil
}

func (d *Dialer) pool(req hbone.DialRequest) (*pool, error) {
	key := poolKey(req)
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil, ErrDialerClosed
	}
	p := d.pools[key]
	if p == nil {
		p = &pool{req: req}
		d.pools[key] = p
	}
	return p, nil
}

func poolKey(req hbone.DialRequest) string {
	ids := make([]string, len(req.Expected))
	for i, id := range req.Expected {
		ids[i] = id.String()
	}
	slices.Sort(ids)
	return req.Source.String() + "|" + strings.Join(slices.Compact(ids), ",") + "|" + req.ProxyAddr.String()
}

func (d *Dialer) quicConfig() *quic.Config {
	return &quic.Config{
		HandshakeIdleTimeout:  d.cfg.HandshakeTimeout,
		MaxIdleTimeout:        d.cfg.IdleTimeout,
		KeepAlivePeriod:       d.cfg.KeepAlive,
		MaxIncomingStreams:    -1, // servers never open streams towards us
		MaxIncomingUniStreams: 8,
	}
}

// pool holds the connections for one key.
type pool struct {
	req hbone.DialRequest

	mu      sync.Mutex
	conns   []*conn
	dialing chan struct{} // closed when the dial in progress ends
	closed  bool
}

func (p *pool) size() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.conns)
}

// get returns a connection with a reserved stream slot, dialing a new one
// when every pooled connection is full. Only one dial per key runs at a time.
func (p *pool) get(ctx context.Context, d *Dialer) (*conn, error) {
	for {
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			return nil, ErrDialerClosed
		}
		for _, c := range p.conns {
			if c.reserve(d.cfg.MaxStreamsPerConn) {
				p.mu.Unlock()
				return c, nil
			}
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
		done := make(chan struct{})
		p.dialing = done
		p.mu.Unlock()

		c, err := p.dial(ctx, d)
		p.mu.Lock()
		p.dialing = nil
		close(done)
		if err != nil {
			p.mu.Unlock()
			return nil, err
		}
		c.reserve(d.cfg.MaxStreamsPerConn)
		p.conns = append(p.conns, c)
		p.mu.Unlock()
		return c, nil
	}
}

func (p *pool) dial(ctx context.Context, d *Dialer) (*conn, error) {
	tlsConf := hbone.ClientTLSConfig(d.cfg.Certs, p.req.Source, p.req.Expected, "h3")
	d.mu.Lock()
	tr := d.tr
	d.live++
	d.mu.Unlock()
	done := func() {
		d.mu.Lock()
		d.live--
		d.mu.Unlock()
		d.maybeCloseTransport()
	}
	if tr == nil {
		done()
		return nil, ErrDialerClosed
	}
	qc, err := tr.Dial(ctx, net.UDPAddrFromAddrPort(p.req.ProxyAddr), tlsConf, d.quicConfig())
	if err != nil {
		done()
		return nil, fmt.Errorf("h3: QUIC handshake with %s: %w", p.req.ProxyAddr, err)
	}
	c := &conn{qc: qc, cc: d.h3.NewClientConn(qc), pool: p, idle: d.cfg.PoolIdleTimeout}
	go func() {
		<-qc.Context().Done()
		p.remove(c)
		done()
	}()
	return c, nil
}

func (p *pool) remove(c *conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.conns = slices.DeleteFunc(p.conns, func(x *conn) bool { return x == c })
}

func (p *pool) drain() {
	p.mu.Lock()
	p.closed = true
	conns := slices.Clone(p.conns)
	p.mu.Unlock()
	for _, c := range conns {
		c.markDraining()
		c.closeIfIdle()
	}
}

// conn is one pooled QUIC connection.
type conn struct {
	qc   *quic.Conn
	cc   *http3.ClientConn
	pool *pool
	idle time.Duration

	mu       sync.Mutex
	active   int
	draining bool
	timer    *time.Timer
}

func (c *conn) reserve(max int) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.draining || c.active >= max || c.qc.Context().Err() != nil {
		return false
	}
	c.active++
	if c.timer != nil {
		c.timer.Stop()
		c.timer = nil
	}
	return true
}

func (c *conn) release() {
	c.mu.Lock()
	c.active--
	idle := c.active == 0
	draining := c.draining
	if idle && !draining {
		c.timer = time.AfterFunc(c.idle, c.closeIfIdle)
	}
	c.mu.Unlock()
	if idle && draining {
		c.closeIfIdle()
	}
}

func (c *conn) markDraining() {
	c.mu.Lock()
	c.draining = true
	c.mu.Unlock()
	c.pool.remove(c)
}

// closeIfIdle closes the connection when no tunnel uses it.
func (c *conn) closeIfIdle() {
	c.mu.Lock()
	if c.active > 0 {
		c.mu.Unlock()
		return
	}
	c.draining = true
	c.mu.Unlock()
	c.pool.remove(c)
	c.qc.CloseWithError(quic.ApplicationErrorCode(http3.ErrCodeNoError), "idle")
}

// connCount reports pooled (usable) connections; for tests and metrics.
func (d *Dialer) connCount() int {
	d.mu.Lock()
	pools := make([]*pool, 0, len(d.pools))
	for _, p := range d.pools {
		pools = append(pools, p)
	}
	d.mu.Unlock()
	n := 0
	for _, p := range pools {
		n += p.size()
	}
	return n
}

func (d *Dialer) poolCount() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.pools)
}

func (d *Dialer) liveConns() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.live
}

func (d *Dialer) activeStreams() int {
	d.mu.Lock()
	pools := make([]*pool, 0, len(d.pools))
	for _, p := range d.pools {
		pools = append(pools, p)
	}
	d.mu.Unlock()
	n := 0
	for _, p := range pools {
		p.mu.Lock()
		for _, c := range p.conns {
			c.mu.Lock()
			n += c.active
			c.mu.Unlock()
		}
		p.mu.Unlock()
	}
	return n
}

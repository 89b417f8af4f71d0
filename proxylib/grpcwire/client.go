// Package grpcwire is the proxies' gRPC client: the gRPC-over-HTTP/2 wire
// protocol (grpc/grpc's PROTOCOL-HTTP2.md) — length-prefixed protobuf
// messages, grpc-timeout, metadata, and the status in trailers — on
// golang.org/x/net/http2's Transport, unary and bidirectional streaming.
//
// The proxies linked grpc-go only to be clients of the control plane (delta
// ADS, the CA) and of apps' health services; grpc-go's runtime (balancers,
// resolvers, channelz, its init work) is most of what an idle ztunnel keeps
// resident. No compression is negotiated, so every message is plain.
package grpcwire

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"sync"
	"time"

	"golang.org/x/net/http2"
	"google.golang.org/protobuf/proto"
)

// DefaultMaxRecvMsgSize bounds a received message, as grpc-go's default.
const DefaultMaxRecvMsgSize = 4 << 20

// Config configures a Conn.
type Config struct {
	// Address of the server, host:port; also the :authority.
	Address string
	// TLS verifies the server. Its ServerName defaults to Address's host;
	// the connection must negotiate ALPN h2.
	TLS *tls.Config
	// Plaintext allows a connection without TLS (h2c with prior knowledge,
	// for apps' health probes on loopback); it must be asked for.
	Plaintext bool
	// Dial opens the transport connection (default: a net.Dialer).
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// Metadata returns per-RPC headers (the bearer token); an error fails
	// the RPC with Unavailable, as grpc-go does for its per-RPC credentials.
	Metadata func(ctx context.Context) (map[string]string, error)
	// KeepaliveTime pings a connection that received nothing for that
	// long; KeepaliveTimeout closes it when the ping goes unanswered.
	// Zero: no pings.
	KeepaliveTime, KeepaliveTimeout time.Duration
	// ConnectTimeout bounds dial and TLS handshake (default 20s, grpc-go's).
	ConnectTimeout time.Duration
	// MaxRecvMsgSize bounds a received message (default 4 MiB).
	MaxRecvMsgSize int
}

// Bearer is Metadata sending token's result as a bearer token (read per
// RPC: projected tokens rotate).
func Bearer(token func() (string, error)) func(context.Context) (map[string]string, error) {
	return func(context.Context) (map[string]string, error) {
		tok, err := token()
		if err != nil {
			return nil, fmt.Errorf("reading token: %w", err)
		}
		return map[string]string{"authorization": "Bearer " + tok}, nil
	}
}

// Conn is a client of one server. Its HTTP/2 connection is dialled on first
// use and again after it breaks; RPCs share it.
type Conn struct {
	cfg    Config
	scheme string
	tr     *http2.Transport

	mu     sync.Mutex
	closed bool
	conns  map[*trackedConn]struct{}
}

// New validates cfg; it does not dial.
func New(cfg Config) (*Conn, error) {
	if cfg.Address == "" {
		return nil, errors.New("grpcwire: Address is required")
	}
	if cfg.TLS == nil && !cfg.Plaintext {
		return nil, errors.New("grpcwire: TLS config is required")
	}
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = 20 * time.Second
	}
	if cfg.MaxRecvMsgSize <= 0 {
		cfg.MaxRecvMsgSize = DefaultMaxRecvMsgSize
	}
	if cfg.Dial == nil {
		var d net.Dialer
		cfg.Dial = d.DialContext
	}
	c := &Conn{cfg: cfg, scheme: "https", conns: map[*trackedConn]struct{}{}}
	if cfg.Plaintext {
		c.scheme = "http"
	}
	c.tr = &http2.Transport{
		AllowHTTP:          cfg.Plaintext,
		DisableCompression: true,
		ReadIdleTimeout:    cfg.KeepaliveTime,
		PingTimeout:        cfg.KeepaliveTimeout,
		DialTLSContext:     c.dial,
	}
	return c, nil
}

// dial connects, bounded by ConnectTimeout, and (unless Plaintext) does
// the TLS handshake with the caller's config, which verifies the server.
// A failure is Unavailable (as grpc-go's), unless the caller's own
// deadline ran out.
func (c *Conn) dial(ctx context.Context, network, addr string, _ *tls.Config) (net.Conn, error) {
	conn, err := c.connect(ctx, network, addr)
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, errorf(Unavailable, "connecting to %s: %v", addr, err)
	}
	return c.track(conn)
}

func (c *Conn) connect(ctx context.Context, network, addr string) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, c.cfg.ConnectTimeout)
	defer cancel()
	raw, err := c.cfg.Dial(ctx, network, addr)
	if err != nil || c.cfg.Plaintext {
		return raw, err
	}
	conn, err := c.handshake(ctx, raw)
	if err != nil {
		_ = raw.Close()
		return nil, err
	}
	return conn, nil
}

func (c *Conn) handshake(ctx context.Context, raw net.Conn) (net.Conn, error) {
	cfg := c.cfg.TLS.Clone()
	cfg.NextProtos = []string{http2.NextProtoTLS}
	if cfg.ServerName == "" {
		host, _, err := net.SplitHostPort(c.cfg.Address)
		if err != nil {
			return nil, err
		}
		cfg.ServerName = host
	}
	tc := tls.Client(raw, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		return nil, err
	}
	if p := tc.ConnectionState().NegotiatedProtocol; p != http2.NextProtoTLS {
		return nil, fmt.Errorf("server negotiated ALPN %q, want %q", p, http2.NextProtoTLS)
	}
	return tc, nil
}

// trackedConn lets Close shut connections with RPCs still on them (the
// Transport only closes idle ones).
type trackedConn struct {
	net.Conn
	c    *Conn
	once sync.Once
}

func (t *trackedConn) Close() error {
	t.once.Do(func() {
		t.c.mu.Lock()
		delete(t.c.conns, t)
		t.c.mu.Unlock()
	})
	return t.Conn.Close()
}

func (c *Conn) track(conn net.Conn) (net.Conn, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		_ = conn.Close()
		return nil, errors.New("grpcwire: connection closed")
	}
	t := &trackedConn{Conn: conn, c: c}
	c.conns[t] = struct{}{}
	return t, nil
}

// Close closes the connection; RPCs on it fail, new ones fail to dial.
func (c *Conn) Close() error {
	c.mu.Lock()
	c.closed = true
	conns := make([]*trackedConn, 0, len(c.conns))
	for t := range c.conns {
		conns = append(conns, t)
	}
	c.mu.Unlock()
	for _, t := range conns {
		_ = t.Close()
	}
	c.tr.CloseIdleConnections()
	return nil
}

// newRequest is the request of one RPC: POST of method with the gRPC
// headers, the deadline as grpc-timeout and the per-RPC metadata.
func (c *Conn) newRequest(ctx context.Context, method string, body io.Reader) (*http.Request, error) {
	u := &url.URL{Scheme: c.scheme, Host: c.cfg.Address, Path: method}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u.String(), body)
	if err != nil {
		return nil, errorf(Internal, "%v", err)
	}
	req.ContentLength = -1
	h := req.Header
	if c.cfg.Metadata != nil {
		md, err := c.cfg.Metadata(ctx)
		if err != nil {
			return nil, errorf(Unavailable, "per-RPC metadata: %v", err)
		}
		for k, v := range md {
			h.Set(k, v)
		}
	}
	h.Set("Content-Type", "application/grpc")
	h.Set("Te", "trailers")
	h.Set("User-Agent", "grpcwire")
	if dl, ok := ctx.Deadline(); ok {
		h.Set("Grpc-Timeout", encodeTimeout(time.Until(dl)))
	}
	return req, nil
}

// roundTrip sends req and waits for the response headers; an answer that
// is not gRPC, or a trailers-only response with an error, is a *Status.
func (c *Conn) roundTrip(req *http.Request) (*http.Response, error) {
	resp, err := c.tr.RoundTrip(req)
	if err != nil {
		return nil, transportStatus(req.Context(), err)
	}
	if err := checkResponse(resp); err != nil {
		_ = resp.Body.Close()
		return nil, err
	}
	return resp, nil
}

func checkResponse(resp *http.Response) error {
	if resp.StatusCode != http.StatusOK {
		return errorf(httpStatusCode(resp.StatusCode), "unexpected HTTP status %d", resp.StatusCode)
	}
	if resp.Header.Get("grpc-status") != "" { // trailers-only
		if st := statusFrom(resp.Header); st != nil {
			return st
		}
		return nil
	}
	ct := resp.Header.Get("Content-Type")
	if ct != "application/grpc" && !hasPrefix(ct, "application/grpc+") && !hasPrefix(ct, "application/grpc;") {
		return errorf(Unknown, "unexpected content-type %q", ct)
	}
	return nil
}

func hasPrefix(s, p string) bool { return len(s) >= len(p) && s[:len(p)] == p }

// frame prefixes a message with the 5-byte header: not compressed,
// big-endian length.
func frame(msg []byte) ([]byte, error) {
	if uint64(len(msg)) > 1<<32-1 {
		return nil, errorf(ResourceExhausted, "message of %d bytes", len(msg))
	}
	b := make([]byte, 5, 5+len(msg))
	binary.BigEndian.PutUint32(b[1:5], uint32(len(msg)))
	return append(b, msg...), nil
}

func encode(m proto.Message) ([]byte, error) {
	b, err := proto.Marshal(m)
	if err != nil {
		return nil, errorf(Internal, "marshal: %v", err)
	}
	return frame(b)
}

// Invoke calls a unary method: one request, exactly one response.
func (c *Conn) Invoke(ctx context.Context, method string, in, out proto.Message) error {
	b, err := proto.Marshal(in)
	if err != nil {
		return errorf(Internal, "marshal: %v", err)
	}
	resp, err := c.InvokeRaw(ctx, method, b)
	if err != nil {
		return err
	}
	if err := proto.Unmarshal(resp, out); err != nil {
		return errorf(Internal, "unmarshal: %v", err)
	}
	return nil
}

// InvokeRaw is Invoke with the messages' encoded bytes, for callers that
// do not link the message types (a health check's two fields).
func (c *Conn) InvokeRaw(ctx context.Context, method string, in []byte) ([]byte, error) {
	body, err := frame(in)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	req, err := c.newRequest(ctx, method, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	resp, err := c.roundTrip(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	r := &reader{ctx: ctx, resp: resp, max: c.cfg.MaxRecvMsgSize}
	out, err := r.next()
	if err != nil {
		if err == io.EOF {
			return nil, errorf(Internal, "server sent no response message")
		}
		return nil, err
	}
	if _, err := r.next(); err != io.EOF {
		if err == nil {
			return nil, errorf(Internal, "server sent more than one response message")
		}
		return nil, err
	}
	return out, nil
}

// reader reads the messages of a response, then its status.
type reader struct {
	ctx  context.Context
	resp *http.Response
	max  int
	done error // io.EOF after an OK status, else the *Status
}

// recv reads the next message into m; io.EOF when the stream ended OK.
func (r *reader) recv(m proto.Message) error {
	b, err := r.next()
	if err != nil {
		return err
	}
	if err := proto.Unmarshal(b, m); err != nil {
		r.done = errorf(Internal, "unmarshal: %v", err)
		return r.done
	}
	return nil
}

func (r *reader) next() ([]byte, error) {
	if r.done != nil {
		return nil, r.done
	}
	var hdr [5]byte
	if n, err := readFull(r.resp.Body, hdr[:]); err != nil {
		if n == 0 && err == io.EOF {
			r.done = r.status()
		} else {
			r.done = r.fail(err)
		}
		return nil, r.done
	}
	if hdr[0] != 0 {
		r.done = errorf(Internal, "message with flags %#x: no compression was negotiated", hdr[0])
		return nil, r.done
	}
	n := binary.BigEndian.Uint32(hdr[1:])
	if uint64(n) > uint64(r.max) {
		r.done = errorf(ResourceExhausted, "received message larger than max (%d vs. %d)", n, r.max)
		return nil, r.done
	}
	b := make([]byte, n)
	if _, err := readFull(r.resp.Body, b); err != nil {
		r.done = r.fail(err)
		return nil, r.done
	}
	return b, nil
}

// status is the stream's end: io.EOF for OK, else the *Status from the
// trailers (or from the headers of a trailers-only response).
func (r *reader) status() error {
	h := r.resp.Trailer
	if h.Get("grpc-status") == "" && r.resp.Header.Get("grpc-status") != "" {
		h = r.resp.Header
	}
	if st := statusFrom(h); st != nil {
		return st
	}
	return io.EOF
}

// readFull is io.ReadFull keeping the reader's own error: the Transport
// reports a lost connection as io.ErrUnexpectedEOF, a stream the server
// ended (cleanly) as io.EOF.
func readFull(r io.Reader, p []byte) (int, error) {
	n := 0
	for n < len(p) {
		m, err := r.Read(p[n:])
		n += m
		if err != nil {
			if n == len(p) {
				return n, nil
			}
			return n, err
		}
	}
	return n, nil
}

func (r *reader) fail(err error) error {
	switch err {
	case io.EOF: // END_STREAM inside a message
		return errorf(Internal, "stream ended inside a message")
	case io.ErrUnexpectedEOF:
		return errorf(Unavailable, "connection lost")
	}
	return transportStatus(r.ctx, err)
}

// Stream is a bidirectional streaming RPC. Send may run concurrently with
// Recv; neither is safe for concurrent use with itself.
type Stream struct {
	ctx    context.Context
	cancel context.CancelFunc
	pw     *io.PipeWriter
	res    chan result
	max    int

	mu  sync.Mutex
	got bool
	r   *reader
	err error
}

type result struct {
	resp *http.Response
	err  error
}

// NewStream starts a streaming call of method. It returns once the call
// is under way; the server's answer (or refusal) comes with Recv. The
// stream lives until Close or until ctx ends.
func (c *Conn) NewStream(ctx context.Context, method string) (*Stream, error) {
	ctx, cancel := context.WithCancel(ctx)
	pr, pw := io.Pipe()
	req, err := c.newRequest(ctx, method, pr)
	if err != nil {
		cancel()
		return nil, err
	}
	s := &Stream{ctx: ctx, cancel: cancel, pw: pw, res: make(chan result, 1), max: c.cfg.MaxRecvMsgSize}
	// The Transport notices the end of ctx only between request-body
	// reads: while it waits on the pipe for our next message, a reader
	// blocked in Recv would wait on with it. Failing the pipe aborts the
	// stream (RST_STREAM) and with it Recv.
	context.AfterFunc(ctx, func() { _ = pr.CloseWithError(ctx.Err()) })
	go func() {
		resp, err := c.roundTrip(req)
		if err != nil {
			_ = pr.CloseWithError(err) // a blocked Send returns
		}
		s.res <- result{resp, err}
	}()
	return s, nil
}

// Send sends m. After the stream ended it returns the RPC's error if that
// is already known, else io.EOF (Recv then returns the status).
func (s *Stream) Send(m proto.Message) error {
	b, err := encode(m)
	if err != nil {
		return err
	}
	if _, err := s.pw.Write(b); err != nil {
		var st *Status
		if errors.As(err, &st) {
			return st
		}
		return io.EOF
	}
	return nil
}

// CloseSend ends the client's half of the stream (END_STREAM).
func (s *Stream) CloseSend() error { return s.pw.Close() }

// Recv waits for the next message; io.EOF when the server ended the
// stream with OK, else a *Status.
func (s *Stream) Recv(m proto.Message) error {
	r, err := s.reader()
	if err != nil {
		return err
	}
	return r.recv(m)
}

func (s *Stream) reader() (*reader, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.got {
		res := <-s.res
		s.got = true
		s.err = res.err
		if res.err == nil {
			s.r = &reader{ctx: s.ctx, resp: res.resp, max: s.max}
		}
	}
	return s.r, s.err
}

// Close cancels the stream (RST_STREAM unless it had ended) and releases it.
func (s *Stream) Close() {
	s.cancel()
	_ = s.pw.CloseWithError(io.EOF)
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.got {
		s.got = true
		s.err = errorf(Canceled, "stream closed")
		go func() {
			if res := <-s.res; res.resp != nil {
				_ = res.resp.Body.Close()
			}
		}()
		return
	}
	if s.r != nil {
		_ = s.r.resp.Body.Close()
	}
}

package l7

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/textproto"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/http2"
)

// Handler answers one request. It must always return a response (errors
// become synthetic 4xx/5xx responses); the server closes resp.Body. After
// the body reaches EOF, resp.Trailer holds the trailers to send.
type Handler interface {
	ServeL7(req *http.Request) *http.Response
}

// HandlerFunc adapts a function to Handler.
type HandlerFunc func(req *http.Request) *http.Response

func (f HandlerFunc) ServeL7(req *http.Request) *http.Response { return f(req) }

// Server serves HTTP on already-accepted streams (tunnels).
type Server struct {
	Handler        Handler
	MaxHeaderBytes int           // default DefaultMaxHeaderBytes
	MaxHeaders     int           // default DefaultMaxHeaders
	IdleTimeout    time.Duration // keep-alive idle; default 5 minutes
	// HeadTimeout bounds reading one request head once it started (slowloris).
	HeadTimeout time.Duration // default 30s
	// OnRefused is told about requests refused before reaching the handler.
	OnRefused func(status int, reason string)

	h2once sync.Once
	h2     *http2.Server
}

func (s *Server) maxHeaderBytes() int { return orInt(s.MaxHeaderBytes, DefaultMaxHeaderBytes) }
func (s *Server) maxHeaders() int     { return orInt(s.MaxHeaders, DefaultMaxHeaders) }

func orInt(v, d int) int {
	if v > 0 {
		return v
	}
	return d
}

func orDur(v, d time.Duration) time.Duration {
	if v > 0 {
		return v
	}
	return d
}

// ServeConn serves HTTP/1.1 or HTTP/2 (prior knowledge) on conn, reading
// through br (from Sniff). It returns when the connection is done.
func (s *Server) ServeConn(ctx context.Context, conn net.Conn, br *bufio.Reader, p Protocol) {
	s.ServeConnWith(ctx, conn, br, p, s.Handler)
}

// ServeConnWith is ServeConn with a per-connection handler (which knows the
// tunnel's peer and target).
func (s *Server) ServeConnWith(ctx context.Context, conn net.Conn, br *bufio.Reader, p Protocol, h Handler) {
	switch p {
	case HTTP2:
		s.serveHTTP2(ctx, &bufferedConn{Conn: conn, r: br}, nil, nil, h)
	default:
		s.serveHTTP1(ctx, conn, br, h)
	}
}

type bufferedConn struct {
	net.Conn
	r io.Reader
}

func (c *bufferedConn) Read(p []byte) (int, error) { return c.r.Read(p) }

func (s *Server) http2Server() *http2.Server {
	s.h2once.Do(func() {
		s.h2 = &http2.Server{
			IdleTimeout:          orDur(s.IdleTimeout, 5*time.Minute),
			MaxConcurrentStreams: 1000,
		}
	})
	return s.h2
}

func (s *Server) serveHTTP2(ctx context.Context, conn net.Conn, upgrade *http.Request, settings []byte, h Handler) {
	s.http2Server().ServeConn(conn, &http2.ServeConnOpts{
		Context:        ctx,
		BaseConfig:     &http.Server{MaxHeaderBytes: s.maxHeaderBytes()},
		Handler:        http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { serveH2Request(h, w, r) }),
		UpgradeRequest: upgrade,
		Settings:       settings,
	})
}

// serveH2Request adapts the Handler to an HTTP/2 stream.
func serveH2Request(handler Handler, w http.ResponseWriter, r *http.Request) {
	if err := NormalizeRequest(r); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	resp := handler.ServeL7(r)
	defer resp.Body.Close()
	RemoveHopByHop(resp.Header, false)
	h := w.Header()
	for k, vs := range resp.Header {
		h[k] = vs
	}
	for k := range resp.Trailer {
		h.Add("Trailer", k)
	}
	w.WriteHeader(resp.StatusCode)
	if r.Method != http.MethodHead {
		copyFlushing(w, resp.Body, w.(http.Flusher).Flush)
	}
	for k, vs := range resp.Trailer {
		h[http.TrailerPrefix+k] = vs
	}
}

// copyFlushing copies the body, flushing after every read so streaming
// responses (gRPC, server-sent events) are not held back.
func copyFlushing(w io.Writer, r io.Reader, flush func()) (int64, error) {
	bufp := copyBufPool.Get().(*[]byte)
	defer copyBufPool.Put(bufp)
	buf := *bufp
	var n int64
	for {
		nr, rerr := r.Read(buf)
		if nr > 0 {
			nw, werr := w.Write(buf[:nr])
			n += int64(nw)
			if werr != nil {
				return n, werr
			}
			flush()
		}
		if rerr == io.EOF {
			return n, nil
		}
		if rerr != nil {
			return n, rerr
		}
	}
}

var copyBufPool = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

func (s *Server) refuse(w *bufio.Writer, status int, reason string) {
	if s.OnRefused != nil {
		s.OnRefused(status, reason)
	}
	body := reason + "\n"
	fmt.Fprintf(w, "HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s",
		status, http.StatusText(status), len(body), body)
	w.Flush()
}

// serveHTTP1 is the keep-alive loop. Every head is read and validated by
// us before Go's parser sees it; bodies are framed by us from the validated
// Content-Length or chunked coding.
func (s *Server) serveHTTP1(ctx context.Context, conn net.Conn, br *bufio.Reader, handler Handler) {
	bw := bufio.NewWriterSize(conn, 16<<10)
	// Idle and head timeouts close the connection from a timer: resetting a
	// timer is cheap, while a read deadline on a tunnel stream is a message
	// to the HTTP/2 connection's goroutine, three times per request.
	idle, headTimeout := orDur(s.IdleTimeout, 5*time.Minute), orDur(s.HeadTimeout, 30*time.Second)
	timer := time.AfterFunc(idle, func() { conn.Close() })
	defer timer.Stop()
	for {
		timer.Reset(idle)
		if _, err := br.Peek(1); err != nil {
			return // idle close or EOF between requests
		}
		timer.Reset(headTimeout)
		head, err := readHead(br, s.maxHeaderBytes(), s.maxHeaders())
		timer.Stop()
		if err != nil {
			var he *headError
			if errors.As(err, &he) {
				s.refuse(bw, he.status, he.reason)
			}
			return
		}
		if he := validateHead(head); he != nil {
			s.refuse(bw, he.status, he.reason)
			return
		}
		req, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(head)))
		if err != nil {
			s.refuse(bw, http.StatusBadRequest, "malformed request: "+err.Error())
			return
		}
		body := newRequestBody(req, br, bw)
		req.Body = body
		req.RemoteAddr = conn.RemoteAddr().String()
		req = req.WithContext(ctx)

		if settings, ok := h2cUpgrade(req); ok {
			fmt.Fprint(bw, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
			if bw.Flush() != nil {
				return
			}
			req.Header.Del("Http2-Settings")
			RemoveHopByHop(req.Header, false)
			s.serveHTTP2(ctx, &bufferedConn{Conn: conn, r: br}, req, settings, handler)
			return
		}

		if err := NormalizeRequest(req); err != nil {
			s.refuse(bw, http.StatusBadRequest, err.Error())
			return
		}
		resp := handler.ServeL7(req)
		if resp.StatusCode == http.StatusSwitchingProtocols {
			s.switchProtocols(conn, br, bw, req, resp)
			return
		}
		keepAlive := !req.Close && req.ProtoAtLeast(1, 1) && !resp.Close
		werr := writeResponse(bw, req, resp)
		resp.Body.Close()
		if werr != nil || !keepAlive || !body.drain() {
			return
		}
	}
}

// h2cUpgrade recognises an HTTP/1.1 Upgrade to h2c (RFC 7540 §3.2) on a
// request without a body (the upgraded stream starts half-closed).
func h2cUpgrade(req *http.Request) ([]byte, bool) {
	if !headerHasToken(req.Header, "Upgrade", "h2c") || !headerHasToken(req.Header, "Connection", "http2-settings") ||
		req.ContentLength != 0 || len(req.TransferEncoding) > 0 {
		return nil, false
	}
	vals := req.Header.Values("Http2-Settings")
	if len(vals) != 1 {
		return nil, false
	}
	settings, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(vals[0], "="))
	if err != nil || len(settings)%6 != 0 {
		return nil, false
	}
	return settings, true
}

func headerHasToken(h http.Header, name, token string) bool {
	for _, v := range h.Values(name) {
		for _, t := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

// requestBody frames a request body from the validated head, answers
// "Expect: 100-continue" on first read, and reads chunked trailers.
type requestBody struct {
	r         io.Reader
	br        *bufio.Reader
	bw        *bufio.Writer
	req       *http.Request
	chunked   bool
	expect    bool
	eof       bool
	err       error
	maxDrain  int64
	trailerOK bool
}

func newRequestBody(req *http.Request, br *bufio.Reader, bw *bufio.Writer) *requestBody {
	b := &requestBody{br: br, bw: bw, req: req, maxDrain: 256 << 10}
	if headerHasToken(req.Header, "Expect", "100-continue") && req.ProtoAtLeast(1, 1) {
		b.expect = true
		req.Header.Del("Expect")
	}
	switch {
	case len(req.TransferEncoding) > 0:
		b.chunked = true
		b.r = httputil.NewChunkedReader(br)
		if req.Trailer == nil {
			req.Trailer = http.Header{} // shared with shallow copies of req
		}
		req.ContentLength = -1
		req.TransferEncoding = nil
	case req.ContentLength > 0:
		b.r = io.LimitReader(br, req.ContentLength)
	default:
		b.r = http.NoBody
		b.eof = true
		b.expect = false
	}
	return b
}

func (b *requestBody) Read(p []byte) (int, error) {
	if b.err != nil {
		return 0, b.err
	}
	if b.eof {
		return 0, io.EOF
	}
	if b.expect {
		b.expect = false
		b.bw.WriteString("HTTP/1.1 100 Continue\r\n\r\n")
		if err := b.bw.Flush(); err != nil {
			b.err = err
			return 0, err
		}
	}
	n, err := b.r.Read(p)
	if err == io.EOF {
		if b.chunked {
			if terr := b.readTrailers(); terr != nil {
				b.err = terr
				return n, terr
			}
		} else if lr, ok := b.r.(*io.LimitedReader); ok && lr.N > 0 {
			b.err = io.ErrUnexpectedEOF
			return n, b.err
		}
		b.eof = true
	} else if err != nil {
		b.err = err
	}
	return n, err
}

// readTrailers consumes the trailer section after the last chunk.
func (b *requestBody) readTrailers() error {
	tp := textproto.NewReader(b.br)
	total := 0
	for {
		line, err := tp.ReadLine()
		if err != nil {
			return err
		}
		if line == "" {
			return nil
		}
		if total += len(line); total > 16<<10 {
			return errTrailerTooLarge
		}
		name, value, ok := strings.Cut(line, ":")
		if !ok {
			return errors.New("malformed trailer")
		}
		if b.req.Trailer == nil {
			b.req.Trailer = http.Header{}
		}
		b.req.Trailer.Add(strings.TrimSpace(name), strings.TrimSpace(value))
	}
}

func (b *requestBody) Close() error { return nil }

// BodyBuffered reports whether body, a request body from Server, has all
// of its bytes in memory already: a Content-Length body that arrived with
// its head (no 100-continue pending, nothing read yet). A proxy forwards
// such a body from memory: net/http then writes the upstream request in
// one write, where for a streamed body it flushes the head on its own
// first — one more TLS record and syscall per request on an HBONE tunnel.
func BodyBuffered(body io.Reader) bool {
	b, ok := body.(*requestBody)
	if !ok || b.chunked || b.expect || b.eof || b.err != nil {
		return false
	}
	lr, ok := b.r.(*io.LimitedReader)
	return ok && lr.N > 0 && lr.N == b.req.ContentLength && int64(b.br.Buffered()) >= lr.N
}

// drain consumes what the handler left of the body so the next request can
// be read; false means the connection cannot be reused.
func (b *requestBody) drain() bool {
	if b.eof {
		return true
	}
	if b.err != nil || b.expect {
		return false // never read (no 100 sent): the client may not send it
	}
	n, err := io.Copy(io.Discard, io.LimitReader(b, b.maxDrain))
	return err == nil && b.eof && n <= b.maxDrain
}

// writeResponse writes resp in HTTP/1.1 framing: Content-Length when known
// and there are no trailers, chunked otherwise (close-delimited for HTTP/1.0
// clients). Chunks are flushed as they arrive.
func writeResponse(bw *bufio.Writer, req *http.Request, resp *http.Response) error {
	RemoveHopByHop(resp.Header, false)
	noBody := req.Method == http.MethodHead || resp.StatusCode/100 == 1 || resp.StatusCode == 204 || resp.StatusCode == 304
	chunked := false
	closeDelimited := false
	switch {
	case noBody:
		if resp.ContentLength >= 0 && req.Method == http.MethodHead {
			resp.Header.Set("Content-Length", strconv.FormatInt(resp.ContentLength, 10))
		}
	case resp.ContentLength >= 0 && len(resp.Trailer) == 0:
		resp.Header.Set("Content-Length", strconv.FormatInt(resp.ContentLength, 10))
	case req.ProtoAtLeast(1, 1):
		chunked = true
		resp.Header.Del("Content-Length")
	default:
		closeDelimited = true
		resp.Header.Del("Content-Length")
	}
	fmt.Fprintf(bw, "HTTP/1.1 %03d %s\r\n", resp.StatusCode, statusText(resp))
	if chunked {
		bw.WriteString("Transfer-Encoding: chunked\r\n")
		if len(resp.Trailer) > 0 {
			names := make([]string, 0, len(resp.Trailer))
			for k := range resp.Trailer {
				names = append(names, k)
			}
			bw.WriteString("Trailer: " + strings.Join(names, ", ") + "\r\n")
		}
	}
	if closeDelimited || resp.Close || req.Close {
		bw.WriteString("Connection: close\r\n")
	}
	if err := resp.Header.Write(bw); err != nil {
		return err
	}
	bw.WriteString("\r\n")
	if noBody {
		return bw.Flush()
	}
	var err error
	if chunked {
		cw := &chunkWriter{w: bw}
		if _, err = copyFlushing(cw, resp.Body, func() { bw.Flush() }); err != nil {
			return err
		}
		bw.WriteString("0\r\n")
		if err := resp.Trailer.Write(bw); err != nil {
			return err
		}
		bw.WriteString("\r\n")
	} else {
		var n int64
		n, err = io.Copy(bw, resp.Body)
		if err == nil && resp.ContentLength >= 0 && n != resp.ContentLength {
			err = io.ErrUnexpectedEOF
		}
		if err != nil {
			return err // the connection is closed: the client sees a short body
		}
	}
	if closeDelimited {
		bw.Flush()
		return errors.New("close-delimited response")
	}
	return bw.Flush()
}

func statusText(resp *http.Response) string {
	if t := http.StatusText(resp.StatusCode); t != "" {
		return t
	}
	return "status"
}

type chunkWriter struct{ w *bufio.Writer }

func (c *chunkWriter) Write(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	fmt.Fprintf(c.w, "%x\r\n", len(p))
	c.w.Write(p)
	_, err := c.w.WriteString("\r\n")
	return len(p), err
}

// switchProtocols completes an upgrade the upstream accepted (101, e.g.
// WebSocket): the 101 goes to the client with its Upgrade headers, then
// bytes are relayed both ways until either side ends.
func (s *Server) switchProtocols(conn net.Conn, br *bufio.Reader, bw *bufio.Writer, req *http.Request, resp *http.Response) {
	up, ok := resp.Body.(io.ReadWriteCloser)
	upgrade := resp.Header.Get("Upgrade")
	if !ok || UpgradeProtocol(req) == "" || !strings.EqualFold(upgrade, UpgradeProtocol(req)) {
		resp.Body.Close()
		s.refuse(bw, http.StatusBadGateway, "upstream switched protocols without a matching upgrade request")
		return
	}
	defer up.Close()
	RemoveHopByHop(resp.Header, false)
	fmt.Fprintf(bw, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: %s\r\n", upgrade)
	resp.Header.Write(bw)
	bw.WriteString("\r\n")
	if bw.Flush() != nil {
		return
	}
	done := make(chan struct{})
	go func() {
		io.Copy(up, br) // client -> upstream (includes bytes already buffered)
		if cw, ok := up.(interface{ CloseWrite() error }); ok {
			cw.CloseWrite()
		}
		close(done)
	}()
	io.Copy(conn, up) // upstream -> client
	if cw, ok := conn.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
	select {
	case <-done:
	case <-time.After(upgradeLinger):
		conn.Close() // the client did not end its side after the upstream did
	}
}

// upgradeLinger is how long an upgraded connection waits for the client to
// finish after the upstream ended.
const upgradeLinger = 5 * time.Second

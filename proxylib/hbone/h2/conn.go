package h2

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// conn is one HTTP/2 connection carrying HBONE tunnels, on either side. It
// is the tunnel engine: one reader goroutine per connection reads frames
// with x/net's Framer and demultiplexes them to tunnels; frames are written
// from the goroutine that produced them (frameWriter). There is no serve
// loop and no per-frame channel hand-off.
type conn struct {
	raw    net.Conn // the socket under TLS: closing it ends everything
	tc     net.Conn // TLS (batched)
	server bool
	tuning Tuning
	w      *frameWriter
	fr     *http2.Framer

	// onHeaders handles a peer's request HEADERS (server) or is nil.
	onHeaders func(c *conn, f *http2.MetaHeadersFrame) error
	// idleTimeout: a connection without streams this long is sent GOAWAY
	// and closed.
	idleTimeout time.Duration

	limits Limits

	frames atomic.Uint64 // frames read, for the keepalive

	mu                sync.Mutex
	streams           map[uint32]*tunnel
	nextID            uint32 // dialer: next stream id
	lastPeerID        uint32 // server: highest stream id the peer opened
	sendWindow        int64  // connection send window
	recvWindow        int32  // what the peer may still send on the connection
	unacked           int32  // connection bytes read by tunnels, not yet acknowledged
	peerInitialWindow int32
	peerMaxFrame      uint32
	peerMaxStreams    uint32
	reserved          int  // dialer: stream slots promised but not yet opened
	goAwaySent        bool // we refuse new streams (GOAWAY sent)
	goAwayRecv        bool // peer refused new streams
	closed            bool
	linger            bool // a GOAWAY with an error was sent: let it arrive
	idleTimer         *time.Timer
	controlFrames     int // PING/SETTINGS received in the current window
	controlWindow     time.Time
	done              chan struct{}
}

// Frames a peer may send that demand an answer (PING, SETTINGS), per
// controlFloodWindow, before the connection is closed for flooding.
const (
	maxControlFrames   = 1000
	controlFloodWindow = 10 * time.Second
)

var errConnClosed = errors.New("hbone: connection closed")

// errGoAway fails a dial on a connection that received GOAWAY before our
// stream was accepted; it is retried on another connection.
var errGoAway = errors.New("hbone: connection is going away")

// errRefused is a stream the peer refused (REFUSED_STREAM) before any
// processing; retried on another connection.
var errRefused = errors.New("hbone: stream refused by peer")

func newConn(raw, tc net.Conn, server bool, tuning Tuning, limits Limits) *conn {
	c := &conn{
		raw:               raw,
		tc:                tc,
		server:            server,
		tuning:            tuning,
		limits:            limits,
		w:                 newFrameWriter(tc),
		streams:           map[uint32]*tunnel{},
		nextID:            1,
		sendWindow:        65535,
		recvWindow:        max(tuning.ConnWindow, 65535), // a connection window only grows
		peerInitialWindow: 65535,
		peerMaxFrame:      16384,
		peerMaxStreams:    1 << 31,
		done:              make(chan struct{}),
	}
	// No bufio: crypto/tls already buffers a record, and payloads are read
	// straight out of it.
	c.fr = http2.NewFramer(nil, tc)
	c.fr.SetReuseFrames() // DATA payloads are copied out before the next read
	c.fr.SetMaxReadFrameSize(tuning.MaxReadFrameSize)
	c.fr.MaxHeaderListSize = limits.MaxHeaderListSize
	c.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	return c
}

// start sends our preface (dialer), SETTINGS and the connection window.
func (c *conn) start() error {
	settings := []http2.Setting{
		{ID: http2.SettingInitialWindowSize, Val: uint32(c.tuning.StreamWindow)},
		{ID: http2.SettingMaxFrameSize, Val: c.tuning.MaxReadFrameSize},
		{ID: http2.SettingMaxHeaderListSize, Val: c.limits.MaxHeaderListSize},
	}
	if c.server {
		settings = append(settings, http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: c.limits.MaxConcurrentStreams})
	} else {
		settings = append(settings, http2.Setting{ID: http2.SettingEnablePush, Val: 0})
	}
	return c.w.control(func(fr *http2.Framer) error {
		if !c.server {
			if _, err := io.WriteString(&c.w.scratch, http2.ClientPreface); err != nil {
				return err
			}
		}
		if err := fr.WriteSettings(settings...); err != nil {
			return err
		}
		if extra := c.tuning.ConnWindow - 65535; extra > 0 {
			return fr.WriteWindowUpdate(0, uint32(extra))
		}
		return nil
	})
}

// readPreface reads the client preface (server side).
func (c *conn) readPreface(r io.Reader) error {
	var buf [len(http2.ClientPreface)]byte
	if _, err := io.ReadFull(r, buf[:]); err != nil {
		return err
	}
	if string(buf[:]) != http2.ClientPreface {
		return errors.New("bad HTTP/2 client preface")
	}
	return nil
}

// serve runs the reader until the connection ends; it then closes it.
func (c *conn) serve() {
	err := c.readLoop()
	c.closeWith(err)
}

func (c *conn) readLoop() error {
	if c.server {
		if err := c.readPreface(c.tc); err != nil {
			return err
		}
	}
	first := true
	for {
		f, err := c.fr.ReadFrame()
		if err != nil {
			return c.readError(err)
		}
		c.frames.Add(1)
		if first {
			if _, ok := f.(*http2.SettingsFrame); !ok {
				return c.connError(http2.ErrCodeProtocol, "first frame is not SETTINGS")
			}
			first = false
		}
		if err := c.handle(f); err != nil {
			return err
		}
	}
}

// readError turns a framing error into the connection error we send.
func (c *conn) readError(err error) error {
	var se http2.StreamError
	if errors.As(err, &se) {
		// A malformed stream (bad header field): reset it, keep the connection.
		c.w.control(func(fr *http2.Framer) error { return fr.WriteRSTStream(se.StreamID, se.Code) })
		c.streamReset(se.StreamID, se.Code)
		return nil
	}
	var ce http2.ConnectionError
	switch {
	case errors.As(err, &ce):
		msg := "malformed frame"
		if d := c.fr.ErrorDetail(); d != nil {
			msg += ": " + d.Error()
		}
		return c.connError(http2.ErrCode(ce), msg)
	case errors.Is(err, http2.ErrFrameTooLarge):
		return c.connError(http2.ErrCodeFrameSize, "frame too large")
	}
	return err
}

// connError sends GOAWAY with code and returns an error ending the reader.
func (c *conn) connError(code http2.ErrCode, msg string) error {
	c.mu.Lock()
	last := c.lastPeerID
	c.goAwaySent = true
	c.linger = true
	c.mu.Unlock()
	c.w.control(func(fr *http2.Framer) error { return fr.WriteGoAway(last, code, []byte(msg)) })
	return fmt.Errorf("hbone: %s: %v", msg, code)
}

func (c *conn) handle(f http2.Frame) error {
	switch f := f.(type) {
	case *http2.DataFrame:
		return c.handleData(f)
	case *http2.MetaHeadersFrame:
		return c.handleHeaders(f)
	case *http2.SettingsFrame:
		return c.handleSettings(f)
	case *http2.WindowUpdateFrame:
		return c.handleWindowUpdate(f)
	case *http2.PingFrame:
		if f.IsAck() {
			return nil
		}
		if err := c.countControl(); err != nil {
			return err
		}
		data := f.Data
		return c.w.control(func(fr *http2.Framer) error { return fr.WritePing(true, data) })
	case *http2.RSTStreamFrame:
		c.streamReset(f.StreamID, f.ErrCode)
		return nil
	case *http2.GoAwayFrame:
		c.handleGoAway(f)
		return nil
	case *http2.PushPromiseFrame:
		return c.connError(http2.ErrCodeProtocol, "PUSH_PROMISE is not accepted")
	default: // PRIORITY and unknown frame types are ignored (RFC 9113 §5.5)
		return nil
	}
}

// countControl bounds frames that demand an answer: a flood of PING or
// SETTINGS is ENHANCE_YOUR_CALM, not unbounded work and queued answers.
func (c *conn) countControl() error {
	c.mu.Lock()
	now := time.Now()
	if now.Sub(c.controlWindow) > controlFloodWindow {
		c.controlWindow, c.controlFrames = now, 0
	}
	c.controlFrames++
	flood := c.controlFrames > maxControlFrames
	c.mu.Unlock()
	if flood {
		return c.connError(http2.ErrCodeEnhanceYourCalm, "PING/SETTINGS flood")
	}
	return nil
}

func (c *conn) handleData(f *http2.DataFrame) error {
	size := int32(f.Length) // flow control counts padding too
	c.mu.Lock()
	if size > c.recvWindow {
		c.mu.Unlock()
		return c.connError(http2.ErrCodeFlowControl, "connection window exceeded")
	}
	c.recvWindow -= size
	t := c.streams[f.StreamID]
	known := t != nil || c.isPastStream(f.StreamID)
	c.mu.Unlock()
	data := f.Data()
	// Padding, and everything for a stream already gone, is returned at once.
	giveBack := size - int32(len(data))
	if t == nil {
		giveBack = size
	}
	c.consumed(0, int(giveBack), 0)
	if t == nil {
		if !known {
			return c.connError(http2.ErrCodeProtocol, "DATA on a stream never opened")
		}
		c.w.control(func(fr *http2.Framer) error { return fr.WriteRSTStream(f.StreamID, http2.ErrCodeStreamClosed) })
		return nil
	}
	t.mu.Lock()
	if t.remoteEnded {
		t.mu.Unlock()
		c.w.control(func(fr *http2.Framer) error { return fr.WriteRSTStream(f.StreamID, http2.ErrCodeStreamClosed) })
		t.abort(http2.ErrCodeStreamClosed, &ResetError{Code: http2.ErrCodeStreamClosed}, false)
		return nil
	}
	if int32(len(data)) > t.recvWindow {
		t.mu.Unlock()
		t.abort(http2.ErrCodeFlowControl, &ResetError{Code: http2.ErrCodeFlowControl}, true)
		return nil
	}
	t.recvWindow -= int32(len(data))
	t.mu.Unlock()
	t.received(data, f.StreamEnded())
	return nil
}

// isPastStream reports whether id belongs to a stream that existed and was
// closed (c.mu held).
func (c *conn) isPastStream(id uint32) bool {
	if c.server == (id%2 == 1) {
		return id <= c.lastPeerID
	}
	return id < c.nextID
}

func (c *conn) handleHeaders(f *http2.MetaHeadersFrame) error {
	id := f.StreamID
	if c.server {
		if id%2 == 0 {
			return c.connError(http2.ErrCodeProtocol, "even stream id from a client")
		}
		c.mu.Lock()
		t := c.streams[id]
		newStream := id > c.lastPeerID
		if newStream {
			c.lastPeerID = id
		}
		c.mu.Unlock()
		if t != nil || !newStream {
			// Trailers (or a reused id): a tunnel carries none.
			return c.connError(http2.ErrCodeProtocol, "HEADERS on an open or closed stream")
		}
		return c.onHeaders(c, f)
	}
	c.mu.Lock()
	t := c.streams[id]
	c.mu.Unlock()
	if t == nil {
		if id%2 == 1 && id < c.nextID {
			return nil // a response to a stream we already gave up on
		}
		return c.connError(http2.ErrCodeProtocol, "HEADERS on a stream we did not open")
	}
	c.clientResponse(t, f)
	return nil
}

// parseStatus reads a :status of exactly three digits (RFC 9113 8.3.2);
// anything else is 0, a malformed response that fails the dial. Called for
// every tunnel opened: no fmt scanning.
func parseStatus(s string) int {
	if len(s) != 3 {
		return 0
	}
	n := 0
	for i := range 3 {
		c := s[i]
		if c < '0' || c > '9' {
			return 0
		}
		n = n*10 + int(c-'0')
	}
	return n
}

// clientResponse delivers the CONNECT response to the dialer.
func (c *conn) clientResponse(t *tunnel, f *http2.MetaHeadersFrame) {
	status := parseStatus(f.PseudoValue("status"))
	if status >= 100 && status < 200 {
		return // informational: keep waiting
	}
	var h http.Header
	for _, f := range f.RegularFields() {
		if h == nil {
			h = http.Header{}
		}
		h.Add(f.Name, f.Value)
	}
	select {
	case t.response <- responseResult{status: status, header: h}:
	default:
		// Second final response: trailers, not expected on a tunnel.
		t.abort(http2.ErrCodeProtocol, &ResetError{Code: http2.ErrCodeProtocol}, true)
		return
	}
	if f.StreamEnded() {
		t.received(nil, true)
	}
}

func (c *conn) handleSettings(f *http2.SettingsFrame) error {
	if f.IsAck() {
		return nil
	}
	if err := c.countControl(); err != nil {
		return err
	}
	var windowDelta int64
	var tableSize *uint32
	err := f.ForeachSetting(func(s http2.Setting) error {
		if err := s.Valid(); err != nil {
			return err
		}
		c.mu.Lock()
		defer c.mu.Unlock()
		switch s.ID {
		case http2.SettingInitialWindowSize:
			windowDelta += int64(s.Val) - int64(c.peerInitialWindow)
			c.peerInitialWindow = int32(s.Val)
		case http2.SettingMaxFrameSize:
			c.peerMaxFrame = s.Val
		case http2.SettingMaxConcurrentStreams:
			c.peerMaxStreams = s.Val
		case http2.SettingHeaderTableSize:
			tableSize = &s.Val
		}
		return nil
	})
	if tableSize != nil {
		// Outside c.mu: the writer lock is taken before c.mu elsewhere
		// (a dial allocates its stream id under the writer lock).
		c.w.setHeaderTableSize(*tableSize)
	}
	if err != nil {
		var ce http2.ConnectionError
		if errors.As(err, &ce) {
			return c.connError(http2.ErrCode(ce), "bad SETTINGS")
		}
		return c.connError(http2.ErrCodeProtocol, "bad SETTINGS")
	}
	if windowDelta != 0 {
		for _, t := range c.openStreams() {
			if !t.addSendWindow(windowDelta) {
				return c.connError(http2.ErrCodeFlowControl, "SETTINGS window overflow")
			}
		}
	}
	return c.w.control(func(fr *http2.Framer) error { return fr.WriteSettingsAck() })
}

func (c *conn) handleWindowUpdate(f *http2.WindowUpdateFrame) error {
	if f.StreamID == 0 {
		c.mu.Lock()
		c.sendWindow += int64(f.Increment)
		overflow := c.sendWindow > 1<<31-1
		c.mu.Unlock()
		if overflow {
			return c.connError(http2.ErrCodeFlowControl, "connection window overflow")
		}
		for _, t := range c.openStreams() {
			t.wake()
		}
		return nil
	}
	c.mu.Lock()
	t := c.streams[f.StreamID]
	c.mu.Unlock()
	if t != nil && !t.addSendWindow(int64(f.Increment)) {
		t.abort(http2.ErrCodeFlowControl, &ResetError{Code: http2.ErrCodeFlowControl}, true)
	}
	return nil
}

func (c *conn) handleGoAway(f *http2.GoAwayFrame) {
	c.mu.Lock()
	c.goAwayRecv = true
	var refused []*tunnel
	for id, t := range c.streams {
		if id%2 == 1 != c.server && id > f.LastStreamID {
			refused = append(refused, t)
		}
	}
	c.mu.Unlock()
	for _, t := range refused {
		t.abort(http2.ErrCodeRefusedStream, errGoAway, false)
		t.failResponse(errGoAway)
	}
	if f.ErrCode != http2.ErrCodeNo {
		return // the peer closes; our reader sees it
	}
	c.closeIfIdle()
}

func (c *conn) streamReset(id uint32, code http2.ErrCode) {
	c.mu.Lock()
	t := c.streams[id]
	c.mu.Unlock()
	if t == nil {
		return
	}
	var err error = &ResetError{Code: code, Remote: true}
	if code == http2.ErrCodeRefusedStream {
		err = errRefused
	}
	t.peerReset(code, err)
}

// failResponse ends a dial still waiting for its response.
func (t *tunnel) failResponse(err error) {
	if t.response != nil {
		select {
		case t.response <- responseResult{err: err}:
		default:
		}
	}
}

func (c *conn) openStreams() []*tunnel {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]*tunnel, 0, len(c.streams))
	for _, t := range c.streams {
		out = append(out, t)
	}
	return out
}

// takeConnWindow takes up to want bytes of the connection send window.
func (c *conn) takeConnWindow(want int) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.sendWindow <= 0 {
		return 0
	}
	n := int(min(int64(want), c.sendWindow))
	c.sendWindow -= int64(n)
	return n
}

// consumed returns read bytes to the peer: the connection window once a
// quarter of it was read, and streamAck for the stream when non-zero; both
// go out in one write.
func (c *conn) consumed(id uint32, n int, streamAck int32) {
	if n == 0 && streamAck == 0 {
		return
	}
	c.mu.Lock()
	c.unacked += int32(n)
	var connAck int32
	if c.unacked >= c.tuning.ConnWindow/4 {
		connAck, c.unacked = c.unacked, 0
		c.recvWindow += connAck
	}
	c.mu.Unlock()
	if connAck == 0 && streamAck == 0 {
		return
	}
	c.w.control(func(fr *http2.Framer) error {
		if connAck > 0 {
			if err := fr.WriteWindowUpdate(0, uint32(connAck)); err != nil {
				return err
			}
		}
		if streamAck > 0 {
			return fr.WriteWindowUpdate(id, uint32(streamAck))
		}
		return nil
	})
}

// add registers a new stream (c.mu held).
func (c *conn) addLocked(t *tunnel) {
	c.streams[t.id] = t
	if c.idleTimer != nil {
		c.idleTimer.Stop()
	}
}

// release removes a finished stream.
func (c *conn) release(t *tunnel) {
	c.mu.Lock()
	if c.streams[t.id] == t {
		delete(c.streams, t.id)
	}
	c.mu.Unlock()
	c.closeIfIdle()
}

// closeIfIdle closes a connection that refused new streams (GOAWAY either
// way) once its last stream ended, and arms the idle timer otherwise.
func (c *conn) closeIfIdle() {
	c.mu.Lock()
	empty := len(c.streams) == 0 && c.reserved == 0
	drained := empty && (c.goAwaySent || c.goAwayRecv)
	if empty && !drained && c.idleTimeout > 0 && !c.closed {
		if c.idleTimer == nil {
			c.idleTimer = time.AfterFunc(c.idleTimeout, c.idleCheck)
		} else {
			c.idleTimer.Reset(c.idleTimeout)
		}
	}
	c.mu.Unlock()
	if drained {
		c.closeWith(errConnClosed)
	}
}

func (c *conn) idleCheck() {
	c.mu.Lock()
	idle := len(c.streams) == 0 && c.reserved == 0
	c.mu.Unlock()
	if idle {
		c.goAway(http2.ErrCodeNo)
	}
}

// goAway refuses new streams (graceful): open ones finish, then the
// connection closes.
func (c *conn) goAway(code http2.ErrCode) {
	c.mu.Lock()
	if c.goAwaySent || c.closed {
		c.mu.Unlock()
		return
	}
	c.goAwaySent = true
	last := c.lastPeerID
	c.mu.Unlock()
	c.w.control(func(fr *http2.Framer) error { return fr.WriteGoAway(last, code, nil) })
	c.closeIfIdle()
}

// closeWith ends the connection: every stream is reset, the socket closed.
func (c *conn) closeWith(err error) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	if c.idleTimer != nil {
		c.idleTimer.Stop()
	}
	streams := make([]*tunnel, 0, len(c.streams))
	for _, t := range c.streams {
		streams = append(streams, t)
	}
	c.mu.Unlock()
	reset := &ResetError{Code: http2.ErrCodeCancel}
	for _, t := range streams {
		t.failResponse(errGoAway)
		t.abort(http2.ErrCodeCancel, reset, false)
	}
	c.mu.Lock()
	linger := c.linger
	c.mu.Unlock()
	if linger {
		c.raw.SetWriteDeadline(time.Now().Add(forceCloseAfter))
		c.w.flushPending()
	}
	c.w.fail(errConnClosed)
	if linger {
		lingerClose(c.tc, c.raw)
	} else {
		closeTLS(c.tc, c.raw)
	}
	close(c.done)
}

// closeTLS closes gracefully (close_notify) unless that would block on a
// peer that stopped reading.
func closeTLS(tc, raw net.Conn) {
	t := time.AfterFunc(forceCloseAfter, func() { raw.Close() })
	defer t.Stop()
	tc.Close()
	raw.Close()
}

// lingerClose ends a connection we sent an error GOAWAY on, so that the
// GOAWAY arrives: a peer still sending would otherwise turn our close into
// a TCP reset that discards it. We send close_notify and FIN, then read and
// drop what the peer still sends for a moment before closing.
func lingerClose(tc, raw net.Conn) {
	const lingerTime, lingerBytes = time.Second, 1 << 20
	if cw, ok := tc.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite() // under the write deadline closeWith set
	}
	if cw, ok := raw.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
	raw.SetReadDeadline(time.Now().Add(lingerTime))
	io.Copy(io.Discard, io.LimitReader(raw, lingerBytes))
	raw.Close()
}

// keepalive pings a connection that read nothing for interval and closes it
// if still nothing arrives within timeout (a peer stalled mid-frame, a dead
// path).
func (c *conn) keepalive(interval, timeout time.Duration) {
	if interval <= 0 {
		return
	}
	seen := c.frames.Load()
	var check func()
	var timer *time.Timer
	pinged := false
	check = func() {
		select {
		case <-c.done:
			return
		default:
		}
		now := c.frames.Load()
		switch {
		case now != seen:
			seen, pinged = now, false
			timer.Reset(interval)
		case !pinged:
			pinged = true
			c.w.control(func(fr *http2.Framer) error { return fr.WritePing(false, [8]byte{'h', 'b', 'o', 'n', 'e'}) })
			timer.Reset(timeout)
		default:
			c.closeWith(errors.New("hbone: peer did not answer PING"))
		}
	}
	timer = time.AfterFunc(interval, check) // stops re-arming once done closes
}

// atomicTime is a time stored as unix nanoseconds.
type atomicTime struct{ v atomic.Int64 }

func (a *atomicTime) store(t time.Time) { a.v.Store(t.UnixNano()) }
func (a *atomicTime) load() time.Time   { return time.Unix(0, a.v.Load()) }

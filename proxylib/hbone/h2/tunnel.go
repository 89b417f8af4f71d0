package h2

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ambientmesh/ambient/proxylib/hbone"
	"golang.org/x/net/http2"
)

// ErrStreamIdle resets a tunnel that moved no bytes for StreamIdleTimeout.
var ErrStreamIdle = errors.New("hbone: tunnel idle timeout")

// ResetError is what a tunnel's Read and Write return after the peer reset
// the stream (RST_STREAM) or the connection died under it.
type ResetError struct {
	Code   http2.ErrCode
	Remote bool // sent by the peer (else: the connection ended)
}

func (e *ResetError) Error() string {
	if e.Remote {
		return fmt.Sprintf("hbone: tunnel reset by peer (%v)", e.Code)
	}
	return fmt.Sprintf("hbone: tunnel reset: connection lost (%v)", e.Code)
}

// tunnel is one HBONE stream on either side of a connection. Received DATA
// is copied by the connection's reader into a chunk queue that the tunnel's
// Read drains; Write frames data from the caller's goroutine. Both
// directions half-close independently (END_STREAM); the tunnel is released
// when both have ended or either side reset it.
type tunnel struct {
	c  *conn
	id uint32

	mu   sync.Mutex
	cond sync.Cond // readers (data, end, reset, deadline) and writers (window)

	recv       chunkQueue
	recvWindow int32 // what the peer may still send us on this stream
	unacked    int32 // bytes read by the app not yet returned by WINDOW_UPDATE

	sendWindow int64 // what we may still send (may go negative on SETTINGS)

	remoteEnded bool  // peer's END_STREAM received
	localEnded  bool  // our END_STREAM sent
	reset       error // set once the stream was reset (either side)
	writeErr    error // the peer reset after its END_STREAM: only writes fail
	released    bool  // removed from the connection

	readDeadline, writeDeadline deadline

	// Pushing (hbone.LazyPusher): while no drain runs, received bytes go
	// straight into sink from the connection's reader goroutine.
	sink     hbone.Sink
	pushed   int64
	draining bool   // a drain runs (or is starting): pushes wait for it
	pending  func() // lazy pushing: starts a drain (hbone.LazyPusher)

	// Dialing side: the response to our CONNECT, and its headers.
	response   chan responseResult
	respHeader http.Header

	idle     *idleWatch
	hooks    []func()    // run once when the tunnel is released
	answered atomic.Bool // server: the CONNECT was answered

	local, remote net.Addr
}

type responseResult struct {
	status int
	header http.Header
	err    error
}

// ResponseHeader is the 200's regular headers (hbone.ResponseHeaderer).
func (t *tunnel) ResponseHeader() http.Header { return t.respHeader }

func newTunnel(c *conn, id uint32) *tunnel {
	t := &tunnel{c: c, id: id, recvWindow: c.tuning.StreamWindow} // sendWindow: set when registered
	t.cond.L = &t.mu
	return t
}

// deadline is a net.Conn deadline that wakes the tunnel's waiters.
type deadline struct {
	at    time.Time
	timer *time.Timer
}

func (d *deadline) passed() bool { return !d.at.IsZero() && !time.Now().Before(d.at) }

func (t *tunnel) setDeadline(d *deadline, at time.Time) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.released {
		return net.ErrClosed
	}
	d.at = at
	if d.timer != nil {
		d.timer.Stop()
		d.timer = nil
	}
	if !at.IsZero() {
		d.timer = time.AfterFunc(time.Until(at), func() {
			t.mu.Lock()
			t.cond.Broadcast()
			kick := t.kickLocked()
			t.mu.Unlock()
			run(kick)
		})
	}
	t.cond.Broadcast()
	return nil
}

// kickLocked returns the lazy drain to start (t.mu held; call it after
// unlocking) when one must run — bytes queued, the stream ended, reset or
// past its read deadline — and none is running; nil otherwise.
func (t *tunnel) kickLocked() func() {
	if t.pending == nil || t.draining {
		return nil
	}
	if t.recv.len() == 0 && !t.remoteEnded && t.reset == nil && !t.readDeadline.passed() {
		return nil
	}
	t.draining = true
	return t.pending
}

func run(f func()) {
	if f != nil {
		f()
	}
}

// PushLazily pushes received bytes into s while no drain runs and, instead of a
// reader waiting, calls pending (no lock held) to start a drain whenever
// bytes are queued, the stream ends or fails while no drain runs; a drain
// calls TryRead until it reports hbone.ErrWouldBlock (hbone.LazyPusher).
// PushLazily(nil, nil) stops both and returns the bytes pushed.
func (t *tunnel) PushLazily(s hbone.Sink, pending func()) int64 {
	t.mu.Lock()
	t.sink, t.pending, t.draining = s, pending, false
	pushed := t.pushed
	kick := t.kickLocked()
	t.mu.Unlock()
	run(kick)
	return pushed
}

// TryRead reads queued bytes without waiting. With nothing queued it
// reports the end, the reset or a passed deadline, else
// hbone.ErrWouldBlock, which ends the current drain.
func (t *tunnel) TryRead(p []byte) (int, error) {
	t.mu.Lock()
	if t.recv.len() > 0 {
		n := t.recv.read(p)
		ack := t.consumedLocked(n)
		t.mu.Unlock()
		t.idle.touch()
		t.c.consumed(t.id, n, ack)
		return n, nil
	}
	defer t.mu.Unlock()
	switch {
	case t.reset != nil:
		return 0, t.reset
	case t.remoteEnded:
		return 0, io.EOF
	case t.readDeadline.passed():
		return 0, os.ErrDeadlineExceeded
	}
	t.draining = false
	return 0, hbone.ErrWouldBlock
}

func (t *tunnel) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	t.mu.Lock()
	for t.recv.len() == 0 {
		switch {
		case t.reset != nil:
			err := t.reset
			t.mu.Unlock()
			return 0, err
		case t.remoteEnded:
			t.mu.Unlock()
			return 0, io.EOF
		case t.readDeadline.passed():
			t.mu.Unlock()
			return 0, os.ErrDeadlineExceeded
		}
		t.cond.Wait()
	}
	n := t.recv.read(p)
	ack := t.consumedLocked(n)
	t.mu.Unlock()
	t.idle.touch()
	t.c.consumed(t.id, n, ack)
	return n, nil
}

// consumedLocked notes n bytes taken by the application and returns the
// stream window to give back now (WINDOW_UPDATE after a quarter window).
func (t *tunnel) consumedLocked(n int) (ack int32) {
	t.unacked += int32(n)
	if t.unacked >= t.c.tuning.StreamWindow/4 && !t.remoteEnded && t.reset == nil {
		ack, t.unacked = t.unacked, 0
		t.recvWindow += ack
	}
	return ack
}

// WaitReadable parks until Read would not block (data, end, reset or a
// deadline), so an idle relay direction holds no buffer
// (hbone.ReadableWaiter).
func (t *tunnel) WaitReadable() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	for t.recv.len() == 0 && t.reset == nil && !t.remoteEnded && !t.readDeadline.passed() {
		t.cond.Wait()
	}
	return nil
}

func (t *tunnel) Write(p []byte) (int, error) {
	written := 0
	for len(p) > 0 {
		n, err := t.takeSendWindow(len(p))
		if err != nil {
			return written, err
		}
		if err := t.c.w.data(t.id, p[:n], false); err != nil {
			return written, err
		}
		written += n
		p = p[n:]
	}
	if written > 0 {
		t.idle.touch()
	}
	return written, nil
}

// takeSendWindow waits until both the stream's and the connection's windows
// allow sending, then takes up to want bytes of them.
func (t *tunnel) takeSendWindow(want int) (int, error) {
	t.mu.Lock()
	for {
		switch {
		case t.reset != nil:
			err := t.reset
			t.mu.Unlock()
			return 0, err
		case t.writeErr != nil:
			err := t.writeErr
			t.mu.Unlock()
			return 0, err
		case t.localEnded:
			t.mu.Unlock()
			return 0, net.ErrClosed
		case t.writeDeadline.passed():
			t.mu.Unlock()
			return 0, os.ErrDeadlineExceeded
		}
		if t.sendWindow > 0 {
			n := t.c.takeConnWindow(int(min(int64(want), t.sendWindow)))
			if n > 0 {
				t.sendWindow -= int64(n)
				t.mu.Unlock()
				return n, nil
			}
		}
		t.cond.Wait()
	}
}

// CloseWrite sends END_STREAM: our direction is done, the peer's continues.
func (t *tunnel) CloseWrite() error {
	t.mu.Lock()
	if t.localEnded || t.reset != nil {
		t.mu.Unlock()
		return nil
	}
	t.localEnded = true
	t.cond.Broadcast()
	t.mu.Unlock()
	err := t.c.w.data(t.id, nil, true)
	t.maybeRelease()
	return err
}

// Close releases the tunnel; unless both directions had ended cleanly the
// peer gets RST_STREAM(CANCEL).
//
// After our CloseWrite the reset is RST_STREAM(NO_ERROR), "stop sending"
// (RFC 9113 §8.1): the peer still reads everything we sent, then EOF, as
// with a TCP close after shutdown; before it, CANCEL aborts both ways.
func (t *tunnel) Close() error {
	t.mu.Lock()
	code := http2.ErrCodeCancel
	if t.localEnded {
		code = http2.ErrCodeNo
	}
	t.mu.Unlock()
	t.abort(code, net.ErrClosed, true)
	return nil
}

// peerReset applies the peer's RST_STREAM. After the peer's END_STREAM it
// only stops our direction (what it sent stays readable, then EOF);
// otherwise the tunnel is aborted both ways.
func (t *tunnel) peerReset(code http2.ErrCode, err error) {
	t.mu.Lock()
	if t.remoteEnded && t.reset == nil {
		t.writeErr = err
		t.localEnded = true
		t.cond.Broadcast()
		t.mu.Unlock()
		t.maybeRelease()
		return
	}
	t.mu.Unlock()
	t.failResponse(err)
	t.abort(code, err, false)
}

// abort resets the stream unless it already ended: waiters wake with err,
// buffered data is dropped and the peer is told (sendRST) with code.
func (t *tunnel) abort(code http2.ErrCode, err error, sendRST bool) {
	t.mu.Lock()
	// Bytes nobody will read go back to the connection window.
	dropped := t.recv.len()
	t.recv.drop()
	clean := t.localEnded && t.remoteEnded
	if t.reset != nil || clean {
		if t.reset == nil {
			t.reset = err // later local calls fail; nothing goes to the peer
		}
		t.cond.Broadcast()
		kick := t.kickLocked()
		t.mu.Unlock()
		run(kick)
		t.c.consumed(0, dropped, 0)
		t.maybeRelease()
		return
	}
	t.reset = err
	t.cond.Broadcast()
	kick := t.kickLocked()
	t.mu.Unlock()
	run(kick)
	t.c.consumed(0, dropped, 0)
	if sendRST {
		t.c.w.control(func(fr *http2.Framer) error { return fr.WriteRSTStream(t.id, code) })
	}
	t.maybeRelease()
}

// maybeRelease removes a finished stream from its connection, once.
func (t *tunnel) maybeRelease() {
	t.mu.Lock()
	done := !t.released && (t.reset != nil || t.localEnded && t.remoteEnded)
	var hooks []func()
	if done {
		t.released = true
		hooks, t.hooks = t.hooks, nil
	}
	t.mu.Unlock()
	if done {
		t.idle.stop()
		t.c.release(t)
		for _, h := range hooks {
			h()
		}
	}
}

// onRelease runs h when the tunnel is released; false (h not run) if it
// already was.
func (t *tunnel) onRelease(h func()) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.released {
		return false
	}
	t.hooks = append(t.hooks, h)
	return true
}

// resetByPeer reports whether the peer reset the stream.
func (t *tunnel) resetByPeer() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	var re *ResetError
	return errors.As(t.reset, &re) && re.Remote
}

// received is called by the connection's reader with a DATA payload. While
// the tunnel's reader is idle and a sink is set, the payload is pushed into
// the sink; what it does not take is queued. The reader is woken only for
// queued bytes, the end or a reset. A sink that fails resets the tunnel, as
// the relay's own write error would.
func (t *tunnel) received(p []byte, end bool) {
	var pushed int
	var ack int32
	var sinkErr error
	t.mu.Lock()
	if t.reset == nil && !t.remoteEnded {
		if t.sink != nil && !t.draining && t.recv.len() == 0 && len(p) > 0 {
			pushed, sinkErr = t.push(p)
			ack = t.consumedLocked(pushed)
			p = p[pushed:]
		}
		t.recv.write(p)
		t.remoteEnded = end
	}
	if len(p) > 0 || end || t.reset != nil {
		t.cond.Broadcast()
	}
	kick := t.kickLocked()
	t.mu.Unlock()
	run(kick)
	if pushed > 0 {
		t.c.consumed(t.id, pushed, ack)
	}
	if sinkErr != nil {
		t.abort(http2.ErrCodeCancel, sinkErr, true)
		return
	}
	if len(p) > 0 || pushed > 0 {
		t.idle.touch()
	}
	if end {
		t.maybeRelease()
	}
}

// push writes what the sink takes of p at once (t.mu held). A broken sink
// is dropped and its error returned. (The socket's pending error is
// consumed by the failed write, so it must be reported here: the relay's
// other direction would only read EOF.)
func (t *tunnel) push(p []byte) (int, error) {
	n, err := t.sink.TryWrite(p)
	if err != nil {
		t.sink = nil
		return 0, fmt.Errorf("hbone: writing a tunnel's bytes to its socket: %w", err)
	}
	t.pushed += int64(n)
	return n, nil
}

// addSendWindow applies a WINDOW_UPDATE or a SETTINGS delta.
func (t *tunnel) addSendWindow(n int64) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.sendWindow += n
	if t.sendWindow > 1<<31-1 {
		return false
	}
	t.cond.Broadcast()
	return true
}

// wake lets writers re-check the connection's window.
func (t *tunnel) wake() {
	t.mu.Lock()
	t.cond.Broadcast()
	t.mu.Unlock()
}

func (t *tunnel) LocalAddr() net.Addr  { return t.local }
func (t *tunnel) RemoteAddr() net.Addr { return t.remote }

func (t *tunnel) SetDeadline(at time.Time) error {
	return errors.Join(t.setDeadline(&t.readDeadline, at), t.setDeadline(&t.writeDeadline, at))
}
func (t *tunnel) SetReadDeadline(at time.Time) error  { return t.setDeadline(&t.readDeadline, at) }
func (t *tunnel) SetWriteDeadline(at time.Time) error { return t.setDeadline(&t.writeDeadline, at) }

// chunkQueue holds received bytes in pooled chunks: memory follows the data
// actually waiting, so an idle tunnel holds none.
type chunkQueue struct {
	chunks []*[]byte // chunks[head:] hold data
	head   int
	off    int // read offset in chunks[head]
	n      int
}

const chunkSize = 16 << 10

var chunks = sync.Pool{New: func() any { b := make([]byte, 0, chunkSize); return &b }}

func (q *chunkQueue) len() int { return q.n }

func (q *chunkQueue) write(p []byte) {
	q.n += len(p)
	for len(p) > 0 {
		if len(q.chunks) == q.head || len(*q.chunks[len(q.chunks)-1]) == chunkSize {
			q.chunks = append(q.chunks, chunks.Get().(*[]byte))
		}
		last := q.chunks[len(q.chunks)-1]
		n := min(len(p), chunkSize-len(*last))
		*last = append(*last, p[:n]...)
		p = p[n:]
	}
}

func (q *chunkQueue) read(p []byte) int {
	total := 0
	for len(p) > 0 && q.head < len(q.chunks) {
		first := q.chunks[q.head]
		n := copy(p, (*first)[q.off:])
		q.off += n
		total += n
		p = p[n:]
		if q.off == len(*first) {
			q.popFirst()
		}
	}
	q.n -= total
	return total
}

func (q *chunkQueue) popFirst() {
	first := q.chunks[q.head]
	*first = (*first)[:0]
	chunks.Put(first)
	q.chunks[q.head] = nil
	q.head++
	q.off = 0
	if q.head == len(q.chunks) { // empty: reuse the slice from its start
		q.chunks, q.head = q.chunks[:0], 0
	}
}

func (q *chunkQueue) drop() {
	for q.head < len(q.chunks) {
		q.popFirst()
	}
	q.n = 0
}

// idleWatch calls onIdle once no activity was noted for timeout. Activity is
// an atomic store, so the hot path costs no timer reset.
type idleWatch struct {
	timeout time.Duration
	last    atomicTime
	timer   *time.Timer
	onIdle  func()
}

func newIdleWatch(timeout time.Duration, onIdle func()) *idleWatch {
	if timeout <= 0 {
		return nil
	}
	w := &idleWatch{timeout: timeout, onIdle: onIdle}
	w.last.store(time.Now())
	w.timer = time.AfterFunc(timeout, w.check)
	return w
}

func (w *idleWatch) touch() {
	if w != nil {
		w.last.store(time.Now())
	}
}

func (w *idleWatch) check() {
	idle := time.Since(w.last.load())
	if idle >= w.timeout {
		w.onIdle()
		return
	}
	w.timer.Reset(w.timeout - idle)
}

func (w *idleWatch) stop() {
	if w != nil {
		w.timer.Stop()
	}
}

// tunnelAddr is a net.Addr for a tunnel's ends.
type tunnelAddr string

func (a tunnelAddr) Network() string { return "hbone" }
func (a tunnelAddr) String() string  { return string(a) }

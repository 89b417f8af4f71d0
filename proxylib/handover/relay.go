package handover

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/ambientmesh/ambient/proxylib/hbone"
)

// Relay copies between an application socket and a tunnel as proxy.Relay
// does (EOF half-closes the other side, an error resets both), counting the
// bytes of the whole session, and can stop at a clean byte boundary: Pause
// stops reading the app (everything read is in the tunnel), WaitRecv waits
// until the peer's bytes are all written to the app, Detach ends the relay
// leaving the app socket open for whoever continues the session.
type Relay struct {
	app        *net.TCPConn
	tun        hbone.Stream
	sent, recv atomic.Int64

	mu         sync.Mutex
	cond       sync.Cond
	pausing    bool // Pause asked the app reader to stop
	upPaused   bool // it stopped and waits
	upEnded    bool
	downEnded  bool
	suspending bool // the tunnel's end or failure is the suspension's, not the app's
	detached   bool
	local      bool // detached by DetachLocal: the "tunnel" is a socket that stays open
	broken     bool // a direction half-closed or failed: not suspendable
	quietEnd   bool // the tunnel reader stopped for a suspension...
	quietEOF   bool // ...at the tunnel's END_STREAM
	failure    error
	// appShut/tunShut: we shut that side's writing down (after which a
	// clean EOF also leaves a TCP socket in CLOSE; see hbone.EndedByReset).
	appShut, tunShut atomic.Bool

	// Push mode, for a tunnel that pushes lazily (hbone.LazyPusher, an h2
	// tunnel): the tunnel writes what it receives into the app socket
	// itself, and a drain runs only while the socket is full or to deliver
	// the end, so no goroutine waits on an idle session's tunnel. Bytes
	// pushed are counted by the tunnel and added to recv when push mode
	// stops: at Pause (the suspension protocol runs with a reading
	// goroutine, down) or when Run ends.
	modeMu  sync.Mutex
	pusher  hbone.LazyPusher // the tunnel, in push mode
	pushOff bool             // push mode ended
	drains  int              // drains running (two overlap only as one ends and the next starts)
}

// NewRelay relays app and tun; sent and recv are the session's counts so far.
func NewRelay(app *net.TCPConn, tun hbone.Stream, sent, recv int64) *Relay {
	r := &Relay{app: app, tun: tun}
	r.cond.L = &r.mu
	r.sent.Store(sent)
	r.recv.Store(recv)
	return r
}

// Counts are the session's bytes sent into and received from the tunnel:
// exact once Pause returned or Run ended (bytes the tunnel pushes are
// counted then).
func (r *Relay) Counts() (sent, recv int64) { return r.sent.Load(), r.recv.Load() }

// Run relays until both directions end (false) or Detach (true). The tunnel
// is closed on return; the app socket only when not detached.
func (r *Relay) Run() (detached bool, err error) {
	if !r.startPushing() {
		go r.down()
	}
	r.up()
	r.mu.Lock()
	for !r.downEnded {
		r.cond.Wait()
	}
	detached, err = r.detached, r.failure
	local := r.local
	r.mu.Unlock()
	r.stopPushing()
	if !detached || !local {
		r.tun.Close() // a local pair's destination socket stays with the pair
	}
	if !detached {
		r.app.Close()
	}
	return detached, err
}

// up and down read through hbone.AdaptiveReader: an idle session holds no
// buffer, only its two parked goroutines.
func (r *Relay) up() {
	var ar hbone.AdaptiveReader
	ar.Init(r.app)
	defer ar.Release()
	for {
		p, err := ar.Read()
		if len(p) > 0 {
			w, werr := r.tun.Write(p)
			r.sent.Add(int64(w))
			if werr != nil {
				r.fail(werr)
				break
			}
		}
		ar.Used(len(p)) // after the write: it may return p to the pool
		if err == nil {
			continue
		}
		if errors.Is(err, os.ErrDeadlineExceeded) && r.parkUp() {
			continue
		}
		if errors.Is(err, io.EOF) {
			r.setBroken()
			if !r.appShut.Load() && hbone.EndedByReset(r.app) {
				r.fail(syscall.ECONNRESET) // a reset, not an end: propagate it
				break
			}
			r.tunShut.Store(true)
			if cerr := r.tun.CloseWrite(); cerr != nil {
				r.fail(cerr)
			}
			break
		}
		r.fail(err)
		break
	}
	r.mu.Lock()
	r.upEnded = true
	r.cond.Broadcast()
	r.mu.Unlock()
}

// parkUp waits while paused; true: read again, false: stop (detached).
func (r *Relay) parkUp() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.pausing {
		// A cancelled Pause's deadline (nobody else sets one): read on.
		r.app.SetReadDeadline(time.Time{})
		return true
	}
	r.upPaused = true
	r.cond.Broadcast()
	for r.pausing && !r.detached && r.failure == nil {
		r.cond.Wait()
	}
	r.upPaused = false
	if r.detached || r.failure != nil {
		return false
	}
	r.app.SetReadDeadline(time.Time{}) // under mu: a new Pause cannot interleave
	return true
}

func (r *Relay) down() {
	var ar hbone.AdaptiveReader
	ar.Init(r.tun)
	defer ar.Release()
	for {
		p, err := ar.Read()
		if len(p) > 0 && !r.deliver(p) {
			break
		}
		ar.Used(len(p))
		if err != nil && r.tunnelEnded(err) {
			break
		}
	}
	r.downDone()
}

// deliver writes p to the app; false when that failed (the relay fails).
func (r *Relay) deliver(p []byte) bool {
	w, werr := r.app.Write(p)
	r.recv.Add(int64(w))
	r.mu.Lock()
	r.cond.Broadcast()
	r.mu.Unlock()
	if werr != nil {
		r.fail(werr)
		return false
	}
	return true
}

// tunnelEnded handles the error that ended a read of the tunnel and reports
// whether the tunnel→app direction is over (false: read on).
func (r *Relay) tunnelEnded(err error) bool {
	r.mu.Lock()
	quiet := r.suspending || r.detached
	if quiet {
		r.quietEnd, r.quietEOF = true, errors.Is(err, io.EOF)
	}
	r.mu.Unlock()
	switch {
	case quiet:
		// the suspension ended the tunnel; the app stays as it is
	case errors.Is(err, os.ErrDeadlineExceeded):
		return false // a cancelled DetachLocal's deadline (nobody else sets one)
	case errors.Is(err, io.EOF):
		r.setBroken()
		if !r.tunShut.Load() && hbone.EndedByReset(r.tun) {
			r.fail(syscall.ECONNRESET)
			break
		}
		r.appShut.Store(true)
		if cerr := r.app.CloseWrite(); cerr != nil {
			r.fail(cerr)
		}
	default:
		r.fail(err)
	}
	return true
}

func (r *Relay) downDone() {
	r.mu.Lock()
	r.downEnded = true
	r.cond.Broadcast()
	r.mu.Unlock()
}

// startPushing enters push mode when the tunnel pushes lazily into a
// socket; false: down must read the tunnel.
func (r *Relay) startPushing() bool {
	lp, ok := r.tun.(hbone.LazyPusher)
	if !ok {
		return false
	}
	sink := hbone.SinkFor(r.app)
	if sink == nil {
		return false
	}
	r.modeMu.Lock()
	r.pusher = lp
	r.modeMu.Unlock()
	lp.PushLazily(sink, func() { go r.drain() })
	return true
}

// stopPushing leaves push mode (once): nothing is pushed after it, queued
// bytes and the end stay in the tunnel for one reader, and what was pushed
// is counted in recv. It reports whether a drain is running (it becomes
// that reader when it finishes); false also when push mode was not on.
func (r *Relay) stopPushing() (drainRuns bool) {
	r.modeMu.Lock()
	defer r.modeMu.Unlock()
	if r.pusher == nil || r.pushOff {
		return false
	}
	r.pushOff = true
	r.recv.Add(r.pusher.PushLazily(nil, nil))
	r.mu.Lock()
	r.cond.Broadcast()
	r.mu.Unlock()
	return r.drains > 0
}

// readFromNowOn leaves push mode for a reading goroutine, down (the mode
// the suspension protocol runs in), unless the direction already ended. It
// does not wait for a running drain, which may be blocked on a full app
// socket: that drain goes on as down.
func (r *Relay) readFromNowOn() {
	r.modeMu.Lock()
	pushing := r.pusher != nil && !r.pushOff
	r.modeMu.Unlock()
	if !pushing || r.stopPushing() {
		return
	}
	r.mu.Lock()
	ended := r.downEnded
	r.mu.Unlock()
	if !ended {
		go r.down()
	}
}

// drain writes what the tunnel queued (the app socket was full) and
// delivers the tunnel's end; the tunnel starts one at a time while
// pushing. A drain started after push mode ended does nothing; one running
// when it ended reads on as down.
func (r *Relay) drain() {
	r.modeMu.Lock()
	if r.pushOff {
		r.modeMu.Unlock()
		return
	}
	r.drains++
	lp := r.pusher
	r.modeMu.Unlock()
	open := r.drainQueue(lp)
	r.modeMu.Lock()
	r.drains--
	// The last drain to finish once push mode ended is the one reader left.
	becomeReader := open && r.pushOff && r.drains == 0
	r.modeMu.Unlock()
	switch {
	case !open:
		r.downDone()
	case becomeReader:
		r.down()
	}
}

// drainQueue delivers queued bytes until the queue is empty (true) or the
// direction ended (false).
func (r *Relay) drainQueue(lp hbone.LazyPusher) bool {
	var ar hbone.AdaptiveReader
	ar.Init(tryReader{lp})
	defer ar.Release()
	for {
		p, err := ar.Read()
		if len(p) > 0 && !r.deliver(p) {
			return false
		}
		ar.Used(len(p))
		switch {
		case err == nil:
		case errors.Is(err, hbone.ErrWouldBlock), errors.Is(err, os.ErrDeadlineExceeded):
			return true
		default:
			return !r.tunnelEnded(err)
		}
	}
}

// tryReader reads a lazily pushing tunnel's queue without waiting.
type tryReader struct{ lp hbone.LazyPusher }

func (t tryReader) Read(p []byte) (int, error) { return t.lp.TryRead(p) }

func (r *Relay) setBroken() {
	r.mu.Lock()
	r.broken = true
	r.mu.Unlock()
}

// fail aborts both sides (TCP reset, tunnel RST_STREAM), once.
func (r *Relay) fail(err error) {
	r.mu.Lock()
	if r.failure != nil || r.detached {
		r.mu.Unlock()
		return
	}
	r.failure, r.broken = err, true
	r.cond.Broadcast()
	r.mu.Unlock()
	r.app.SetLinger(0)
	r.app.Close()
	if tc, ok := r.tun.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	r.tun.Close()
}

// Fail aborts the relay (a suspension that cannot complete).
func (r *Relay) Fail(err error) { r.fail(err) }

// waitLocked waits for cond until timeout; false on timeout.
func (r *Relay) waitLocked(timeout time.Duration, cond func() bool) bool {
	expired := false
	t := time.AfterFunc(timeout, func() {
		r.mu.Lock()
		expired = true
		r.cond.Broadcast()
		r.mu.Unlock()
	})
	defer t.Stop()
	for !cond() {
		if expired {
			return false
		}
		r.cond.Wait()
	}
	return true
}

// Pause stops reading the app and returns the bytes sent into the tunnel,
// all of them written. ErrBusy when the relay cannot be suspended (a
// direction ended, or the tunnel would not take the last read in time);
// the relay then runs on.
func (r *Relay) Pause(timeout time.Duration) (int64, error) {
	r.readFromNowOn()
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.broken || r.upEnded || r.downEnded || r.pausing {
		return 0, ErrBusy
	}
	r.pausing = true
	r.app.SetReadDeadline(time.Unix(1, 0))
	if !r.waitLocked(timeout, func() bool { return r.upPaused || r.upEnded || r.failure != nil }) || !r.upPaused {
		r.unpauseLocked()
		return 0, ErrBusy
	}
	return r.sent.Load(), nil
}

// Suspending marks the tunnel's coming end (or failure) as the
// suspension's: the app is neither half-closed nor reset by it.
func (r *Relay) Suspending() {
	r.mu.Lock()
	r.suspending = true
	r.mu.Unlock()
}

// Unpause cancels a suspension that did not happen: reading resumes both
// ways.
func (r *Relay) Unpause() {
	r.mu.Lock()
	r.unpauseLocked()
	r.mu.Unlock()
}

// unpauseLocked resumes reading. A tunnel reader that stopped for the
// suspension meanwhile is undone: at END_STREAM (the peer's app ended its
// direction, not a suspension) the end is passed on; otherwise (deadline,
// reset) the reader runs again and meets whatever ended it.
func (r *Relay) unpauseLocked() {
	r.pausing, r.suspending = false, false
	r.app.SetReadDeadline(time.Time{})
	r.tun.SetReadDeadline(time.Time{})
	if r.downEnded && r.quietEnd && !r.detached {
		eof := r.quietEOF
		r.quietEnd, r.quietEOF = false, false
		if eof {
			r.broken = true
			r.appShut.Store(true)
			r.app.CloseWrite()
		} else {
			r.downEnded = false
			go r.down()
		}
	}
	r.cond.Broadcast()
}

// WaitRecv waits until n bytes were received (and written to the app).
func (r *Relay) WaitRecv(n int64, timeout time.Duration) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	ok := r.waitLocked(timeout, func() bool { return r.recv.Load() >= n || r.failure != nil })
	switch {
	case r.failure != nil:
		return r.failure
	case !ok:
		return errors.New("handover: peer's bytes not delivered in time")
	case r.recv.Load() != n:
		return ErrOffsets
	}
	return nil
}

// Detach ends a paused relay without touching the app socket: Run returns
// true. The tunnel's reader is stopped by a deadline (the peer sends
// nothing more once suspended).
func (r *Relay) Detach() {
	r.mu.Lock()
	r.detached = true
	r.cond.Broadcast()
	r.mu.Unlock()
	r.tun.SetReadDeadline(time.Unix(1, 0))
}

// DetachLocal stops both directions of a relay between two local sockets
// (the node-local fast path: "tunnel" is the destination app's socket) at a
// clean byte boundary and detaches it; both sockets stay open and idle. On
// ErrBusy nothing changed.
func (r *Relay) DetachLocal(timeout time.Duration) error {
	if _, err := r.Pause(timeout); err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.suspending = true
	r.tun.SetReadDeadline(time.Unix(1, 0))
	// broken: the destination ended its direction between Pause and here
	// (passed on already); a continuation could not know, so it stays.
	if !r.waitLocked(timeout, func() bool { return r.downEnded }) || r.failure != nil || r.broken {
		r.unpauseLocked()
		return ErrBusy
	}
	r.detached, r.local = true, true
	r.tun.SetReadDeadline(time.Time{})
	r.cond.Broadcast()
	return nil
}

// Broken reports a relay that cannot be suspended (a direction ended).
func (r *Relay) Broken() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.broken
}

// App is the application socket.
func (r *Relay) App() *net.TCPConn { return r.app }

// Tunnel is the current tunnel.
func (r *Relay) Tunnel() hbone.Stream { return r.tun }

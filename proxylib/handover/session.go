package handover

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"time"

	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/identity"
)

// Timeouts of a suspension.
const (
	// pauseTimeout bounds the wait for the app reader's last write into the
	// tunnel (a peer not reading leaves no window).
	pauseTimeout = 5 * time.Second
	// deliverTimeout bounds the wait until the other side's bytes are all
	// written to our app.
	deliverTimeout = 10 * time.Second
)

// Info says where this end of a session sends its suspend and resume: as
// Local, to the peer pod's HBONE address Resume (authority Target),
// expecting Peer.
type Info struct {
	Pod            string // uid of the captured pod whose app socket it is
	Local, Peer    identity.Identity
	Resume, Target netip.AddrPort
	Direction      string // "outbound" or "inbound"
}

// Session is one end of a resumable tunnel: the relay serving it now and
// what continues it after a suspension.
type Session struct {
	reg   *Registry
	entry *Entry
	Info  Info

	mu    sync.Mutex
	relay *Relay
	next  chan step
}

// step is what follows a detached relay: a new tunnel, or the end.
type step struct {
	tun hbone.Stream
	err error
}

// NewSession registers a live session at epoch, relaying app and tun from
// the counts sent and recv.
func (reg *Registry) NewSession(id ID, epoch uint64, info Info, app *net.TCPConn, tun hbone.Stream, sent, recv int64) (*Session, error) {
	s := &Session{reg: reg, Info: info, relay: NewRelay(app, tun, sent, recv), next: make(chan step, 1)}
	e, ok := reg.Add(id, info.Peer, epoch, s)
	if !ok {
		return nil, fmt.Errorf("handover: session %s already registered", id)
	}
	s.entry = e
	return s, nil
}

// ID is the session's id.
func (s *Session) ID() ID { return s.entry.ID }

// Relay is the current relay.
func (s *Session) Relay() *Relay {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.relay
}

// Serve relays until the connection ends here: it ended, or it was handed
// over (Finish) or resumed elsewhere. A suspension in between continues on
// the next tunnel (Continue). It returns the session's byte counts.
func (s *Session) Serve() (sent, recv int64, err error) {
	defer s.reg.Remove(s.entry)
	for {
		r := s.Relay()
		detached, err := r.Run()
		sent, recv = r.Counts()
		if !detached {
			return sent, recv, err
		}
		st := <-s.next
		if st.tun == nil {
			return sent, recv, st.err
		}
		s.mu.Lock()
		s.relay = NewRelay(r.App(), st.tun, sent, recv)
		s.mu.Unlock()
	}
}

// Continue resumes a suspended session on tun.
func (s *Session) Continue(tun hbone.Stream) { s.next <- step{tun: tun} }

// Finish ends a suspended session here (handed over: err nil).
func (s *Session) Finish(err error) { s.next <- step{err: err} }

// Close ends a parked session that was never resumed (Registry's expiry).
func (s *Session) Close() error {
	s.Relay().App().Close()
	s.Finish(ErrExpired)
	return nil
}

// SuspendedByPeer serves the peer's suspend (it sent sent bytes): stop
// reading the app, wait until those bytes are delivered, end our direction
// of the tunnel after our last byte, and park. It returns what we sent. On
// ErrBusy nothing changed.
func (s *Session) SuspendedByPeer(p Params) (int64, error) {
	r := s.Relay()
	mine, err := r.Pause(pauseTimeout)
	if err != nil {
		return 0, err
	}
	r.Suspending()
	if err := r.WaitRecv(p.Sent, deliverTimeout); err != nil {
		r.Unpause()
		return 0, fmt.Errorf("%w: %v", ErrBusy, err)
	}
	if r.Broken() {
		r.Unpause()
		return 0, ErrBusy
	}
	// END_STREAM after our last byte: the peer reads all of it (a later
	// Close is RST_STREAM(NO_ERROR), which keeps it readable).
	if err := r.Tunnel().CloseWrite(); err != nil {
		r.Unpause()
		return 0, fmt.Errorf("%w: %v", ErrBusy, err)
	}
	r.Detach()
	s.reg.Park(s.entry, mine, p.Sent, s)
	return mine, nil
}

// Dial sends a CONNECT with header h along the session's Info and returns
// the 200's headers (or a refusal as an error).
type Dial func(h http.Header) (http.Header, error)

// Suspend stops the session here at a clean byte boundary (this end is
// being upgraded): it stops reading the app, asks the peer to suspend, and
// waits until the peer's bytes are all delivered. It returns the counts to
// resume from; the app socket is then idle and still open. When the peer
// refused, the relay runs on and err says why; when the suspension cannot
// complete the connection is failed.
func (s *Session) Suspend(dial Dial) (Params, error) {
	r := s.Relay()
	sent, err := r.Pause(pauseTimeout)
	if err != nil {
		return Params{}, err
	}
	r.Suspending()
	p := Params{ID: s.entry.ID, Epoch: s.reg.Epoch(s.entry), Sent: sent}
	h, err := dial(http.Header{HeaderSuspend: {FormatSuspend(p)}})
	if err != nil {
		r.Unpause()
		return Params{}, err
	}
	ans, err := ParseSuspend(h.Get(HeaderSuspend))
	if err == nil && (ans.ID != p.ID || ans.Epoch != p.Epoch) {
		err = fmt.Errorf("%w: answer for another session or epoch", ErrMalformed)
	}
	if err == nil {
		err = r.WaitRecv(ans.Sent, 3*deliverTimeout)
	}
	if err != nil {
		// The peer is parked: nothing can carry on this relay.
		r.Fail(err)
		return Params{}, err
	}
	r.Detach()
	p.Recv = ans.Sent
	return p, nil
}

// Local reports a node-local pair (both sockets here, no peer to ask).
func (s *Session) Local() bool { return s.Info.Direction == DirectionLocal }

// SuspendLocal stops a node-local pair at a clean byte boundary: both
// sockets are then idle and open, to be handed over together.
func (s *Session) SuspendLocal() error { return s.Relay().DetachLocal(pauseTimeout) }

// Resumed notes a resume this end made (the peer's epoch moved on too).
func (s *Session) Resumed() {
	s.reg.mu.Lock()
	s.entry.epoch++
	s.reg.mu.Unlock()
}

// ResumeHeader is the header resuming from p.
func ResumeHeader(p Params) http.Header {
	return http.Header{HeaderResume: {FormatResume(p)}}
}

// Sessions lists the live (not parked) sessions.
func (reg *Registry) Sessions() []*Session {
	reg.mu.Lock()
	defer reg.mu.Unlock()
	var out []*Session
	for _, e := range reg.live {
		if s, ok := e.Value.(*Session); ok && e.state == live {
			out = append(out, s)
		}
	}
	return out
}

// ErrNoSession: the peer did not answer the offer (an Istio peer).
var ErrNoSession = errors.New("handover: peer did not accept a session")

// Answered reads the session answer of a dialed tunnel.
func Answered(tun hbone.Stream) (ID, error) {
	rh, ok := tun.(hbone.ResponseHeaderer)
	if !ok {
		return ID{}, ErrNoSession
	}
	v := rh.ResponseHeader().Get(HeaderSession)
	if v == "" {
		return ID{}, ErrNoSession
	}
	return ParseAnswer(v)
}

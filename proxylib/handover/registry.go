package handover

import (
	"errors"
	"io"
	"net/http"
	"sync"
	"time"

	"github.com/ambientmesh/ambient/proxylib/identity"
)

// ParkTTL is how long a parked application socket waits for its resume
// before it is closed.
const ParkTTL = 30 * time.Second

// tombTTL is how long an expired session's id is remembered, so a late
// resume is refused as expired rather than as unknown.
const tombTTL = 10 * time.Minute

// Refusals of a suspend or resume (docs/interfaces.md).
var (
	ErrUnknown   = errors.New("handover: unknown session")
	ErrWrongPeer = errors.New("handover: caller is not the session's peer")
	ErrReplayed  = errors.New("handover: session epoch already resumed")
	ErrNotParked = errors.New("handover: session is not parked at this epoch")
	ErrOffsets   = errors.New("handover: byte offsets do not match the parked session")
	ErrExpired   = errors.New("handover: parked session expired")
	ErrBusy      = errors.New("handover: session cannot be suspended now")
)

// Status is the HTTP status a refusal is answered with.
func Status(err error) int {
	switch {
	case errors.Is(err, ErrWrongPeer):
		return http.StatusForbidden
	case errors.Is(err, ErrUnknown), errors.Is(err, ErrExpired):
		return http.StatusNotFound
	case errors.Is(err, ErrMalformed):
		return http.StatusBadRequest
	}
	return http.StatusConflict
}

type state int

const (
	live state = iota
	parked
)

// Entry is one resumable session at this end of its tunnel.
type Entry struct {
	ID   ID
	Peer identity.Identity // the tunnel peer's verified identity
	// Value is the owner's handle (the relay serving the session).
	Value any

	epoch      uint64
	state      state
	sent, recv int64     // parked: the counts agreed at the suspension
	parked     io.Closer // parked: closed on expiry
	timer      *time.Timer
}

// Registry holds one process's resumable sessions. The zero value is not
// usable; NewRegistry.
type Registry struct {
	ttl   time.Duration
	mu    sync.Mutex
	live  map[ID]*Entry
	tombs map[ID]tomb
	swept time.Time // last pruneLocked sweep
}

type tomb struct {
	err error // what a resume is told
	at  time.Time
}

// NewRegistry returns a registry whose parked sessions expire after ttl
// (ParkTTL when 0).
func NewRegistry(ttl time.Duration) *Registry {
	if ttl <= 0 {
		ttl = ParkTTL
	}
	return &Registry{ttl: ttl, live: map[ID]*Entry{}, tombs: map[ID]tomb{}}
}

// Add registers a live session at epoch; false if the id is taken.
func (r *Registry) Add(id ID, peer identity.Identity, epoch uint64, value any) (*Entry, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.live[id]; ok {
		return nil, false
	}
	if _, ok := r.tombs[id]; ok {
		return nil, false
	}
	e := &Entry{ID: id, Peer: peer, Value: value, epoch: epoch}
	r.live[id] = e
	return e, true
}

// Remove forgets a session that ended. Its id is not remembered (a resume
// of it is refused as unknown; ids are random, so never issued again):
// remembering every ended connection would cost memory per connection.
func (r *Registry) Remove(e *Entry) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.live[e.ID] != e {
		return
	}
	if e.timer != nil {
		e.timer.Stop()
	}
	delete(r.live, e.ID)
}

// Epoch is the session's current epoch.
func (r *Registry) Epoch(e *Entry) uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return e.epoch
}

// Find returns the live (not parked) session id at epoch for a suspend
// from caller.
func (r *Registry) Find(id ID, caller identity.Identity, epoch uint64) (*Entry, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	e, err := r.lookupLocked(id, caller, epoch)
	if err != nil {
		return nil, err
	}
	if e.state != live {
		return nil, ErrNotParked
	}
	return e, nil
}

// lookupLocked applies the checks every suspend and resume passes: the id
// is known, the caller is its peer, the epoch is not a past one.
func (r *Registry) lookupLocked(id ID, caller identity.Identity, epoch uint64) (*Entry, error) {
	r.pruneLocked(time.Now())
	e := r.live[id]
	if e == nil {
		if t, ok := r.tombs[id]; ok {
			return nil, t.err
		}
		return nil, ErrUnknown
	}
	if e.Peer != caller {
		return nil, ErrWrongPeer
	}
	if epoch < e.epoch {
		return nil, ErrReplayed
	}
	if epoch > e.epoch {
		return nil, ErrNotParked
	}
	return e, nil
}

// Park marks e suspended with the agreed counts (sent and received here)
// and holds sock until a resume claims it, or closes it after the TTL.
func (r *Registry) Park(e *Entry, sent, recv int64, sock io.Closer) {
	r.mu.Lock()
	defer r.mu.Unlock()
	e.state, e.sent, e.recv, e.parked = parked, sent, recv, sock
	e.timer = time.AfterFunc(r.ttl, func() { r.expire(e) })
}

func (r *Registry) expire(e *Entry) {
	r.mu.Lock()
	if r.live[e.ID] != e || e.state != parked {
		r.mu.Unlock()
		return
	}
	delete(r.live, e.ID)
	r.tombLocked(e.ID, ErrExpired)
	sock := e.parked
	r.mu.Unlock()
	sock.Close()
}

// Claim takes a parked session for a resume: caller must be the session's
// peer, at its epoch, with its counts mirroring ours (what it sent is what
// we received, and the reverse). On success the session is live again at
// the next epoch and the caller owns the parked socket; on a refusal the
// session stays parked until its TTL (a failed resume never costs the
// connection a fall-back would keep).
func (r *Registry) Claim(p Params, caller identity.Identity) (*Entry, io.Closer, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	e, err := r.lookupLocked(p.ID, caller, p.Epoch)
	if err != nil {
		return nil, nil, err
	}
	if e.state != parked {
		return nil, nil, ErrNotParked
	}
	if p.Sent != e.recv || p.Recv != e.sent {
		return nil, nil, ErrOffsets
	}
	e.timer.Stop()
	sock := e.parked
	e.state, e.parked, e.timer = live, nil, nil
	e.epoch++
	return e, sock, nil
}

// Len counts the sessions held (live and parked).
func (r *Registry) Len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.live)
}

func (r *Registry) tombLocked(id ID, err error) {
	r.tombs[id] = tomb{err: err, at: time.Now()}
}

func (r *Registry) pruneLocked(now time.Time) {
	if now.Sub(r.swept) < time.Minute {
		return
	}
	r.swept = now
	for id, t := range r.tombs {
		if now.Sub(t.at) > tombTTL {
			delete(r.tombs, id)
		}
	}
}

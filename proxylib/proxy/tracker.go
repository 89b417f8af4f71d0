package proxy

import (
	"context"
	"sync"

	"github.com/ambientmesh/ambient/proxylib/proxyerr"
	"github.com/ambientmesh/ambient/proxylib/rbac"
)

// Tracker knows every open connection so it can close the ones a new policy
// no longer allows (re-evaluated at the destination) and drain on shutdown.
type Tracker struct {
	mu     sync.Mutex
	conns  map[uint64]*tracked
	next   uint64
	closed bool
	empty  chan struct{} // closed when conns becomes empty after Drain started
}

type tracked struct {
	// DstUID is the local destination workload (inbound and fast path);
	// empty for outbound-only connections, which are not re-authorized here.
	dstUID string
	conn   rbac.Conn
	owner  string // uid of the pod whose listener accepted it
	close  func(reason proxyerr.Reason)
}

// NewTracker returns an empty tracker.
func NewTracker() *Tracker { return &Tracker{conns: map[uint64]*tracked{}} }

// Add registers a connection; remove must be called when it ends. It fails
// with Draining once Drain started.
func (t *Tracker) Add(owner, dstUID string, c rbac.Conn, closeFn func(proxyerr.Reason)) (remove func(), err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil, proxyerr.New(proxyerr.Draining, "proxy is draining")
	}
	t.next++
	id := t.next
	t.conns[id] = &tracked{dstUID: dstUID, conn: c, owner: owner, close: closeFn}
	return func() {
		t.mu.Lock()
		defer t.mu.Unlock()
		delete(t.conns, id)
		if t.empty != nil && len(t.conns) == 0 {
			close(t.empty)
			t.empty = nil
		}
	}, nil
}

// Len is the number of open connections.
func (t *Tracker) Len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.conns)
}

// Revalidate closes every connection to a local destination that allowed
// reports as no longer permitted. It returns how many were closed.
func (t *Tracker) Revalidate(allowed func(dstUID string, c rbac.Conn) bool) int {
	var victims []*tracked
	t.mu.Lock()
	for _, c := range t.conns {
		if c.dstUID != "" && !allowed(c.dstUID, c.conn) {
			victims = append(victims, c)
		}
	}
	t.mu.Unlock()
	for _, v := range victims {
		v.close(proxyerr.PolicyChanged)
	}
	return len(victims)
}

// CloseOwned force-closes the connections accepted by pod owner (its
// listeners are gone).
func (t *Tracker) CloseOwned(owner string, reason proxyerr.Reason) {
	var victims []*tracked
	t.mu.Lock()
	for _, c := range t.conns {
		if c.owner == owner {
			victims = append(victims, c)
		}
	}
	t.mu.Unlock()
	for _, v := range victims {
		v.close(reason)
	}
}

// Drain waits for open connections to finish until ctx ends, then
// force-closes the rest, and refuses new ones from then on. It reports
// whether all finished in time. The caller has closed its listeners first;
// connections they accepted just before may still register while Drain
// waits (refusing them would fail a connection the client already has).
func (t *Tracker) Drain(ctx context.Context) bool {
	t.mu.Lock()
	for len(t.conns) > 0 {
		if t.empty == nil {
			t.empty = make(chan struct{})
		}
		empty := t.empty
		t.mu.Unlock()
		select {
		case <-empty:
			t.mu.Lock()
			continue
		case <-ctx.Done():
		}
		t.mu.Lock()
		t.closed = true
		victims := make([]*tracked, 0, len(t.conns))
		for _, c := range t.conns {
			victims = append(victims, c)
		}
		t.mu.Unlock()
		for _, v := range victims {
			v.close(proxyerr.Draining)
		}
		return false
	}
	t.closed = true
	t.mu.Unlock()
	return true
}

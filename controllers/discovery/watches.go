package discovery

import (
	"sync"

	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
)

// deltaWatch is one open delta watch of a cache of ours.
type deltaWatch interface {
	request() *cachev3.DeltaRequest
	output() chan cachev3.DeltaResponse
}

func (w *addrWatch) request() *cachev3.DeltaRequest       { return w.req }
func (w *addrWatch) output() chan cachev3.DeltaResponse   { return w.out }
func (w *scopedWatch) request() *cachev3.DeltaRequest     { return w.req }
func (w *scopedWatch) output() chan cachev3.DeltaResponse { return w.out }

// watchSet holds a cache's open delta watches, guarded by the cache's mu.
// respond builds a watch's response, or nil when it has nothing to say
// (force: answer even an empty diff).
type watchSet[W deltaWatch] struct {
	mu      *sync.Mutex
	respond func(w W, force bool) cachev3.DeltaResponse
	next    uint64
	open    map[uint64]W
}

func newWatchSet[W deltaWatch](mu *sync.Mutex, respond func(W, bool) cachev3.DeltaResponse) watchSet[W] {
	return watchSet[W]{mu: mu, respond: respond, open: map[uint64]W{}}
}

// watch answers w at once when its client lacks something, or this is its
// first request, or it asked for names; else it keeps w until a change
// (answer). Called with mu held.
func (s *watchSet[W]) watch(w W) func() {
	req := w.request()
	if resp := s.respond(w, req.GetResponseNonce() == "" || len(req.GetResourceNamesSubscribe()) > 0); resp != nil {
		w.output() <- resp
		return nil
	}
	s.next++
	id := s.next
	s.open[id] = w
	return func() {
		s.mu.Lock()
		delete(s.open, id)
		s.mu.Unlock()
	}
}

// answer sends each open watch that sees a difference its response (and
// closes it). Called with mu held.
func (s *watchSet[W]) answer() {
	for id, w := range s.open {
		if resp := s.respond(w, false); resp != nil {
			w.output() <- resp
			delete(s.open, id)
		}
	}
}

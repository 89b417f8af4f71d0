// Package kubeevents emits Kubernetes Events for what an operator acts on,
// once per change rather than once per reconcile: a Recorder remembers the
// last state it reported for each object and topic and stays quiet while
// the state holds, and a token bucket per object bounds bursts. client-go's
// events broadcaster then folds any repeats into an Event series.
package kubeevents

import (
	"fmt"
	"sync"
	"time"
	"unicode/utf8"

	"golang.org/x/time/rate"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/tools/events"
)

// Event types (the values of events.k8s.io/v1 Event.type).
const (
	Normal  = "Normal"
	Warning = "Warning"
)

// MaxNote is the longest note the API server accepts (events.k8s.io/v1
// validation); client-go does not shorten notes itself.
const MaxNote = 1024

// Truncate shortens note to MaxNote bytes at a character boundary, ending
// it with an ellipsis when cut.
func Truncate(note string) string {
	if len(note) <= MaxNote {
		return note
	}
	const ellipsis = "…"
	cut := MaxNote - len(ellipsis)
	for cut > 0 && !utf8.RuneStart(note[cut]) {
		cut--
	}
	return note[:cut] + ellipsis
}

// Event is what is recorded: type, a CamelCase reason, the action taken
// (events.k8s.io/v1 requires one) and a human-readable note.
type Event struct {
	Type, Reason, Action, Note string
}

// Change is a state an object is now in, for one topic (capture,
// readiness, ...). The event is recorded when State differs from the last
// state recorded for the object and topic; Assume is the previous state to
// take when none is remembered (read from the object, e.g. after a
// restart), "" when unknown. A Change without a Reason records nothing and
// forgets the topic's state (the object is back to an unremarkable state).
type Change struct {
	Topic, Assume, State string
	Event
}

// Defaults of the per-object token bucket, client-go's legacy spam filter's
// burst with a faster refill (events here are transitions, not repeats).
const (
	DefaultBurst = 25
	DefaultEvery = time.Minute
)

// Recorder records events through a client-go events recorder. The zero
// value and a nil *Recorder record nothing.
type Recorder struct {
	rec   events.EventRecorder
	burst int
	every time.Duration

	mu     sync.Mutex
	last   map[stateKey]string
	limits map[string]*rate.Limiter
}

type stateKey struct{ object, topic string }

// New wraps rec (nil: record nothing) with the default rate limit.
func New(rec events.EventRecorder) *Recorder {
	return NewWithLimit(rec, DefaultBurst, DefaultEvery)
}

// NewWithLimit wraps rec allowing burst events per object, refilled one per every.
func NewWithLimit(rec events.EventRecorder, burst int, every time.Duration) *Recorder {
	return &Recorder{rec: rec, burst: burst, every: every, last: map[stateKey]string{}, limits: map[string]*rate.Limiter{}}
}

// Transition records c.Event when obj's state for c.Topic changed; it
// reports whether it recorded. A change held back by the rate limit is not
// remembered, so a later call with the same state records it.
func (r *Recorder) Transition(obj runtime.Object, c Change) bool {
	if r == nil || r.rec == nil {
		return false
	}
	if !r.changed(stateKey{objectKey(obj), c.Topic}, c) {
		return false
	}
	r.rec.Eventf(obj, nil, c.Type, c.Reason, c.Action, "%s", Truncate(c.Note))
	return true
}

// changed remembers c's state and reports whether it is to be recorded.
func (r *Recorder) changed(key stateKey, c Change) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	prev, known := r.last[key]
	if !known {
		prev = c.Assume // nothing stored while the object stays as assumed
	}
	if prev == c.State {
		return false
	}
	if c.Reason == "" { // a state not worth an event: start over
		delete(r.last, key)
		return false
	}
	if !r.allow(key.object) {
		return false
	}
	r.last[key] = c.State
	return true
}

// Emit records a one-off event (an action just taken), rate limited per object.
func (r *Recorder) Emit(obj runtime.Object, e Event) bool {
	if r == nil || r.rec == nil {
		return false
	}
	r.mu.Lock()
	ok := r.allow(objectKey(obj))
	r.mu.Unlock()
	if ok {
		r.rec.Eventf(obj, nil, e.Type, e.Reason, e.Action, "%s", Truncate(e.Note))
	}
	return ok
}

// Forget drops what is remembered about obj (it is gone): its states and
// its token bucket.
func (r *Recorder) Forget(obj runtime.Object) {
	if r == nil {
		return
	}
	r.ForgetKey(objectKey(obj))
}

// ForgetKey is Forget by the key of Key.
func (r *Recorder) ForgetKey(key string) {
	if r == nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for k := range r.last {
		if k.object == key {
			delete(r.last, k)
		}
	}
	delete(r.limits, key)
}

// Key is the identity the Recorder keeps state under: Go type and
// namespace/name (a recreated object of the same name continues the
// state, which its own first transition overwrites).
func Key(typ any, namespace, name string) string {
	return fmt.Sprintf("%T %s/%s", typ, namespace, name)
}

func objectKey(obj runtime.Object) string {
	m, err := meta.Accessor(obj)
	if err != nil {
		return fmt.Sprintf("%T", obj)
	}
	return Key(obj, m.GetNamespace(), m.GetName())
}

// allow takes a token from the object's bucket; r.mu is held.
func (r *Recorder) allow(object string) bool {
	l := r.limits[object]
	if l == nil {
		l = rate.NewLimiter(rate.Every(r.every), r.burst)
		r.limits[object] = l
	}
	return l.Allow()
}

package kubeevents

import (
	"fmt"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
)

// recorded collects what reaches the client-go recorder.
type recorded struct{ reasons []string }

func (r *recorded) Eventf(obj runtime.Object, _ runtime.Object, typ, reason, action, note string, args ...any) {
	m := obj.(metav1.Object)
	r.reasons = append(r.reasons, fmt.Sprintf("%s/%s %s %s %s", m.GetNamespace(), m.GetName(), typ, reason, fmt.Sprintf(note, args...)))
}

func pod(name string) *corev1.Pod {
	return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "app", Name: name}}
}

func change(state, assume string) Change {
	return Change{Topic: "capture", Assume: assume, State: state, Event: Event{Type: Normal, Reason: "Is" + state, Action: "Sync", Note: state}}
}

func TestTransition(t *testing.T) {
	type step struct {
		obj    *corev1.Pod
		c      Change
		forget bool
		want   bool
	}
	tests := []struct {
		name  string
		steps []step
	}{
		{"first state is recorded, repeats are not", []step{
			{obj: pod("a"), c: change("Captured", ""), want: true},
			{obj: pod("a"), c: change("Captured", ""), want: false},
			{obj: pod("a"), c: change("Captured", ""), want: false},
		}},
		{"each change is recorded", []step{
			{obj: pod("a"), c: change("Captured", ""), want: true},
			{obj: pod("a"), c: change("Released", ""), want: true},
			{obj: pod("a"), c: change("Captured", ""), want: true},
		}},
		{"assumed state suppresses the first report", []step{
			{obj: pod("a"), c: change("Captured", "Captured"), want: false},
			{obj: pod("a"), c: change("Released", "Captured"), want: true},
		}},
		{"objects and topics are independent", []step{
			{obj: pod("a"), c: change("Captured", ""), want: true},
			{obj: pod("b"), c: change("Captured", ""), want: true},
			{obj: pod("a"), c: Change{Topic: "other", State: "Captured", Event: Event{Type: Normal, Reason: "X", Action: "Y"}}, want: true},
		}},
		{"forget starts over", []step{
			{obj: pod("a"), c: change("Captured", ""), want: true},
			{obj: pod("a"), forget: true},
			{obj: pod("a"), c: change("Captured", ""), want: true},
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rec := &recorded{}
			r := New(rec)
			for i, s := range tc.steps {
				if s.forget {
					r.Forget(s.obj)
					continue
				}
				if got := r.Transition(s.obj, s.c); got != s.want {
					t.Fatalf("step %d: recorded %v, want %v (so far %v)", i, got, s.want, rec.reasons)
				}
			}
		})
	}
}

// TestRateLimit: a flapping object is cut off after the burst; a held-back
// change is recorded once a token is back.
func TestRateLimit(t *testing.T) {
	rec := &recorded{}
	r := NewWithLimit(rec, 3, time.Hour)
	states := []string{"Captured", "Released"}
	for i := range 10 {
		r.Transition(pod("a"), change(states[i%2], ""))
	}
	if len(rec.reasons) != 3 {
		t.Fatalf("recorded %d events, want the burst of 3: %v", len(rec.reasons), rec.reasons)
	}
	if !r.Emit(pod("b"), Event{Type: Warning, Reason: "Other", Action: "Sync"}) {
		t.Fatal("another object shares the first one's bucket")
	}
	// The tenth state (Released) was held back, not remembered.
	delete(r.limits, Key(pod("a"), "app", "a"))
	if !r.Transition(pod("a"), change("Released", "")) {
		t.Fatal("held-back change not recorded once tokens are back")
	}
}

func TestNilRecorder(t *testing.T) {
	var r *Recorder
	if r.Transition(pod("a"), change("Captured", "")) || r.Emit(pod("a"), Event{}) {
		t.Fatal("nil recorder recorded")
	}
	r.Forget(pod("a"))
	if New(nil).Transition(pod("a"), change("Captured", "")) {
		t.Fatal("recorder without a client-go recorder recorded")
	}
}

func TestTruncate(t *testing.T) {
	tests := []struct {
		name, in string
	}{
		{"short", "policy dropped rule 1"},
		{"exactly the limit", strings.Repeat("a", MaxNote)},
		{"ascii over", strings.Repeat("a", MaxNote+10)},
		{"multi-byte at the cut", strings.Repeat("é", MaxNote)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := Truncate(tc.in)
			if len(got) > MaxNote || !utf8.ValidString(got) {
				t.Fatalf("%d bytes, valid UTF-8 %v", len(got), utf8.ValidString(got))
			}
			if (got == tc.in) != (len(tc.in) <= MaxNote) {
				t.Fatalf("cut %v for %d bytes", got != tc.in, len(tc.in))
			}
		})
	}
}

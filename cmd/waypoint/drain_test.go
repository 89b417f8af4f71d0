package main

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-logr/logr/testr"
)

// shutdownRecorder stands in for the HBONE server: it records when
// Shutdown came and the deadline it got.
type shutdownRecorder struct {
	at       time.Time
	deadline time.Time
	draining bool
	flag     *atomic.Bool
}

func (r *shutdownRecorder) Shutdown(ctx context.Context) error {
	r.at = time.Now()
	r.deadline, _ = ctx.Deadline()
	r.draining = r.flag.Load()
	return nil
}

// TestDrainKeepsAcceptingForTheDelay: on SIGTERM the waypoint reports not
// ready at once but stops accepting tunnels only after the delay (clients
// still route to it until the control plane says it is going), and the
// in-flight tunnels get the rest of the grace period. Before the delay
// existed, Shutdown came immediately and the lab's waypoint-replica
// chaos scenario lost requests.
func TestDrainKeepsAcceptingForTheDelay(t *testing.T) {
	for _, tc := range []struct {
		name         string
		delay, grace time.Duration
		wantDelay    time.Duration
	}{
		{"delay then shutdown", 200 * time.Millisecond, 10 * time.Second, 200 * time.Millisecond},
		{"delay capped at half the grace", 5 * time.Second, 400 * time.Millisecond, 200 * time.Millisecond},
		{"no delay", 0, time.Second, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var draining atomic.Bool
			rec := &shutdownRecorder{flag: &draining}
			start := time.Now()
			drain(testr.New(t), rec, &draining, tc.delay, tc.grace)
			if !rec.draining {
				t.Error("readiness still true when the listener closed")
			}
			if waited := rec.at.Sub(start); waited < tc.wantDelay {
				t.Errorf("Shutdown after %s, want at least the %s delay", waited, tc.wantDelay)
			}
			if left := rec.deadline.Sub(rec.at); left > tc.grace-tc.wantDelay || left <= 0 {
				t.Errorf("in-flight tunnels got %s, want at most grace %s less the delay %s", left, tc.grace, tc.wantDelay)
			}
		})
	}
}

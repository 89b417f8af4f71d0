package workerthreads

import (
	"context"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-logr/logr"
)

func TestNext(t *testing.T) {
	for _, tc := range []struct {
		name              string
		cur, limit        int
		used              float64
		idleRun           int
		want, wantIdleRun int
	}{
		{"light load stays on one thread", 1, 4, 0.10, 0, 1, 0},
		{"one busy thread gets a second", 1, 4, 0.90, 0, 2, 0},
		{"a saturated pair jumps to cover the use with headroom", 2, 8, 1.90, 0, 3, 0},
		{"heavy use jumps further", 1, 8, 3.10, 0, 5, 0},
		{"never past the limit", 2, 2, 1.95, 0, 2, 0},
		{"limit 1 is fixed", 1, 1, 1.00, 0, 1, 0},
		{"a light sample starts the idle run", 3, 4, 0.30, 0, 3, 1},
		{"the fourth light sample in a row removes one thread", 3, 4, 0.30, 3, 2, 0},
		{"a busier sample ends the idle run", 3, 4, 1.00, 2, 3, 0},
		{"one thread is the floor", 1, 4, 0.00, 10, 1, 0},
		{"use one thread fewer could not carry keeps the count", 2, 4, 0.60, 3, 2, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, run := Next(tc.cur, tc.limit, tc.used, tc.idleRun)
			if got != tc.want || run != tc.wantIdleRun {
				t.Fatalf("Next(%d, %d, %.2f, %d) = %d, %d; want %d, %d", tc.cur, tc.limit, tc.used, tc.idleRun, got, run, tc.want, tc.wantIdleRun)
			}
		})
	}
}

// run follows the CPU it is shown: up to the limit while busy, back to one
// thread after a quiet second.
func TestRunFollowsLoad(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(0))
	var cpu atomic.Int64
	ticks := make(chan time.Time)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		run(ctx, 3, logr.Discard(), func() time.Duration { return time.Duration(cpu.Load()) }, ticks)
		close(done)
	}()
	at := time.Unix(0, 0)
	// step advances the clock one interval with the process using cores.
	step := func(cores float64) {
		at = at.Add(Interval)
		cpu.Add(int64(cores * float64(Interval)))
		ticks <- at
	}
	step(0) // first sample: the baseline
	if got := runtime.GOMAXPROCS(0); got != 1 {
		t.Fatalf("GOMAXPROCS %d at start, want 1", got)
	}
	step(1.0)
	step(0) // run applied the previous sample before taking this one
	if got := runtime.GOMAXPROCS(0); got != 2 {
		t.Fatalf("GOMAXPROCS %d after a busy interval, want 2", got)
	}
	step(1.9)
	step(1.9)
	if got := runtime.GOMAXPROCS(0); got != 3 {
		t.Fatalf("GOMAXPROCS %d while two threads are saturated, want the limit 3", got)
	}
	for range idleSamples + 1 {
		step(0.05)
	}
	if got := runtime.GOMAXPROCS(0); got != 2 {
		t.Fatalf("GOMAXPROCS %d after a quiet second, want one fewer (2)", got)
	}
	cancel()
	<-done
}

func TestRunWithLimitOneIsFixed(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(0))
	runtime.GOMAXPROCS(2)
	run(context.Background(), 1, logr.Discard(), func() time.Duration { return 0 }, nil)
	if got := runtime.GOMAXPROCS(0); got != 1 {
		t.Fatalf("GOMAXPROCS %d, want 1", got)
	}
}

// Package workerthreads sizes the Go scheduler (GOMAXPROCS) of a proxy to
// its load: one thread while one is enough, more (up to a maximum) while
// the process is busy.
//
// Why: a proxy spends most of its time waiting for sockets. With idle
// scheduler threads available, every goroutine woken by the poller also
// wakes an idle thread to look for more work (a futex wake and a short spin
// that finds nothing). At a thousand requests per second that is a quarter
// of the proxy's CPU and tens of microseconds of latency per hop. One
// thread avoids it; bulk transfers and bursts still get the maximum.
package workerthreads

import (
	"context"
	"runtime"
	"syscall"
	"time"

	"github.com/go-logr/logr"
)

// Interval is how often CPU use is sampled.
const Interval = 250 * time.Millisecond

const (
	// busy: a sample above this share of the current threads adds threads.
	busy = 0.75
	// idle: samples below this share of one thread fewer remove one.
	idle = 0.40
	// idleSamples in a row are needed to remove a thread (1 s): bursts do
	// not make the count flap.
	idleSamples = 4
)

// Next returns the thread count after a sample of used CPU (in cores, over
// the last interval) with cur threads running, and the updated count of
// consecutive idle samples. Threads are added at once, up to max, to cover
// the use seen with headroom; they are removed one at a time after a
// second of use that one thread fewer would carry.
func Next(cur, limit int, used float64, idleRun int) (threads, idleRunOut int) {
	switch {
	case used > busy*float64(cur) && cur < limit:
		want := int(used/busy) + 1
		return min(max(want, cur+1), limit), 0
	case cur > 1 && used < idle*float64(cur-1):
		if idleRun+1 >= idleSamples {
			return cur - 1, 0
		}
		return cur, idleRun + 1
	default:
		return cur, 0
	}
}

// Run adapts GOMAXPROCS between 1 and maxThreads until ctx ends, starting
// at 1. maxThreads < 2 just sets GOMAXPROCS to 1 and returns.
func Run(ctx context.Context, maxThreads int, log logr.Logger) {
	tick := time.NewTicker(Interval)
	defer tick.Stop()
	run(ctx, maxThreads, log, cpuTime, tick.C)
}

// run is Run with its clock and CPU meter given: each tick carries the
// time of the sample, cpu the process's CPU time then.
func run(ctx context.Context, maxThreads int, log logr.Logger, cpu func() time.Duration, ticks <-chan time.Time) {
	runtime.GOMAXPROCS(1)
	if maxThreads < 2 {
		return
	}
	cur, idleRun := 1, 0
	lastCPU, lastAt := cpu(), time.Time{}
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-ticks:
			c := cpu()
			if !lastAt.IsZero() {
				used := float64(c-lastCPU) / float64(now.Sub(lastAt))
				var next int
				next, idleRun = Next(cur, maxThreads, used, idleRun)
				if next != cur {
					runtime.GOMAXPROCS(next)
					log.V(1).Info("worker threads", "from", cur, "to", next, "cpu", used)
					cur = next
				}
			}
			lastCPU, lastAt = c, now
		}
	}
}

// cpuTime is the process's user plus system CPU time so far.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

package lb

import (
	"sync"
	"testing"
	"time"
)

type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *fakeClock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func TestRoundRobin(t *testing.T) {
	b := New(RoundRobin, Outlier{}, nil)
	eps := []string{"a", "b", "c"}
	counts := map[string]int{}
	for range 300 {
		k, done, ok := b.Pick(eps)
		if !ok {
			t.Fatal("no pick")
		}
		done(Success)
		counts[k]++
	}
	for _, e := range eps {
		if counts[e] != 100 {
			t.Fatalf("round robin uneven: %v", counts)
		}
	}
	if _, _, ok := b.Pick(nil); ok {
		t.Fatal("picked from an empty pool")
	}
}

func TestLeastRequestAvoidsBusyEndpoint(t *testing.T) {
	b := New(LeastRequest, Outlier{}, nil)
	eps := []string{"busy", "idle"}
	// Hold 10 requests on "busy" (picked while it was the only endpoint).
	for range 10 {
		if k, _, _ := b.Pick([]string{"busy"}); k != "busy" {
			t.Fatal(k)
		}
	}
	for range 50 {
		k, done, _ := b.Pick(eps)
		if k != "idle" {
			t.Fatalf("least request picked %s with 10 active", k)
		}
		done(Success)
	}
}

func TestOutlierEjection(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1000, 0)}
	b := New(RoundRobin, Outlier{Consecutive: 3, BaseEjection: 10 * time.Second}, clk.now)
	eps := []string{"good", "bad"}
	fail := func(n int, o Outcome) {
		for i := 0; i < n; {
			k, done, _ := b.Pick(eps)
			if k == "bad" {
				done(o)
				i++
			} else {
				done(Success)
			}
		}
	}
	fail(2, ServerError)
	// A success in between resets the count.
	for {
		k, done, _ := b.Pick(eps)
		if k == "bad" {
			done(Success)
			break
		}
		done(Success)
	}
	fail(2, ConnectFailure)
	if b.Ejected("bad") {
		t.Fatal("ejected before 3 consecutive failures")
	}
	fail(1, ServerError)
	if !b.Ejected("bad") {
		t.Fatal("not ejected after 3 consecutive failures")
	}
	for range 20 {
		k, done, _ := b.Pick(eps)
		done(Success)
		if k == "bad" {
			t.Fatal("picked an ejected endpoint")
		}
	}
	clk.add(11 * time.Second)
	if b.Ejected("bad") {
		t.Fatal("still ejected after the ejection time")
	}
	// Second ejection lasts twice as long.
	fail(3, ServerError)
	clk.add(11 * time.Second)
	if !b.Ejected("bad") {
		t.Fatal("second ejection should last 20s")
	}
	clk.add(10 * time.Second)
	if b.Ejected("bad") {
		t.Fatal("second ejection lasted more than 20s")
	}
}

func TestEjectionPercentLimitAndPanic(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1000, 0)}
	b := New(RoundRobin, Outlier{Consecutive: 1, MaxEjectionPercent: 50}, clk.now)
	eps := []string{"a", "b"}
	for range 4 {
		_, done, _ := b.Pick(eps)
		done(ServerError)
	}
	n := 0
	for _, e := range eps {
		if b.Ejected(e) {
			n++
		}
	}
	if n != 1 {
		t.Fatalf("%d of 2 ejected, want 1 (50%%)", n)
	}
	// A single-endpoint pool: the one endpoint may be ejected, but Pick
	// still returns it rather than failing.
	b1 := New(RoundRobin, Outlier{Consecutive: 1}, clk.now)
	_, done, _ := b1.Pick([]string{"only"})
	done(ConnectFailure)
	if !b1.Ejected("only") {
		t.Fatal("single endpoint not ejected")
	}
	if k, _, ok := b1.Pick([]string{"only"}); !ok || k != "only" {
		t.Fatal("all-ejected pool must still pick")
	}
}

func TestDoneIsIdempotentAndForget(t *testing.T) {
	b := New(LeastRequest, Outlier{}, nil)
	_, done, _ := b.Pick([]string{"a"})
	done(Success)
	done(Success)
	if b.endpoints["a"].active != 0 {
		t.Fatalf("active=%d after double done", b.endpoints["a"].active)
	}
	b.Forget(map[string]bool{})
	if len(b.endpoints) != 0 {
		t.Fatal("Forget kept state")
	}
}

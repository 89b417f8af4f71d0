package proxy

import (
	"context"
	"testing"
	"time"

	"github.com/ambientmesh/ambient/proxylib/identity"
	"github.com/ambientmesh/ambient/proxylib/proxyerr"
	"github.com/ambientmesh/ambient/proxylib/rbac"
)

func TestTrackerRevalidateAndDrain(t *testing.T) {
	tr := NewTracker()
	sleep := identity.MustParse("spiffe://cluster.local/ns/default/sa/sleep")
	other := identity.MustParse("spiffe://cluster.local/ns/default/sa/other")
	closed := map[string]proxyerr.Reason{}
	add := func(name, dst string, id identity.Identity) func() {
		remove, err := tr.Add("pod", dst, rbac.Conn{Source: &id}, func(r proxyerr.Reason) { closed[name] = r })
		if err != nil {
			t.Fatal(err)
		}
		return remove
	}
	add("sleep-in", "dst", sleep)
	add("other-in", "dst", other)
	removeOut := add("outbound", "", other) // outbound-only: never re-authorized here

	n := tr.Revalidate(func(dst string, c rbac.Conn) bool { return *c.Source == sleep })
	if n != 1 || closed["other-in"] != proxyerr.PolicyChanged || closed["sleep-in"] != "" || closed["outbound"] != "" {
		t.Fatalf("revalidate closed %d: %v", n, closed)
	}

	// Drain: an in-flight connection that finishes in time.
	go func() { time.Sleep(10 * time.Millisecond); removeOut() }()
	tr2 := NewTracker()
	r2, _ := tr2.Add("pod", "", rbac.Conn{}, func(proxyerr.Reason) {})
	go func() { time.Sleep(10 * time.Millisecond); r2() }()
	if !tr2.Drain(context.Background()) {
		t.Fatal("drain reported forced close although the connection finished")
	}
	if _, err := tr2.Add("pod", "", rbac.Conn{}, func(proxyerr.Reason) {}); proxyerr.ReasonOf(err) != proxyerr.Draining {
		t.Fatalf("Add after drain: %v, want draining", err)
	}

	// Drain with a connection that never finishes: forced close at the deadline.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if tr.Drain(ctx) {
		t.Fatal("drain reported clean although connections stayed open")
	}
	if closed["sleep-in"] != proxyerr.Draining {
		t.Fatalf("closed = %v, want sleep-in drained", closed)
	}
}

// A connection accepted just before the listeners closed registers while
// Drain waits, and Drain waits for it too.
func TestTrackerDrainWaitsForLateRegistrations(t *testing.T) {
	tr := NewTracker()
	first, _ := tr.Add("pod", "", rbac.Conn{}, func(proxyerr.Reason) {})
	drained := make(chan bool)
	go func() { drained <- tr.Drain(context.Background()) }()
	late, err := tr.Add("pod", "", rbac.Conn{}, func(proxyerr.Reason) {})
	if err != nil {
		t.Fatalf("connection accepted before the listeners closed was refused: %v", err)
	}
	first()
	select {
	case <-drained:
		t.Fatal("Drain returned while a connection was still open")
	case <-time.After(50 * time.Millisecond):
	}
	late()
	if !<-drained {
		t.Fatal("drain reported forced close although every connection finished")
	}
	if _, err := tr.Add("pod", "", rbac.Conn{}, func(proxyerr.Reason) {}); proxyerr.ReasonOf(err) != proxyerr.Draining {
		t.Fatalf("Add after drain: %v, want draining", err)
	}
}

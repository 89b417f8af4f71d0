package handover

import (
	"net"
	"runtime"
	"testing"
	"time"
)

// TestIdleRelayMemory: an idle session relay holds no copy buffer (it
// waits on both sides' readiness without one): 200 idle relays hold under
// 2 KiB of heap each, where their two 2 KiB buffers alone pinned 4 KiB
// (4.8-5.8 KiB measured before). Heap is counted, not time, and not
// stacks: Go sizes new goroutines' stacks from the average it observes.
func TestIdleRelayMemory(t *testing.T) {
	const n = 200
	type pair struct{ client, peer *net.TCPConn } // the two apps
	pairs := make([]pair, n)
	conns := make([][2]*net.TCPConn, n)
	for i := range conns {
		client, app := tcpPair(t)
		server, peer := tcpPair(t)
		conns[i] = [2]*net.TCPConn{app, server}
		pairs[i] = pair{client, peer}
	}
	measure := func() uint64 {
		runtime.GC()
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}
	before := measure()
	relays := make([]*Relay, n)
	ended := make(chan struct{}, n)
	for i, c := range conns {
		relays[i] = NewRelay(c[0], c[1], 0, 0)
		go func() { relays[i].Run(); ended <- struct{}{} }()
	}
	defer func() { // end them all before the next test measures
		for _, p := range pairs {
			p.client.Close()
			p.peer.Close()
		}
		for range n {
			<-ended
		}
	}()
	buf := make([]byte, 16)
	for _, p := range pairs { // one message each way: both directions have read once
		p.client.Write([]byte("ping"))
		p.peer.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := p.peer.Read(buf); err != nil {
			t.Fatal(err)
		}
		p.peer.Write([]byte("pong"))
		p.client.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := p.client.Read(buf); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(100 * time.Millisecond) // every direction parked again
	per := int64(measure()-before) / n
	t.Logf("idle relay: %d bytes of heap each", per)
	if per > 2<<10 {
		t.Errorf("an idle relay holds %d bytes of heap, want ≤ 2 KiB (no copy buffers)", per)
	}
}

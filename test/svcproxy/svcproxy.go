// Package svcproxy is a fake for kube-proxy's ClusterIP forwarding, which
// cannot run in these tests: one address in front of several backends
// (replicas). Each new connection goes to the first ready backend, as a
// Service would after the endpoints controller removed a dead pod; a
// backend can be taken out of the endpoints (new connections avoid it) and
// its existing connections either reset (the pod's process died) or frozen
// (its node is gone: no reset, no answer).
package svcproxy

import (
	"net"
	"sync"
	"testing"
)

// Proxy forwards TCP connections to the first ready backend.
type Proxy struct {
	lis  net.Listener
	stop chan struct{}

	mu       sync.Mutex
	backends []*backend
	// Connections counts the connections forwarded to each backend address.
	conns map[string]int
}

type backend struct {
	addr  string
	ready bool
	// frozen closes when the backend's connections stop moving bytes.
	frozen chan struct{}
	open   []net.Conn
}

// New starts a proxy on loopback over backends (in order of preference);
// it stops with the test.
func New(t testing.TB, backends ...string) *Proxy {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &Proxy{lis: lis, stop: make(chan struct{}), conns: map[string]int{}}
	for _, b := range backends {
		p.backends = append(p.backends, &backend{addr: b, ready: true, frozen: make(chan struct{})})
	}
	go p.serve()
	t.Cleanup(func() {
		_ = lis.Close()
		close(p.stop)
		p.mu.Lock()
		defer p.mu.Unlock()
		for _, b := range p.backends {
			for _, c := range b.open {
				_ = c.Close()
			}
		}
	})
	return p
}

// Addr is the Service's address.
func (p *Proxy) Addr() string { return p.lis.Addr().String() }

// Connections returns how many connections went to addr.
func (p *Proxy) Connections(addr string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.conns[addr]
}

// Remove takes addr out of the endpoints and resets its connections (its
// process died: the kernel closes its sockets).
func (p *Proxy) Remove(addr string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, b := range p.backends {
		if b.addr == addr {
			b.ready = false
			for _, c := range b.open {
				_ = c.Close()
			}
			b.open = nil
		}
	}
}

// Freeze takes addr out of the endpoints and stops its connections moving
// bytes without closing them (its node is gone).
func (p *Proxy) Freeze(addr string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, b := range p.backends {
		if b.addr == addr && b.ready {
			b.ready = false
			close(b.frozen)
		}
	}
}

func (p *Proxy) pick() *backend {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, b := range p.backends {
		if b.ready {
			return b
		}
	}
	return nil
}

func (p *Proxy) serve() {
	for {
		c, err := p.lis.Accept()
		if err != nil {
			return
		}
		go p.forward(c)
	}
}

func (p *Proxy) forward(c net.Conn) {
	b := p.pick()
	if b == nil {
		_ = c.Close() // no endpoints: refused
		return
	}
	up, err := net.Dial("tcp", b.addr)
	if err != nil {
		_ = c.Close()
		return
	}
	p.mu.Lock()
	p.conns[b.addr]++
	b.open = append(b.open, c, up)
	p.mu.Unlock()
	done := make(chan struct{}, 2)
	pump := func(dst, src net.Conn) {
		buf := make([]byte, 32<<10)
		for {
			n, err := src.Read(buf)
			select {
			case <-b.frozen:
				<-p.stop // a lost node: bytes go nowhere, nothing closes
			default:
			}
			if n > 0 {
				if _, werr := dst.Write(buf[:n]); werr != nil {
					break
				}
			}
			if err != nil {
				break
			}
		}
		done <- struct{}{}
	}
	go pump(up, c)
	go pump(c, up)
	<-done
	_ = c.Close()
	_ = up.Close()
}

package hbonetest

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
)

// Echo is a TCP upstream on 127.0.0.1 that echoes what it reads and
// half-closes its write side when the client half-closes.
type Echo struct {
	Addr netip.AddrPort
	ln   net.Listener
	wg   sync.WaitGroup
	mu   sync.Mutex
	open map[net.Conn]struct{}
}

// StartEcho starts an echo upstream, stopped by t.Cleanup.
func StartEcho(t testing.TB) *Echo {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e := &Echo{Addr: ln.Addr().(*net.TCPAddr).AddrPort(), ln: ln, open: map[net.Conn]struct{}{}}
	e.wg.Add(1)
	go e.serve()
	t.Cleanup(e.Close)
	return e
}

func (e *Echo) serve() {
	defer e.wg.Done()
	for {
		c, err := e.ln.Accept()
		if err != nil {
			return
		}
		e.mu.Lock()
		e.open[c] = struct{}{}
		e.mu.Unlock()
		e.wg.Add(1)
		go func() {
			defer e.wg.Done()
			defer func() {
				e.mu.Lock()
				delete(e.open, c)
				e.mu.Unlock()
				c.Close()
			}()
			_, err := io.Copy(c, c)
			if err == nil || errors.Is(err, io.EOF) {
				c.(*net.TCPConn).CloseWrite()
			}
		}()
	}
}

// Close stops accepting, closes open connections and waits for handlers.
func (e *Echo) Close() {
	e.ln.Close()
	e.mu.Lock()
	for c := range e.open {
		c.Close()
	}
	e.mu.Unlock()
	e.wg.Wait()
}

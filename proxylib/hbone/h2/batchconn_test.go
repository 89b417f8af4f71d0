package h2

import (
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/ambientmesh/ambient/proxylib/hbone/hbonetest"
)

// batchedPair is a real TLS 1.3 connection over loopback TCP whose client
// side writes through a recordBatcher.
type batchedPair struct {
	client *batchedTLS
	batch  *recordBatcher
	server *tls.Conn
}

func newBatchedPair(t *testing.T, wrapRaw func(net.Conn) net.Conn) *batchedPair {
	t.Helper()
	ca := hbonetest.NewCA(t, hbonetest.DefaultTrustDomain)
	cert := ca.Issue(t, ca.ID("ns", "server"))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan *tls.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			accepted <- nil
			return
		}
		sc := tls.Server(c, &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{*cert}})
		if sc.Handshake() != nil {
			sc.Close()
			sc = nil
		}
		accepted <- sc
	}()
	raw, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	if wrapRaw != nil {
		raw = wrapRaw(raw)
	}
	batch := newRecordBatcher(raw)
	tc := tls.Client(batch, &tls.Config{MinVersion: tls.VersionTLS13, InsecureSkipVerify: true})
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	sc := <-accepted
	if sc == nil {
		t.Fatal("server handshake failed")
	}
	p := &batchedPair{client: newBatchedTLS(tc, batch), batch: batch, server: sc}
	t.Cleanup(func() { p.client.Close(); sc.Close() })
	return p
}

// warmUp sends past crypto/tls's dynamic record sizing (small records for
// the first 128 KiB), so later records are full 16 KiB ones.
func warmUp(t *testing.T, p *batchedPair) {
	t.Helper()
	warm := make([]byte, 256<<10)
	read := make(chan error, 1)
	go func() { _, err := io.CopyN(io.Discard, p.server, int64(len(warm))); read <- err }()
	if _, err := p.client.Write(warm); err != nil {
		t.Fatal(err)
	}
	if err := <-read; err != nil {
		t.Fatal(err)
	}
}

func TestBatchedTLSWritesManyRecordsInOneSyscall(t *testing.T) {
	p := newBatchedPair(t, nil)
	warmUp(t, p)

	msg := bytes.Repeat([]byte("0123456789abcdef"), 4<<10) // 64 KiB: four records
	got := make(chan []byte, 1)
	go func() {
		b := make([]byte, len(msg))
		io.ReadFull(p.server, b)
		got <- b
	}()
	before := p.batch.socketWrites()
	if n, err := p.client.Write(msg); n != len(msg) || err != nil {
		t.Fatalf("Write = %d, %v", n, err)
	}
	if w := p.batch.socketWrites() - before; w != 1 {
		t.Fatalf("64 KiB (four TLS records) took %d socket writes, want 1", w)
	}
	if !bytes.Equal(<-got, msg) {
		t.Fatal("peer read different bytes")
	}
	if p.batch.buf != nil {
		t.Fatal("batcher holds its buffer after the Write returned")
	}
}

func TestBatchedTLSConcurrentWritesArriveWhole(t *testing.T) {
	p := newBatchedPair(t, nil)
	const writers, perWriter, size = 4, 20, 40 << 10
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			msg := bytes.Repeat([]byte{byte('a' + w)}, size)
			for range perWriter {
				if _, err := p.client.Write(msg); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	go func() { wg.Wait(); p.client.CloseWrite() }()
	counts := map[byte]int{}
	buf := make([]byte, size)
	for {
		if _, err := io.ReadFull(p.server, buf); err != nil {
			if err != io.EOF {
				t.Fatal(err)
			}
			break
		}
		if bytes.Count(buf, buf[:1]) != size {
			t.Fatalf("a message arrived interleaved with another")
		}
		counts[buf[0]]++
	}
	for w := range writers {
		if counts[byte('a'+w)] != perWriter {
			t.Fatalf("writer %d: %d messages arrived, want %d", w, counts[byte('a'+w)], perWriter)
		}
	}
}

// failingConn fails every write once broken.
type failingConn struct {
	net.Conn
	mu     sync.Mutex
	broken bool
}

var errBroken = errors.New("socket broken")

func (c *failingConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.broken {
		return 0, errBroken
	}
	return c.Conn.Write(p)
}

func TestBatchedTLSWriteErrorPropagatesAndSticks(t *testing.T) {
	var fc *failingConn
	p := newBatchedPair(t, func(c net.Conn) net.Conn { fc = &failingConn{Conn: c}; return fc })
	warmUp(t, p) // full records from here on: the whole Write fits one batch
	fc.mu.Lock()
	fc.broken = true
	fc.mu.Unlock()
	big := make([]byte, 64<<10)
	if n, err := p.client.Write(big); !errors.Is(err, errBroken) || n != 0 {
		t.Fatalf("Write on a broken socket = %d, %v; want 0, %v", n, err, errBroken)
	}
	fc.mu.Lock()
	fc.broken = false // the socket "recovers", the TLS stream must not
	fc.mu.Unlock()
	if _, err := p.client.Write(big); !errors.Is(err, errBroken) {
		t.Fatalf("Write after a failed flush = %v, want the sticky %v", err, errBroken)
	}
}

// noDeadlineConn ignores write deadlines, so only closing the socket can
// end a write blocked on a peer that does not read.
type noDeadlineConn struct{ net.Conn }

func (noDeadlineConn) SetWriteDeadline(time.Time) error { return nil }
func (noDeadlineConn) SetDeadline(time.Time) error      { return nil }

func TestBatchedTLSCloseBreaksBlockedWrite(t *testing.T) {
	p := newBatchedPair(t, func(c net.Conn) net.Conn { return noDeadlineConn{c} })
	// The server never reads: the writer fills the socket buffers and blocks.
	wrote := make(chan error, 1)
	go func() {
		big := make([]byte, 64<<10)
		for {
			if _, err := p.client.Write(big); err != nil {
				wrote <- err
				return
			}
		}
	}()
	eventually(t, "a write blocked on the socket", func() bool {
		before := p.batch.socketWrites()
		time.Sleep(50 * time.Millisecond)
		return p.client.writing.Load() > 0 && p.batch.socketWrites() == before
	})
	closed := make(chan struct{})
	go func() { p.client.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(30 * time.Second): // hang detection only
		t.Fatal("Close hung behind a blocked write")
	}
	if err := <-wrote; err == nil {
		t.Fatal("blocked Write did not fail")
	}
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for range 400 {
		if cond() {
			return
		}
		time.Sleep(25 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s", what)
}

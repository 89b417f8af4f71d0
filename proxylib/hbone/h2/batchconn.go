package h2

import (
	"crypto/tls"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// crypto/tls writes each record (at most 16 KiB of plaintext) to its
// connection with its own Write, so one flush of 64 KiB of frames costs four
// write(2) calls. recordBatcher sits between crypto/tls and the socket: while
// a batch is open it collects records and sends them with one write when the
// batch ends. batchedTLS opens a batch around each tls.Conn.Write, so each
// frameWriter flush becomes one syscall and every Write still has its bytes
// on the socket (or its error) when it returns.
//
// Outside a batch (handshake flights, close_notify, a KeyUpdate answered from
// the read path) writes go straight through, in order behind any batch.

// batchLimit bounds the bytes held before an early flush: four full TLS 1.3
// records (16 KiB of plaintext plus 5 B header, 1 B content type and a 16 B
// tag each) are one 64 KiB DATA frame.
const batchLimit = 4 * (maxRecordPlaintext + 22)

const maxRecordPlaintext = 16 << 10

var batchBuffers = sync.Pool{New: func() any { b := make([]byte, 0, batchLimit); return &b }}

// recordBatcher is the net.Conn given to crypto/tls. Its buffer is pooled
// and held only inside a batch, so idle connections hold none.
type recordBatcher struct {
	net.Conn

	mu    sync.Mutex
	open  int          // batches in progress (concurrent writers nest)
	buf   *[]byte      // records waiting for the end of the batch
	err   error        // a failed flush: the byte stream is broken for good
	calls atomic.Int64 // socket writes (for tests)
}

func newRecordBatcher(c net.Conn) *recordBatcher { return &recordBatcher{Conn: c} }

// batchRecords turns batching off for same-run comparisons in benchmarks.
var batchRecords = true

// Write buffers inside a batch and writes through outside one.
func (b *recordBatcher) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.err != nil {
		return 0, b.err
	}
	if b.open == 0 && b.buf == nil {
		return b.writeLocked(p)
	}
	if b.buf != nil && len(*b.buf)+len(p) > batchLimit {
		if err := b.flushLocked(); err != nil {
			return 0, err
		}
	}
	if b.buf == nil {
		b.buf = batchBuffers.Get().(*[]byte)
	}
	*b.buf = append(*b.buf, p...)
	if b.open == 0 { // outside a batch, behind held bytes: send now, in order
		if err := b.flushLocked(); err != nil {
			return 0, err
		}
	}
	return len(p), nil
}

func (b *recordBatcher) begin() {
	b.mu.Lock()
	b.open++
	b.mu.Unlock()
}

// end closes one batch and sends everything buffered so far.
func (b *recordBatcher) end() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.open--
	if b.err != nil {
		return b.err
	}
	return b.flushLocked()
}

func (b *recordBatcher) flushLocked() error {
	if b.buf == nil {
		return nil
	}
	_, err := b.writeLocked(*b.buf)
	*b.buf = (*b.buf)[:0]
	batchBuffers.Put(b.buf)
	b.buf = nil
	return err
}

// writeLocked writes to the socket; a short write leaves the TLS stream
// unrecoverable, so its error sticks (as crypto/tls does for its own).
func (b *recordBatcher) writeLocked(p []byte) (int, error) {
	b.calls.Add(1)
	n, err := b.Conn.Write(p)
	if err != nil {
		b.err = err
	}
	return n, err
}

// socketWrites reports how many writes reached the socket.
func (b *recordBatcher) socketWrites() int64 { return b.calls.Load() }

// batchedTLS is the connection the engine reads and writes: a *tls.Conn
// whose Writes are batched.
type batchedTLS struct {
	*tls.Conn
	batch   *recordBatcher
	writing atomic.Int32 // Writes in progress, including their flush
}

// newBatchedTLS wraps tc, which must have been created on batch.
func newBatchedTLS(tc *tls.Conn, batch *recordBatcher) *batchedTLS {
	return &batchedTLS{Conn: tc, batch: batch}
}

func (c *batchedTLS) Write(p []byte) (int, error) {
	if !batchRecords || len(p) <= maxRecordPlaintext {
		return c.Conn.Write(p) // one record: nothing to coalesce, no copy
	}
	c.writing.Add(1)
	defer c.writing.Add(-1)
	c.batch.begin()
	n, err := c.Conn.Write(p)
	if ferr := c.batch.end(); ferr != nil && err == nil {
		return 0, ferr // nothing of p is known to have arrived
	}
	return n, err
}

// forceCloseAfter bounds a graceful Close (its close_notify can block on a
// peer that stopped reading).
const forceCloseAfter = 250 * time.Millisecond

// Close sends close_notify and closes, like tls.Conn.Close. A Write still in
// progress (possibly blocked in its flush) means Close is being used to
// break it: the socket is closed at once without close_notify, which is what
// crypto/tls does for a Write inside tls.Conn.Write.
func (c *batchedTLS) Close() error {
	if c.writing.Load() > 0 {
		c.batch.Conn.Close()
		return c.Conn.Close()
	}
	t := time.AfterFunc(forceCloseAfter, func() { c.batch.Conn.Close() })
	defer t.Stop()
	return c.Conn.Close()
}

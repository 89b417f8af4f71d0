package h2

import (
	"io"
	"sync"
)

// bodyPipeSize bounds the bytes a tunnel writer may run ahead of x/net's
// request-body goroutine.
const bodyPipeSize = 64 << 10

// frameFit is the most a single Read hands x/net's request-body writer: a
// DATA frame of 16375 payload bytes plus its 9-byte header is exactly one
// full TLS record (16384), where a 16384-byte frame would cost a full record
// plus a 9-byte one (an extra record and write(2) per frame).
const frameFit = 16384 - 9

var bodyPipeBuffers = sync.Pool{New: func() any { b := make([]byte, bodyPipeSize); return &b }}

// bodyPipe carries the dialing side's writes into the HTTP/2 request body.
// Unlike io.Pipe, a Write returns once its bytes are buffered instead of
// waiting for the transport to take them 16 KiB (one frame) at a time, so
// the writer and the framer run concurrently. The buffer is pooled and held
// only while bytes are in flight: an idle tunnel holds none.
type bodyPipe struct {
	mu     sync.Mutex
	cond   sync.Cond
	buf    *[]byte
	r, w   int   // read and write offsets into *buf
	werr   error // set by CloseWithError: reads drain, then return it
	rerr   error // set by the reader's Close: writes fail with it
	closed bool
	// more, if set, is told when a Read leaves bytes queued: the transport
	// will write another frame at once (see recordBatcher.moreFollows).
	more func()
}

func newBodyPipe() *bodyPipe {
	p := &bodyPipe{}
	p.cond.L = &p.mu
	return p
}

// Write blocks only while the buffer is full.
func (p *bodyPipe) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for len(b) > 0 {
		if p.rerr != nil {
			return n, p.rerr
		}
		if p.closed {
			return n, io.ErrClosedPipe
		}
		if p.buf == nil {
			p.buf = bodyPipeBuffers.Get().(*[]byte)
			p.r, p.w = 0, 0
		}
		if p.w == len(*p.buf) {
			if p.r == p.w { // drained: rewind
				p.r, p.w = 0, 0
			} else {
				p.cond.Wait()
				continue
			}
		}
		c := copy((*p.buf)[p.w:], b)
		p.w += c
		n += c
		b = b[c:]
		p.cond.Broadcast()
	}
	return n, nil
}

// Read returns buffered bytes, waiting for some; after CloseWithError it
// drains, then returns the close error (io.EOF for a half-close).
func (p *bodyPipe) Read(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for {
		if p.rerr != nil {
			return 0, p.rerr
		}
		if p.buf != nil && p.r < p.w {
			if len(b) > frameFit {
				b = b[:frameFit]
			}
			n := copy(b, (*p.buf)[p.r:p.w])
			p.r += n
			if p.r == p.w { // drained: give the buffer back while idle
				bodyPipeBuffers.Put(p.buf)
				p.buf = nil
			} else if p.more != nil {
				p.more()
			}
			p.cond.Broadcast()
			return n, nil
		}
		if p.closed {
			return 0, p.werr
		}
		p.cond.Wait()
	}
}

// CloseWithError ends the writer side; Close is CloseWithError(io.EOF).
func (p *bodyPipe) CloseWithError(err error) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.closed {
		p.closed, p.werr = true, err
		p.cond.Broadcast()
	}
	return nil
}

// Abort ends both sides at once, discarding buffered bytes (tunnel reset).
func (p *bodyPipe) Abort(err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.rerr == nil {
		p.rerr = err
	}
	p.closed = true
	if p.werr == nil {
		p.werr = err
	}
	if p.buf != nil {
		bodyPipeBuffers.Put(p.buf)
		p.buf = nil
	}
	p.cond.Broadcast()
}

// bodyReader is the transport's view: its Close (stream over) fails writers.
type bodyReader struct{ p *bodyPipe }

func (r bodyReader) Read(b []byte) (int, error) { return r.p.Read(b) }
func (r bodyReader) Close() error {
	r.p.Abort(io.ErrClosedPipe)
	return nil
}

// Close ends the writer side cleanly (the peer reads EOF after the buffered bytes).
func (p *bodyPipe) Close() error { return p.CloseWithError(io.EOF) }

package h2

import (
	"bytes"
	"io"
	"sync"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// frameWriter writes frames from the goroutine that produced them (a relay
// copying into a tunnel, the connection's reader answering a PING) with no
// hand-off to a writer goroutine. Frames are appended to a pending buffer;
// the first writer to find no flush in progress becomes the flusher and
// writes everything pending, including frames other goroutines appended
// meanwhile, with one Write (one write(2) through the record batcher). So
// frames that are ready together share TLS records and a syscall, and an
// idle connection holds no buffer.
type frameWriter struct {
	out io.Writer

	mu       sync.Mutex
	cond     sync.Cond // signalled when a flush finished
	pending  *[]byte   // frames not yet handed to out; nil when empty
	flushing bool
	waiting  int   // appenders waiting for room
	err      error // the first write error: the connection is broken for good

	// Control frames and headers are encoded by a Framer into scratch, under
	// mu, so hpack state changes in the order frames go out.
	scratch bytes.Buffer
	fr      *http2.Framer
	henc    *hpack.Encoder
	hbuf    bytes.Buffer
}

// maxPending bounds the bytes queued behind a flush: an appender past it
// waits, so a peer that stops reading stops its writers (and, through
// control-frame answers, its connection's reader) instead of growing memory.
const maxPending = 256 << 10

// maxDataPayload is the DATA payload per frame: a frame and its header fill
// exactly one TLS record (16 KiB of plaintext), so a write of whole frames
// costs whole records.
const maxDataPayload = maxRecordPlaintext - frameHeaderLen

const frameHeaderLen = 9

var pendingBuffers = sync.Pool{New: func() any { b := make([]byte, 0, 64<<10); return &b }}

func newFrameWriter(out io.Writer) *frameWriter {
	w := &frameWriter{out: out}
	w.cond.L = &w.mu
	w.fr = http2.NewFramer(&w.scratch, nil)
	w.henc = hpack.NewEncoder(&w.hbuf)
	return w
}

// lockForAppend takes mu once there is room for more pending bytes.
func (w *frameWriter) lockForAppend() error {
	w.mu.Lock()
	for w.err == nil && w.flushing && w.pending != nil && len(*w.pending) >= maxPending {
		w.waiting++
		w.cond.Wait()
		w.waiting--
	}
	if w.err != nil {
		err := w.err
		w.mu.Unlock()
		return err
	}
	return nil
}

func (w *frameWriter) appendLocked(p []byte) {
	if w.pending == nil {
		w.pending = pendingBuffers.Get().(*[]byte)
	}
	*w.pending = append(*w.pending, p...)
}

// data queues DATA frames for p (split at maxDataPayload) and flushes.
func (w *frameWriter) data(streamID uint32, p []byte, endStream bool) error {
	if err := w.lockForAppend(); err != nil {
		return err
	}
	for {
		n := min(len(p), maxDataPayload)
		last := n == len(p)
		var hdr [frameHeaderLen]byte
		putFrameHeader(hdr[:], n, http2.FrameData, endStream && last, streamID)
		w.appendLocked(hdr[:])
		w.appendLocked(p[:n])
		p = p[n:]
		if last {
			break
		}
	}
	return w.flushLocked()
}

func putFrameHeader(b []byte, length int, t http2.FrameType, endStream bool, streamID uint32) {
	b[0], b[1], b[2] = byte(length>>16), byte(length>>8), byte(length)
	b[3] = byte(t)
	b[4] = 0
	if endStream {
		b[4] = byte(http2.FlagDataEndStream)
	}
	b[5], b[6], b[7], b[8] = byte(streamID>>24)&0x7f, byte(streamID>>16), byte(streamID>>8), byte(streamID)
}

// control queues a frame encoded by fn (on w.fr) and flushes.
func (w *frameWriter) control(fn func(fr *http2.Framer) error) error {
	if err := w.lockForAppend(); err != nil {
		return err
	}
	w.scratch.Reset()
	if err := fn(w.fr); err != nil {
		w.mu.Unlock()
		return err
	}
	w.appendLocked(w.scratch.Bytes())
	return w.flushLocked()
}

// headers queues a HEADERS frame (with CONTINUATIONs past maxFrame) for
// fields; before runs under the writer lock first, so a client can allocate
// the stream id in wire order.
func (w *frameWriter) headers(before func() uint32, fields []hpack.HeaderField, endStream bool, maxFrame uint32) (uint32, error) {
	if err := w.lockForAppend(); err != nil {
		return 0, err
	}
	id := before()
	w.hbuf.Reset()
	for _, f := range fields {
		w.henc.WriteField(f)
	}
	block := w.hbuf.Bytes()
	w.scratch.Reset()
	first := true
	for first || len(block) > 0 {
		n := min(len(block), int(maxFrame))
		frag, rest := block[:n], block[n:]
		var err error
		if first {
			err = w.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: frag, EndStream: endStream, EndHeaders: len(rest) == 0})
		} else {
			err = w.fr.WriteContinuation(id, len(rest) == 0, frag)
		}
		if err != nil {
			w.mu.Unlock()
			return id, err
		}
		block, first = rest, false
	}
	w.appendLocked(w.scratch.Bytes())
	return id, w.flushLocked()
}

// setHeaderTableSize applies the peer's SETTINGS_HEADER_TABLE_SIZE.
func (w *frameWriter) setHeaderTableSize(v uint32) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.henc.SetMaxDynamicTableSizeLimit(v)
}

// flushLocked is called with mu held and releases it. If another goroutine
// is flushing it takes our frames with it; otherwise we write until nothing
// is pending. A flusher that keeps finding new frames hands over to a
// waiting appender after a few rounds, so one relay is not held writing
// other streams' data for long.
func (w *frameWriter) flushLocked() error {
	if w.flushing {
		w.mu.Unlock()
		return nil
	}
	w.flushing = true
	for rounds := 0; w.pending != nil && w.err == nil; rounds++ {
		if rounds >= 4 && w.waiting > 0 {
			break
		}
		buf := w.pending
		w.pending = nil
		w.mu.Unlock()
		_, err := w.out.Write(*buf)
		*buf = (*buf)[:0]
		pendingBuffers.Put(buf)
		w.mu.Lock()
		if err != nil && w.err == nil {
			w.err = err
		}
	}
	w.flushing = false
	err := w.err
	w.cond.Broadcast()
	w.mu.Unlock()
	return err
}

// flushPending waits for a flush in progress and writes what is still
// pending (a GOAWAY queued behind it), so closing does not drop it. The
// caller bounds it with a write deadline on the socket.
func (w *frameWriter) flushPending() {
	w.mu.Lock()
	for w.flushing && w.err == nil {
		w.cond.Wait()
	}
	if w.pending == nil || w.err != nil {
		w.mu.Unlock()
		return
	}
	w.flushLocked()
}

// fail makes every later write return err (the connection is closing).
func (w *frameWriter) fail(err error) {
	w.mu.Lock()
	if w.err == nil {
		w.err = err
	}
	if w.pending != nil && !w.flushing {
		*w.pending = (*w.pending)[:0]
		pendingBuffers.Put(w.pending)
		w.pending = nil
	}
	w.cond.Broadcast()
	w.mu.Unlock()
}

package h2

import (
	"bytes"
	"errors"
	"io"
	"net"
	"testing"
)

func TestBodyPipeDrainsThenReturnsCloseError(t *testing.T) {
	p := newBodyPipe()
	msg := bytes.Repeat([]byte("abc"), 50000) // larger than the buffer: Write must wait for reads
	go func() {
		p.Write(msg)
		p.Close()
	}()
	got, err := io.ReadAll(bodyReader{p})
	if err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("read %d of %d bytes: %v", len(got), len(msg), err)
	}
	if p.buf != nil {
		t.Fatal("drained pipe still holds its buffer")
	}
}

func TestBodyPipeReaderCloseFailsBlockedWriter(t *testing.T) {
	p := newBodyPipe()
	done := make(chan error, 1)
	go func() {
		_, err := p.Write(make([]byte, 4*bodyPipeSize)) // blocks: nobody reads
		done <- err
	}()
	bodyReader{p}.Close() // the transport gave up on the stream
	if err := <-done; !errors.Is(err, io.ErrClosedPipe) {
		t.Fatalf("blocked Write returned %v, want ErrClosedPipe", err)
	}
}

func TestBodyPipeWriterErrorReachesReader(t *testing.T) {
	p := newBodyPipe()
	p.Write([]byte("x"))
	p.CloseWithError(net.ErrClosed)
	b := make([]byte, 8)
	if n, err := p.Read(b); n != 1 || err != nil {
		t.Fatalf("first read = %d, %v", n, err)
	}
	if _, err := p.Read(b); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("read after close = %v, want net.ErrClosed", err)
	}
	if _, err := p.Write([]byte("y")); err == nil {
		t.Fatal("write after close succeeded")
	}
}

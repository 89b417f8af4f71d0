package hboneload

import (
	"encoding/binary"
	"io"
	"net"
)

// Sink modes: the first byte a client sends on a connection.
const (
	modeDiscard = 'D' // read to EOF, answer with the 8-byte count, close
	modeEcho    = 'E' // echo until EOF, then close
)

// RunSink serves the benchmark's upstream server on ln until it is closed.
func RunSink(ln net.Listener) error {
	raiseFileLimit()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				continue
			}
			return err
		}
		go serveSink(c.(*net.TCPConn))
	}
}

func serveSink(c *net.TCPConn) {
	defer c.Close()
	var mode [1]byte
	if _, err := io.ReadFull(c, mode[:]); err != nil {
		return
	}
	switch mode[0] {
	case modeDiscard:
		n, err := io.Copy(io.Discard, c)
		if err != nil {
			return
		}
		var count [8]byte
		binary.BigEndian.PutUint64(count[:], uint64(n))
		c.Write(count[:])
		c.CloseWrite()
	case modeEcho:
		// A plain loop, not io.Copy: TCP-to-TCP io.Copy splices through a
		// pipe pair held for the connection's life, three descriptors per
		// idle echo connection instead of one.
		buf := make([]byte, 2048)
		for {
			n, err := c.Read(buf)
			if n > 0 {
				if _, werr := c.Write(buf[:n]); werr != nil {
					return
				}
			}
			if err != nil {
				break
			}
		}
		c.CloseWrite()
	}
}

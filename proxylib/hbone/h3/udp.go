package h3

import (
	"net"
	"os"
	"strings"
	"sync"
	"syscall"

	"github.com/go-logr/logr"
)

// wantUDPBuffer is what quic-go asks for (about 7 MiB) to sustain high
// throughput; the kernel caps unprivileged requests at net.core.[rw]mem_max.
const wantUDPBuffer = 7 << 20

var logBufferOnce sync.Once

// listenUDP opens the UDP socket for QUIC with socket buffers as large as this
// machine allows. The machine-wide limits are only read, never changed.
func listenUDP(log logr.Logger, addr string) (*net.UDPConn, error) {
	ua, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return nil, err
	}
	conn, err := net.ListenUDP("udp", ua)
	if err != nil {
		return nil, err
	}
	tuneUDP(log, conn)
	return conn, nil
}

// tuneUDP raises a socket's buffers as far as allowed and logs the result
// once per process.
func tuneUDP(log logr.Logger, conn *net.UDPConn) {
	_ = conn.SetReadBuffer(wantUDPBuffer)
	_ = conn.SetWriteBuffer(wantUDPBuffer)
	logBufferOnce.Do(func() {
		rcv, snd := socketBuffers(conn)
		log.Info("QUIC UDP socket buffers", "rcvbuf", rcv, "sndbuf", snd, "wanted", wantUDPBuffer,
			"net.core.rmem_max", sysctl("net/core/rmem_max"), "net.core.wmem_max", sysctl("net/core/wmem_max"))
	})
}

func socketBuffers(conn *net.UDPConn) (rcv, snd int) {
	raw, err := conn.SyscallConn()
	if err != nil {
		return 0, 0
	}
	_ = raw.Control(func(fd uintptr) {
		rcv, _ = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF)
		snd, _ = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_SNDBUF)
	})
	return rcv, snd
}

func sysctl(name string) string {
	b, err := os.ReadFile("/proc/sys/" + name)
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(b))
}

package hbone

import (
	"syscall"
	"unsafe"
)

// tcpClose is TCP_CLOSE, the first byte (tcpi_state) of struct tcp_info.
const tcpClose = 7

// EndedByReset says whether a TCP socket whose read just returned EOF was
// in fact reset by its peer. Linux reports a reset once, to whichever call
// on the socket comes first: when a relay's other direction (a write into
// the socket) takes it, this direction's read sees a plain EOF and would
// end the tunnel cleanly. The socket's state tells them apart: a FIN
// leaves it in CLOSE_WAIT, a reset in CLOSE. Only meaningful while this
// side has not shut down its own writing (after that a clean FIN also
// ends in CLOSE).
func EndedByReset(c any) bool {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	state := byte(0)
	rc.Control(func(fd uintptr) {
		var info [8]byte
		size := uint32(len(info))
		_, _, errno := syscall.Syscall6(syscall.SYS_GETSOCKOPT, fd, syscall.IPPROTO_TCP, syscall.TCP_INFO,
			uintptr(unsafe.Pointer(&info[0])), uintptr(unsafe.Pointer(&size)), 0)
		if errno == 0 && size > 0 {
			state = info[0]
		}
	})
	return state == tcpClose
}

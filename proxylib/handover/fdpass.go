package handover

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"

	"golang.org/x/sys/unix"

	"github.com/ambientmesh/ambient/proxylib/identity"
)

// Handoff is what the draining ztunnel sends with each application socket
// (one SOCK_SEQPACKET message, the socket attached by SCM_RIGHTS). The new
// ztunnel resumes the session from it: it dials Resume (the peer pod's
// HBONE address) as Local, expecting Peer, with HeaderResume.
type Handoff struct {
	V         int    `json:"v"`
	Session   string `json:"session"`
	Epoch     uint64 `json:"epoch"`
	Sent      int64  `json:"sent"` // bytes this end sent into the tunnel
	Recv      int64  `json:"recv"` // bytes it received from the tunnel
	Pod       string `json:"pod"`  // uid of the captured pod the socket belongs to
	Local     string `json:"local"`
	Peer      string `json:"peer"`
	Resume    string `json:"resume"`    // peer's HBONE ip:port
	Target    string `json:"target"`    // CONNECT authority of the resume
	Direction string `json:"direction"` // "outbound", "inbound" or "local"
}

// DirectionLocal is a node-local pair (the fast path): two sockets, the
// source app's then the destination app's, relayed with no tunnel; its
// counts are bytes source→destination (Sent) and back (Recv).
const DirectionLocal = "local"

// Decoded is a validated Handoff.
type Decoded struct {
	Params
	Pod            string
	Local, Peer    identity.Identity
	Resume, Target netip.AddrPort
	Direction      string
}

// Ack answers one Handoff: OK means the new ztunnel resumed the session and
// owns the socket; otherwise the sender keeps serving it.
type Ack struct {
	Session string `json:"session"`
	OK      bool   `json:"ok"`
	Error   string `json:"error,omitempty"`
}

// maxMessage bounds one hand-over message.
const maxMessage = 4 << 10

// Encode validates h and returns its wire form.
func (h Handoff) Encode() ([]byte, error) {
	if _, err := h.Decode(); err != nil {
		return nil, err
	}
	return json.Marshal(h)
}

// ParseHandoff reads and validates a hand-over message.
func ParseHandoff(b []byte) (Decoded, error) {
	if len(b) > maxMessage {
		return Decoded{}, fmt.Errorf("%w: hand-over message of %d bytes", ErrMalformed, len(b))
	}
	var h Handoff
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	if err := d.Decode(&h); err != nil {
		return Decoded{}, fmt.Errorf("%w: hand-over message: %v", ErrMalformed, err)
	}
	if d.More() {
		return Decoded{}, fmt.Errorf("%w: trailing data after the hand-over message", ErrMalformed)
	}
	return h.Decode()
}

// Decode validates every field.
func (h Handoff) Decode() (Decoded, error) {
	bad := func(what string, err error) (Decoded, error) {
		return Decoded{}, fmt.Errorf("%w: hand-over %s: %v", ErrMalformed, what, err)
	}
	var d Decoded
	var err error
	if h.V != 1 {
		return bad("version", fmt.Errorf("%d, want 1", h.V))
	}
	if d.ID, err = ParseID(h.Session); err != nil {
		return bad("session", err)
	}
	if h.Sent < 0 || h.Recv < 0 {
		return bad("offsets", errors.New("negative"))
	}
	d.Epoch, d.Sent, d.Recv = h.Epoch, h.Sent, h.Recv
	if h.Pod == "" || len(h.Pod) > 253 {
		return bad("pod", errors.New("empty or too long"))
	}
	d.Pod = h.Pod
	if d.Local, err = identity.Parse(h.Local); err != nil {
		return bad("local identity", err)
	}
	if d.Peer, err = identity.Parse(h.Peer); err != nil {
		return bad("peer identity", err)
	}
	if d.Resume, err = parseAddr(h.Resume); err != nil {
		return bad("resume address", err)
	}
	if d.Target, err = parseAddr(h.Target); err != nil {
		return bad("target", err)
	}
	if h.Direction != "outbound" && h.Direction != "inbound" && h.Direction != DirectionLocal {
		return bad("direction", fmt.Errorf("%q", truncate(h.Direction)))
	}
	d.Direction = h.Direction
	return d, nil
}

func parseAddr(s string) (netip.AddrPort, error) {
	a, err := netip.ParseAddrPort(s)
	if err != nil {
		return a, err
	}
	if a.Port() == 0 || !a.Addr().IsValid() || a.Addr().Zone() != "" || a.Addr().IsUnspecified() {
		return a, errors.New("not a unicast ip:port")
	}
	return a, nil
}

// Send writes h with its sockets attached: one, or two for a local pair.
func Send(c *net.UnixConn, h Handoff, socks ...*os.File) error {
	if want := sockets(h.Direction); len(socks) != want {
		return fmt.Errorf("handover: %s hand-over carries %d sockets, not %d", h.Direction, want, len(socks))
	}
	b, err := h.Encode()
	if err != nil {
		return err
	}
	fds := make([]int, len(socks))
	for i, f := range socks {
		fds[i] = int(f.Fd())
	}
	return write(c, b, unix.UnixRights(fds...))
}

// sockets is how many descriptors a hand-over in direction carries.
func sockets(direction string) int {
	if direction == DirectionLocal {
		return 2
	}
	return 1
}

// Receive reads one hand-over message and its sockets. A message that does
// not validate, or does not carry exactly its sockets, is an error, and any
// descriptor received is closed then.
func Receive(c *net.UnixConn) (Decoded, []*os.File, error) {
	b, fds, err := read(c)
	if err != nil {
		return Decoded{}, nil, err
	}
	closeAll := func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}
	d, err := ParseHandoff(b)
	if err != nil {
		closeAll()
		return Decoded{}, nil, err
	}
	if want := sockets(d.Direction); len(fds) != want {
		closeAll()
		return Decoded{}, nil, fmt.Errorf("handover: %d descriptors in a %s hand-over message, want %d", len(fds), d.Direction, want)
	}
	files := make([]*os.File, len(fds))
	for i, fd := range fds {
		files[i] = os.NewFile(uintptr(fd), "handover-"+d.ID.String())
	}
	return d, files, nil
}

// SendAck answers a hand-over message.
func SendAck(c *net.UnixConn, a Ack) error {
	b, err := json.Marshal(a)
	if err != nil {
		return err
	}
	return write(c, b, nil)
}

// ReceiveAck reads an answer; descriptors are not accepted with it.
func ReceiveAck(c *net.UnixConn) (Ack, error) {
	b, fds, err := read(c)
	if err != nil {
		return Ack{}, err
	}
	for _, fd := range fds {
		unix.Close(fd)
	}
	if len(fds) > 0 {
		return Ack{}, errors.New("handover: descriptor attached to an ack")
	}
	var a Ack
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	if err := d.Decode(&a); err != nil {
		return Ack{}, fmt.Errorf("%w: ack: %v", ErrMalformed, err)
	}
	return a, nil
}

func write(c *net.UnixConn, b, oob []byte) error {
	if len(b) > maxMessage {
		return fmt.Errorf("handover: message of %d bytes exceeds %d", len(b), maxMessage)
	}
	n, oobn, err := c.WriteMsgUnix(b, oob, nil)
	if err != nil {
		return err
	}
	if n != len(b) || oobn != len(oob) {
		return fmt.Errorf("handover: short write (%d/%d bytes, %d/%d oob)", n, len(b), oobn, len(oob))
	}
	return nil
}

// read takes one packet; truncated packets are errors (descriptors closed).
func read(c *net.UnixConn) ([]byte, []int, error) {
	buf := make([]byte, maxMessage+1)
	oob := make([]byte, unix.CmsgSpace(4*4))
	n, oobn, flags, _, err := c.ReadMsgUnix(buf, oob)
	if err != nil {
		return nil, nil, err
	}
	if n == 0 && oobn == 0 {
		return nil, nil, io.EOF
	}
	var fds []int
	if oobn > 0 {
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			return nil, nil, fmt.Errorf("handover: control message: %w", err)
		}
		for _, m := range msgs {
			if m.Header.Level == unix.SOL_SOCKET && m.Header.Type == unix.SCM_RIGHTS {
				r, err := unix.ParseUnixRights(&m)
				if err == nil {
					fds = append(fds, r...)
				}
			}
		}
	}
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 || n > maxMessage {
		for _, fd := range fds {
			unix.Close(fd)
		}
		return nil, nil, errors.New("handover: truncated message")
	}
	return buf[:n], fds, nil
}

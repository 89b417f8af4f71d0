package handover

import (
	"encoding/json"
	"errors"
	"net"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

func testHandoff() Handoff {
	return Handoff{V: 1, Session: testIDHex, Epoch: 1, Sent: 10, Recv: 20, Pod: "uid-client",
		Local: "spiffe://cluster.local/ns/default/sa/client", Peer: "spiffe://cluster.local/ns/default/sa/server",
		Resume: "10.0.0.2:15008", Target: "10.0.0.2:7777", Direction: "outbound"}
}

func TestHandoffValidation(t *testing.T) {
	d, err := testHandoff().Decode()
	if err != nil {
		t.Fatal(err)
	}
	if d.ID != testID || d.Sent != 10 || d.Recv != 20 || d.Resume.String() != "10.0.0.2:15008" || d.Peer.ServiceAccount != "server" {
		t.Fatalf("decoded %+v", d)
	}
	for name, mut := range map[string]func(*Handoff){
		"version":      func(h *Handoff) { h.V = 2 },
		"session":      func(h *Handoff) { h.Session = "nope" },
		"negative":     func(h *Handoff) { h.Sent = -1 },
		"no pod":       func(h *Handoff) { h.Pod = "" },
		"local":        func(h *Handoff) { h.Local = "client" },
		"peer":         func(h *Handoff) { h.Peer = "spiffe://" },
		"resume":       func(h *Handoff) { h.Resume = "10.0.0.2" },
		"resume any":   func(h *Handoff) { h.Resume = "0.0.0.0:15008" },
		"target port0": func(h *Handoff) { h.Target = "10.0.0.2:0" },
		"direction":    func(h *Handoff) { h.Direction = "sideways" },
	} {
		h := testHandoff()
		mut(&h)
		if _, err := h.Encode(); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: Encode = %v, want ErrMalformed", name, err)
		}
	}
	b, _ := json.Marshal(testHandoff())
	for name, in := range map[string][]byte{
		"unknown field": append(b[:len(b)-1:len(b)-1], []byte(`,"x":1}`)...),
		"trailing":      append(append([]byte{}, b...), []byte(`{}`)...),
		"not json":      []byte("v1"),
		"too long":      make([]byte, maxMessage+1),
	} {
		if _, err := ParseHandoff(in); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: ParseHandoff = %v, want ErrMalformed", name, err)
		}
	}
}

// seqpacketPair is a connected SOCK_SEQPACKET pair, as the hand-over socket.
func seqpacketPair(t *testing.T) (*net.UnixConn, *net.UnixConn) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "seqpacket")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c.(*net.UnixConn)
	}
	return conn(fds[0]), conn(fds[1])
}

func TestSendReceivePassesTheSocket(t *testing.T) {
	a, b := seqpacketPair(t)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if err := Send(a, testHandoff(), w); err != nil {
		t.Fatal(err)
	}
	w.Close() // the receiver's copy keeps it open
	d, files, err := Receive(b)
	if err != nil {
		t.Fatal(err)
	}
	f := files[0]
	if d.ID != testID || d.Pod != "uid-client" {
		t.Fatalf("received %+v", d)
	}
	if _, err := f.Write([]byte("x")); err != nil {
		t.Fatalf("write through the passed descriptor: %v", err)
	}
	f.Close()
	buf := make([]byte, 2)
	if n, _ := r.Read(buf); n != 1 || buf[0] != 'x' {
		t.Fatalf("read %q through the pipe", buf[:n])
	}
	if err := SendAck(b, Ack{Session: testIDHex, OK: true}); err != nil {
		t.Fatal(err)
	}
	if ack, err := ReceiveAck(a); err != nil || !ack.OK || ack.Session != testIDHex {
		t.Fatalf("ack %+v, %v", ack, err)
	}
}

func TestReceiveRefusesWithoutExactlyOneSocket(t *testing.T) {
	a, b := seqpacketPair(t)
	msg, _ := json.Marshal(testHandoff())
	if err := write(a, msg, nil); err != nil {
		t.Fatal(err)
	}
	if _, _, err := Receive(b); err == nil {
		t.Fatal("a hand-over without a socket was accepted")
	}
	r1, w1, _ := os.Pipe()
	r2, w2, _ := os.Pipe()
	defer func() { r1.Close(); w1.Close(); r2.Close(); w2.Close() }()
	if err := write(a, msg, unix.UnixRights(int(w1.Fd()), int(w2.Fd()))); err != nil {
		t.Fatal(err)
	}
	if _, _, err := Receive(b); err == nil {
		t.Fatal("a hand-over with two sockets was accepted")
	}
	// A local pair carries exactly two.
	local := testHandoff()
	local.Direction = DirectionLocal
	localMsg, _ := json.Marshal(local)
	if err := write(a, localMsg, unix.UnixRights(int(w1.Fd()))); err != nil {
		t.Fatal(err)
	}
	if _, _, err := Receive(b); err == nil {
		t.Fatal("a local hand-over with one socket was accepted")
	}
	if err := Send(a, local, w1, w2); err != nil {
		t.Fatal(err)
	}
	if _, files, err := Receive(b); err != nil || len(files) != 2 {
		t.Fatalf("local hand-over: %d files, %v", len(files), err)
	} else {
		files[0].Close()
		files[1].Close()
	}
	// A bad message's descriptor is closed, not leaked.
	bad := testHandoff()
	bad.V = 7
	badMsg, _ := json.Marshal(bad)
	w1.Close()
	w1dup, _ := unix.Dup(int(w2.Fd()))
	if err := write(a, badMsg, unix.UnixRights(w1dup)); err != nil {
		t.Fatal(err)
	}
	unix.Close(w1dup)
	if _, _, err := Receive(b); !errors.Is(err, ErrMalformed) {
		t.Fatalf("bad hand-over: %v", err)
	}
	w2.Close()
	// Every write end is closed now (ours and the received copies): EOF.
	if n, err := r2.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Fatalf("pipe still open after the refused hand-over: %d, %v", n, err)
	}
}

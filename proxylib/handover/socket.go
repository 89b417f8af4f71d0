package handover

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/go-logr/logr"
	"golang.org/x/sys/unix"
)

// DefaultSocketPath is where the newest ztunnel takes hand-overs
// (docs/interfaces.md): next to the ZDS socket, on the hostPath every
// ztunnel pod of the node mounts.
const DefaultSocketPath = "/var/run/ambient/ztunnel-handover.sock"

// Accept takes one handed-over connection: it resumes the session and
// owns files, or returns why not (files are then closed by the caller).
type Accept func(d Decoded, files []*os.File) error

// Listener is the new ztunnel's end of the hand-over socket.
type Listener struct {
	ln   *net.UnixListener
	path string
	log  logr.Logger
}

// Listen replaces the socket file at path (so it leads to this process)
// and listens on it; Close never unlinks it (it may be a newer one's).
func Listen(path string, log logr.Logger) (*Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, err
	}
	_ = os.Remove(path)
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		return nil, fmt.Errorf("handover: listen %s: %w", path, err)
	}
	ln.SetUnlinkOnClose(false)
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, err
	}
	return &Listener{ln: ln, path: path, log: log}, nil
}

// Close stops taking hand-overs (before this process hands its own over,
// so it cannot reach itself).
func (l *Listener) Close() error { return l.ln.Close() }

// Serve accepts draining ztunnels until Close; each message is passed to
// accept and answered with an Ack.
func (l *Listener) Serve(accept Accept) error {
	for {
		c, err := l.ln.AcceptUnix()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			return err
		}
		go l.serveConn(c, accept)
	}
}

func (l *Listener) serveConn(c *net.UnixConn, accept Accept) {
	defer c.Close()
	if err := sameUser(c); err != nil {
		l.log.Info("hand-over connection refused", "err", err.Error())
		return
	}
	for {
		d, files, err := Receive(c)
		if err != nil {
			if !errors.Is(err, net.ErrClosed) && !errors.Is(err, io.EOF) {
				l.log.Info("hand-over message refused", "err", err.Error())
			}
			if errors.Is(err, ErrMalformed) {
				continue
			}
			return
		}
		ack := Ack{Session: d.ID.String(), OK: true}
		if err := accept(d, files); err != nil {
			for _, f := range files {
				f.Close()
			}
			ack.OK, ack.Error = false, err.Error()
		}
		if err := SendAck(c, ack); err != nil {
			return
		}
	}
}

// sameUser refuses a peer running as another user than us.
func sameUser(c *net.UnixConn) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) { cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) }); err != nil {
		return err
	}
	if cerr != nil {
		return cerr
	}
	if int(cred.Uid) != os.Geteuid() {
		return fmt.Errorf("peer uid %d is not ours (%d)", cred.Uid, os.Geteuid())
	}
	return nil
}

// Client is the draining ztunnel's end.
type Client struct{ c *net.UnixConn }

// DialSocket connects to the newest ztunnel's hand-over socket.
func DialSocket(ctx context.Context, path string) (*Client, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unixpacket", path)
	if err != nil {
		return nil, err
	}
	return &Client{c: c.(*net.UnixConn)}, nil
}

// ErrUnanswered: the sockets were sent but no ack came; the new ztunnel
// may be serving the connection.
var ErrUnanswered = errors.New("handover: hand-over sent but not acknowledged")

// HandOff sends one connection's sockets and waits for its ack; nil means
// the new ztunnel owns the connection now, ErrUnanswered that it may.
func (c *Client) HandOff(h Handoff, timeout time.Duration, socks ...*os.File) error {
	c.c.SetDeadline(time.Now().Add(timeout))
	defer c.c.SetDeadline(time.Time{})
	if err := Send(c.c, h, socks...); err != nil {
		return err
	}
	a, err := ReceiveAck(c.c)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrUnanswered, err)
	}
	if a.Session != h.Session {
		return fmt.Errorf("handover: ack for session %q, want %q", a.Session, h.Session)
	}
	if !a.OK {
		return fmt.Errorf("handover: refused by the new ztunnel: %s", a.Error)
	}
	return nil
}

// Close ends the connection.
func (c *Client) Close() error { return c.c.Close() }

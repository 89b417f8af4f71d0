// Package netnsutil runs code and opens sockets inside other network
// namespaces. A socket belongs to the namespace it was created in for its
// whole life, so ztunnel can create listeners in a pod's namespace from a
// briefly switched OS thread and serve them from ordinary goroutines.
package netnsutil

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Mark is set (SO_MARK) on every socket ztunnel opens inside a pod
// namespace; the redirection rules let marked packets pass.
const Mark = 0x539

// PodListenOptions are the options of ztunnel's listeners inside a pod.
// SO_REUSEPORT lets an upgrade's new ztunnel listen next to the old one;
// the old one's drain closes its listeners and the kernel sends every new
// connection to the new one (docs/interfaces.md, ZDS).
var PodListenOptions = SocketOptions{Mark: Mark, ReuseAddr: true, ReusePort: true}

// PodDialOptions are the options of ztunnel's connections from inside a
// pod: its mark, which the pod's redirection lets out unredirected.
var PodDialOptions = SocketOptions{Mark: Mark}

// Open opens a namespace file such as /proc/<pid>/ns/net or /run/netns/<name>.
func Open(path string) (*os.File, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open netns: %w", err)
	}
	return f, nil
}

// Run calls fn on an OS thread that has entered the namespace ns. If the
// thread cannot return to its original namespace it is left locked, which
// makes Go terminate it instead of reusing a thread in the wrong namespace.
func Run(ns *os.File, fn func() error) error {
	if ns == nil {
		return errors.New("netnsutil: nil namespace")
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			errc <- fmt.Errorf("open current netns: %w", err)
			return
		}
		defer orig.Close()
		if sameInode(orig, ns) {
			// Already there (the sidecar serving its own pod): entering a
			// namespace needs CAP_SYS_ADMIN even when it is the current one,
			// and an unprivileged proxy has none.
			ferr := fn()
			runtime.UnlockOSThread()
			errc <- ferr
			return
		}
		if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("setns: %w", err)
			return
		}
		ferr := fn()
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("restore netns: %w (function error: %v)", err, ferr)
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// runIn is Run, or fn on the caller's thread when ns is nil (the
// caller's namespace).
func runIn(ns *os.File, fn func() error) error {
	if ns == nil {
		return fn()
	}
	return Run(ns, fn)
}

// RunPath is Run with a namespace path.
func RunPath(path string, fn func() error) error {
	f, err := Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return Run(f, fn)
}

// SocketOptions are applied to sockets before bind/connect.
type SocketOptions struct {
	// Mark sets SO_MARK (0 leaves it unset). Use Mark for ztunnel's own sockets.
	Mark uint32
	// Transparent sets IP_TRANSPARENT / IPV6_TRANSPARENT, needed to accept
	// traffic for non-local addresses or to bind a foreign source address.
	Transparent bool
	// ReuseAddr sets SO_REUSEADDR (listeners restarted with the same port).
	ReuseAddr bool
	// ReusePort sets SO_REUSEPORT: two ztunnel instances (an upgrade's old
	// and new) listen on the same port and the kernel spreads new
	// connections over both; closing one sends every new connection to the
	// other. Only sockets of the same effective UID can share a port.
	ReusePort bool
}

func (o SocketOptions) control(network, _ string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		s := int(fd)
		if o.Mark != 0 {
			if serr = unix.SetsockoptInt(s, unix.SOL_SOCKET, unix.SO_MARK, int(o.Mark)); serr != nil {
				serr = fmt.Errorf("SO_MARK: %w", serr)
				return
			}
		}
		if o.ReuseAddr {
			if serr = unix.SetsockoptInt(s, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); serr != nil {
				serr = fmt.Errorf("SO_REUSEADDR: %w", serr)
				return
			}
		}
		if o.ReusePort {
			if serr = unix.SetsockoptInt(s, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); serr != nil {
				serr = fmt.Errorf("SO_REUSEPORT: %w", serr)
				return
			}
		}
		if o.Transparent {
			if network == "tcp6" || network == "udp6" {
				serr = unix.SetsockoptInt(s, unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1)
			} else {
				serr = unix.SetsockoptInt(s, unix.SOL_IP, unix.IP_TRANSPARENT, 1)
			}
			if serr != nil {
				serr = fmt.Errorf("IP_TRANSPARENT: %w", serr)
			}
		}
	})
	if err != nil {
		return err
	}
	return serr
}

// ListenTCP opens a TCP listener whose socket lives in namespace ns.
// A nil ns means the caller's namespace.
func ListenTCP(ns *os.File, addr string, opts SocketOptions) (net.Listener, error) {
	lc := net.ListenConfig{Control: opts.control}
	var ln net.Listener
	listen := func() (err error) {
		ln, err = lc.Listen(context.Background(), "tcp", addr)
		return err
	}
	if err := runIn(ns, listen); err != nil {
		return nil, err
	}
	return ln, nil
}

// ListenUDP opens a UDP socket bound to addr in namespace ns (nil: the
// caller's namespace).
func ListenUDP(ns *os.File, addr string, opts SocketOptions) (*net.UDPConn, error) {
	lc := net.ListenConfig{Control: opts.control}
	var pc net.PacketConn
	listen := func() (err error) {
		pc, err = lc.ListenPacket(context.Background(), "udp", addr)
		return err
	}
	if err := runIn(ns, listen); err != nil {
		return nil, err
	}
	return pc.(*net.UDPConn), nil
}

// DialTCP connects from inside namespace ns (nil: the caller's namespace).
// opts.Mark should be Mark for connections ztunnel makes from a pod's
// namespace, so the redirection rules do not capture them again. src, when
// valid, binds the local address (with Transparent for a foreign address).
func DialTCP(ctx context.Context, ns *os.File, src, dst netip.AddrPort, opts SocketOptions) (net.Conn, error) {
	d := net.Dialer{Control: opts.control}
	if src.IsValid() {
		d.LocalAddr = net.TCPAddrFromAddrPort(src)
	}
	var conn net.Conn
	// The socket is created (and the connect started) on the switched
	// thread; the namespace is fixed at socket creation.
	dial := func() (err error) {
		conn, err = d.DialContext(ctx, "tcp", dst.String())
		return err
	}
	if err := runIn(ns, dial); err != nil {
		return nil, err
	}
	return conn, nil
}

// ErrSameTuple is returned by DialFrom when the kernel kept handing out
// the port it must avoid.
var ErrSameTuple = errors.New("netnsutil: source port equals the port to avoid")

// DialFrom connects from src's address (transparent, for a foreign
// address) inside ns, on a port the kernel picks that is never
// src.Port(). A proxy giving an app a connection from its client's address
// must not reuse the client's own port towards the same destination: both
// connections would have one tuple in the pod's namespace (the kernel
// would deliver the app's SYN to the proxy's accepted socket of that
// tuple). The port is checked after bind, before any packet is sent; the
// socket is discarded and another taken when it matches.
func DialFrom(ctx context.Context, ns *os.File, src, dst netip.AddrPort, opts SocketOptions) (net.Conn, error) {
	network, family := "tcp4", unix.AF_INET
	if dst.Addr().Unmap().Is6() {
		network, family = "tcp6", unix.AF_INET6
	}
	d := net.Dialer{Control: func(nw, addr string, c syscall.RawConn) error {
		if err := opts.control(nw, addr, c); err != nil {
			return err
		}
		var berr error
		err := c.Control(func(fd uintptr) { berr = bindAvoiding(int(fd), family, src) })
		if err != nil {
			return err
		}
		return berr
	}}
	var conn net.Conn
	dial := func() (err error) {
		for range 8 {
			conn, err = d.DialContext(ctx, network, netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port()).String())
			if !errors.Is(err, ErrSameTuple) {
				return err
			}
		}
		return err
	}
	if err := runIn(ns, dial); err != nil {
		return nil, err
	}
	return conn, nil
}

// bindAvoiding binds fd to src's address with a kernel-chosen port and
// fails with ErrSameTuple when that port is src's own.
func bindAvoiding(fd, family int, src netip.AddrPort) error {
	a := src.Addr().Unmap()
	var sa unix.Sockaddr
	if family == unix.AF_INET6 {
		sa = &unix.SockaddrInet6{Addr: a.As16()}
	} else {
		if !a.Is4() {
			return fmt.Errorf("bind %s for an IPv4 destination: %w", a, syscall.EAFNOSUPPORT)
		}
		sa = &unix.SockaddrInet4{Addr: a.As4()}
	}
	if err := unix.Bind(fd, sa); err != nil {
		return fmt.Errorf("bind %s: %w", a, err)
	}
	got, err := unix.Getsockname(fd)
	if err != nil {
		return err
	}
	var port int
	switch g := got.(type) {
	case *unix.SockaddrInet4:
		port = g.Port
	case *unix.SockaddrInet6:
		port = g.Port
	}
	if src.Port() != 0 && port == int(src.Port()) {
		return ErrSameTuple
	}
	return nil
}

// Dial connects (network "tcp" or "udp") from inside namespace ns (nil:
// the caller's namespace) with opts, e.g. Mark for ztunnel's own DNS
// queries on a pod's behalf, which the pod's redirection lets out.
func Dial(ctx context.Context, ns *os.File, network, addr string, opts SocketOptions) (net.Conn, error) {
	d := net.Dialer{Control: opts.control}
	var conn net.Conn
	dial := func() (err error) {
		conn, err = d.DialContext(ctx, network, addr)
		return err
	}
	if err := runIn(ns, dial); err != nil {
		return nil, err
	}
	return conn, nil
}

// OriginalDst returns the destination a connection had before NAT REDIRECT
// (SO_ORIGINAL_DST for IPv4, IP6T_SO_ORIGINAL_DST for IPv6).
func OriginalDst(conn net.Conn) (netip.AddrPort, error) {
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("original dst: %T has no raw socket", conn)
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	local, _ := conn.LocalAddr().(*net.TCPAddr)
	v6 := local != nil && local.IP.To4() == nil
	var dst netip.AddrPort
	var serr error
	err = raw.Control(func(fd uintptr) {
		dst, serr = originalDst(int(fd), v6)
		if serr != nil { // dual-stack socket: the other family may know it
			if alt, aerr := originalDst(int(fd), !v6); aerr == nil {
				dst, serr = alt, nil
			}
		}
	})
	if err != nil {
		return netip.AddrPort{}, err
	}
	return dst, serr
}

const soOriginalDst = 80 // SO_ORIGINAL_DST == IP6T_SO_ORIGINAL_DST

func originalDst(fd int, v6 bool) (netip.AddrPort, error) {
	if v6 {
		var sa unix.RawSockaddrInet6
		if err := getsockopt(fd, unix.SOL_IPV6, soOriginalDst, unsafe.Pointer(&sa), unsafe.Sizeof(sa)); err != nil {
			return netip.AddrPort{}, fmt.Errorf("IP6T_SO_ORIGINAL_DST: %w", err)
		}
		addr := netip.AddrFrom16(sa.Addr).Unmap()
		return netip.AddrPortFrom(addr, ntohs(sa.Port)), nil
	}
	var sa unix.RawSockaddrInet4
	if err := getsockopt(fd, unix.SOL_IP, soOriginalDst, unsafe.Pointer(&sa), unsafe.Sizeof(sa)); err != nil {
		return netip.AddrPort{}, fmt.Errorf("SO_ORIGINAL_DST: %w", err)
	}
	return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), ntohs(sa.Port)), nil
}

func getsockopt(fd, level, opt int, p unsafe.Pointer, size uintptr) error {
	l := uint32(size)
	_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt),
		uintptr(p), uintptr(unsafe.Pointer(&l)), 0)
	if errno != 0 {
		return errno
	}
	return nil
}

func ntohs(p uint16) uint16 {
	b := (*[2]byte)(unsafe.Pointer(&p))
	return uint16(b[0])<<8 | uint16(b[1])
}

// Inode identifies a namespace file (two files with the same inode are the
// same namespace).
func Inode(f *os.File) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}

// IsCurrent reports whether ns is the namespace the process runs in (its
// threads outside Run). Netlink sockets opened "in" a namespace enter it,
// which needs CAP_SYS_ADMIN even for the current one; callers open them
// directly instead when this is true (the sidecar's init container, with
// CAP_NET_ADMIN only).
func IsCurrent(ns *os.File) bool {
	same := make(chan bool, 1)
	go func() {
		// A fresh locked thread: never one Run has moved elsewhere.
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		cur, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			same <- false
			return
		}
		defer cur.Close()
		same <- sameInode(cur, ns)
	}()
	return <-same
}

func sameInode(a, b *os.File) bool {
	ia, errA := Inode(a)
	ib, errB := Inode(b)
	return errA == nil && errB == nil && ia == ib
}

// IsNetNS reports whether f refers to a network namespace (nsfs file of
// type CLONE_NEWNET), so a stray path or descriptor is never used as one.
func IsNetNS(f *os.File) bool {
	var st unix.Statfs_t
	if err := unix.Fstatfs(int(f.Fd()), &st); err != nil || st.Type != unix.NSFS_MAGIC {
		return false
	}
	const nsGetNSType = 0xb703 // NS_GET_NSTYPE
	t, err := unix.IoctlRetInt(int(f.Fd()), nsGetNSType)
	return err == nil && t == unix.CLONE_NEWNET
}

// EnableListenerMigration sets net.ipv4.tcp_migrate_req=1 in namespace ns
// (Linux ≥ 5.14; it covers IPv6 too). When one of the listeners sharing a
// port with SO_REUSEPORT closes, the kernel then hands its pending
// handshakes and not yet accepted connections to another listener of the
// group instead of resetting them: an old ztunnel that stops listening
// during an upgrade drops no connection the new one can take.
func EnableListenerMigration(ns *os.File) error {
	return Run(ns, func() error {
		// /proc/sys/net resolves to the opening thread's namespace.
		if err := os.WriteFile("/proc/sys/net/ipv4/tcp_migrate_req", []byte("1"), 0); err != nil {
			return fmt.Errorf("net.ipv4.tcp_migrate_req: %w", err)
		}
		return nil
	})
}

// NewScratch creates an empty network namespace (only lo, down) that lives
// as long as the returned file is open: nothing is mounted, so closing it
// removes the namespace. For trying out a configuration without touching a
// real one.
func NewScratch() (*os.File, error) {
	type result struct {
		ns  *os.File
		err error
	}
	res := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			res <- result{err: fmt.Errorf("open current netns: %w", err)}
			return
		}
		defer orig.Close()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			res <- result{err: fmt.Errorf("unshare: %w", err)}
			return
		}
		ns, nerr := os.Open("/proc/thread-self/ns/net")
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			// Left locked: Go ends the thread instead of reusing it here.
			if ns != nil {
				ns.Close()
			}
			res <- result{err: fmt.Errorf("restore netns: %w", err)}
			return
		}
		runtime.UnlockOSThread()
		if nerr != nil {
			nerr = fmt.Errorf("open scratch netns: %w", nerr)
		}
		res <- result{ns, nerr}
	}()
	r := <-res
	return r.ns, r.err
}

package inpod

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"

	"github.com/ambientmesh/ambient/proxylib/netnsutil"
)

// In-pod ports (docs/interfaces.md).
const (
	PortOutbound = 15001
	PortInbound  = 15006
	PortHBONE    = 15008
	PortSOCKS5   = 15080
)

// PodListeners are ztunnel's sockets inside one pod's network namespace.
// They accept connections from ordinary goroutines; the namespace is only
// entered while creating them.
type PodListeners struct {
	Outbound net.Listener // :15001, redirected outbound; use netnsutil.OriginalDst
	Inbound  net.Listener // :15006, redirected plaintext inbound; OriginalDst is the pod's ip:port
	HBONE    net.Listener // :15008, HBONE (TCP)
	SOCKS5   net.Listener // 127.0.0.1:15080 (local testing only)
}

// OpenListeners creates the four listeners in netns, on all addresses (dual
// stack when the pod has IPv6, IPv4 otherwise). All are closed if any fails.
func OpenListeners(netns *os.File) (*PodListeners, error) {
	l := &PodListeners{}
	var err error
	open := func(dst *net.Listener, addrs ...string) {
		if err != nil {
			return
		}
		for _, a := range addrs {
			*dst, err = netnsutil.ListenTCP(netns, a, netnsutil.SocketOptions{ReuseAddr: true, ReusePort: true})
			if err == nil {
				return
			}
		}
		err = fmt.Errorf("listen %s in pod netns: %w", addrs[0], err)
	}
	open(&l.Outbound, fmt.Sprintf("[::]:%d", PortOutbound), fmt.Sprintf("0.0.0.0:%d", PortOutbound))
	open(&l.Inbound, fmt.Sprintf("[::]:%d", PortInbound), fmt.Sprintf("0.0.0.0:%d", PortInbound))
	open(&l.HBONE, fmt.Sprintf("[::]:%d", PortHBONE), fmt.Sprintf("0.0.0.0:%d", PortHBONE))
	open(&l.SOCKS5, fmt.Sprintf("127.0.0.1:%d", PortSOCKS5))
	if err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}

// Close closes every listener.
func (l *PodListeners) Close() error {
	var errs []error
	for _, ln := range []net.Listener{l.Outbound, l.Inbound, l.HBONE, l.SOCKS5} {
		if ln != nil {
			errs = append(errs, ln.Close())
		}
	}
	return errors.Join(errs...)
}

// DialFromPod opens a TCP connection from inside the pod's namespace with
// ztunnel's mark, so redirection does not capture it (e.g. delivering
// inbound traffic to the app, or an outbound connection on the pod's behalf).
func DialFromPod(ctx context.Context, netns *os.File, dst netip.AddrPort) (net.Conn, error) {
	return netnsutil.DialTCP(ctx, netns, netip.AddrPort{}, dst, netnsutil.SocketOptions{Mark: netnsutil.Mark})
}

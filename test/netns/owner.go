package netns

import (
	"context"
	"net"
	"net/netip"
	"os"

	"golang.org/x/sys/unix"

	"github.com/ambientmesh/ambient/proxylib/netnsutil"
)

// DialAs connects to dst from inside ns with a socket owned by uid, as a
// process of that user would: the socket is created while the thread's
// filesystem uid (which the kernel records as the socket's owner, the
// skuid/--uid-owner of the redirection rules) is uid.
func DialAs(ctx context.Context, ns *os.File, dst netip.AddrPort, uid int) (net.Conn, error) {
	var c net.Conn
	err := netnsutil.Run(ns, func() error {
		prev, err := unix.SetfsuidRetUid(uid)
		if err != nil {
			return err
		}
		defer unix.Setfsuid(prev)
		var d net.Dialer
		c, err = d.DialContext(ctx, "tcp", dst.String())
		return err
	})
	return c, err
}

package redirect

import (
	"encoding/binary"
	"fmt"
	"os"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/ambientmesh/ambient/proxylib/netnsutil"
)

// Preflight installs r's rules in a scratch network namespace and removes
// them, so a node whose kernel lacks something they need (nftables' tproxy
// or socket expressions, policy routing) is known at start with one clear
// error, not at every pod's capture.
func Preflight(r Redirector) error {
	ns, err := netnsutil.NewScratch()
	if err != nil {
		return fmt.Errorf("redirect preflight: %w", err)
	}
	defer ns.Close()
	if err := setLoopbackUp(ns); err != nil { // as in every pod
		return fmt.Errorf("redirect preflight: %w", err)
	}
	if err := r.Install(ns); err != nil {
		return fmt.Errorf("redirect preflight: this node cannot install the capture rules (%s): %w", describe(r), err)
	}
	if err := r.Remove(ns); err != nil {
		return fmt.Errorf("redirect preflight: removing the capture rules (%s): %w", describe(r), err)
	}
	return nil
}

// describe names the features r's rules use, for the preflight's error.
func describe(r Redirector) string {
	s := "NAT redirection"
	if r.InboundTPROXY() {
		s = "inbound TPROXY: nftables tproxy (nft_tproxy), policy routing"
	}
	if r.PreservesSource() {
		s += ", source preservation: connmark and policy routing"
	}
	return s
}

// setLoopbackUp brings lo of ns up (RTM_NEWLINK with IFF_UP).
func setLoopbackUp(ns *os.File) error {
	lo, err := loIndex(ns)
	if err != nil {
		return err
	}
	c, err := routeConn(ns)
	if err != nil {
		return err
	}
	defer c.Close()
	// struct ifinfomsg: family, pad, type (u16), index (i32), flags, change.
	msg := make([]byte, 16)
	binary.NativeEndian.PutUint32(msg[4:], uint32(lo))
	binary.NativeEndian.PutUint32(msg[8:], unix.IFF_UP)
	binary.NativeEndian.PutUint32(msg[12:], unix.IFF_UP)
	if _, err := c.Execute(netlink.Message{Header: netlink.Header{Type: unix.RTM_NEWLINK, Flags: netlink.Request | netlink.Acknowledge}, Data: msg}); err != nil {
		return fmt.Errorf("lo up: %w", err)
	}
	return nil
}

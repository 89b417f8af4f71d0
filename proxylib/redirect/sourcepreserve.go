package redirect

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/ambientmesh/ambient/proxylib/netnsutil"
)

// Source preservation (Config.PreserveSource), as Istio's in-pod mode: ztunnel
// delivers inbound connections to the app from the original client address
// (netnsutil.DialTCP with src = client, Transparent and Mark). The app's
// replies to that foreign address must come back to ztunnel's socket, not
// leave through eth0:
//
//	prerouting (mangle): mark&0xfff == 0x539  -> ct mark set 0x111
//	output (route):      ct mark&0xfff == 0x111 -> meta mark set 0x111 (re-route)
//	ip rule fwmark 0x111/0xfff lookup 133;  table 133: local default dev lo
const (
	ConnMark     = 0x111
	LocalTable   = 133
	rulePriority = 32764
)

func routeConn(ns *os.File) (*netlink.Conn, error) {
	if netnsutil.IsCurrent(ns) {
		return netlink.Dial(unix.NETLINK_ROUTE, nil)
	}
	return netlink.Dial(unix.NETLINK_ROUTE, &netlink.Config{NetNS: int(ns.Fd())})
}

func attrs(a []netlink.Attribute) []byte {
	b, _ := netlink.MarshalAttributes(a)
	return b
}

func u32(v uint32) []byte { return binary.NativeEndian.AppendUint32(nil, v) }

// fibRule is RTM_NEWRULE/DELRULE: fwmark ConnMark/MarkMask -> table LocalTable.
func fibRule(family uint8, mask uint32) []byte {
	hdr := []byte{family, 0, 0, 0, 0 /* table in attr */, 0, 0, unix.FR_ACT_TO_TBL, 0, 0, 0, 0}
	return append(hdr, attrs([]netlink.Attribute{
		{Type: unix.FRA_FWMARK, Data: u32(ConnMark)},
		{Type: unix.FRA_FWMASK, Data: u32(mask)},
		{Type: unix.FRA_TABLE, Data: u32(LocalTable)},
		{Type: unix.FRA_PRIORITY, Data: u32(rulePriority)},
	})...)
}

// localDefault is RTM_NEWROUTE/DELROUTE: local default dev lo table LocalTable.
func localDefault(family uint8, lo int) []byte {
	hdr := []byte{family, 0, 0, 0, unix.RT_TABLE_UNSPEC, unix.RTPROT_BOOT, unix.RT_SCOPE_HOST, unix.RTN_LOCAL, 0, 0, 0, 0}
	return append(hdr, attrs([]netlink.Attribute{
		{Type: unix.RTA_OIF, Data: u32(uint32(lo))},
		{Type: unix.RTA_TABLE, Data: u32(LocalTable)},
	})...)
}

func loIndex(ns *os.File) (int, error) {
	var idx int
	err := netnsutil.Run(ns, func() error {
		lo, err := net.InterfaceByName("lo")
		if err == nil {
			idx = lo.Index
		}
		return err
	})
	return idx, err
}

// setLocalRouting adds (or removes) the rule and route for both families.
// Adding what exists and removing what is absent are not errors.
func setLocalRouting(ns *os.File, mask uint32, add bool) error {
	lo, err := loIndex(ns)
	if err != nil {
		return err
	}
	c, err := routeConn(ns)
	if err != nil {
		return err
	}
	defer c.Close()
	flags := netlink.Request | netlink.Acknowledge
	ruleType, routeType := netlink.HeaderType(unix.RTM_DELRULE), netlink.HeaderType(unix.RTM_DELROUTE)
	if add {
		flags |= netlink.Create | netlink.Excl
		ruleType, routeType = unix.RTM_NEWRULE, unix.RTM_NEWROUTE
	}
	var errs []error
	for _, fam := range []uint8{unix.AF_INET, unix.AF_INET6} {
		for _, m := range []netlink.Message{
			{Header: netlink.Header{Type: ruleType, Flags: flags}, Data: fibRule(fam, mask)},
			{Header: netlink.Header{Type: routeType, Flags: flags}, Data: localDefault(fam, lo)},
		} {
			_, err := c.Execute(m)
			if err == nil || (add && errors.Is(err, unix.EEXIST)) || (!add && (errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ESRCH))) {
				continue
			}
			errs = append(errs, fmt.Errorf("policy routing (family %d): %w", fam, err))
		}
	}
	return errors.Join(errs...)
}

// HasSourceRouting reports whether ns has the return path for transparent
// dials: the IPv4 policy rule and the local default route of LocalTable.
// ztunnel checks it before dialling apps from client addresses.
func HasSourceRouting(ns *os.File) (bool, error) {
	if ok, err := hasLocalRouting(ns); err != nil || !ok {
		return false, err
	}
	return hasLocalRoute(ns)
}

func dump(ns *os.File, typ netlink.HeaderType) ([]netlink.Message, error) {
	c, err := routeConn(ns)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	return c.Execute(netlink.Message{
		Header: netlink.Header{Type: typ, Flags: netlink.Request | netlink.Dump},
		Data:   []byte{unix.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
	})
}

// hasLocalRoute reports whether LocalTable holds the IPv4 local default.
func hasLocalRoute(ns *os.File) (bool, error) {
	msgs, err := dump(ns, unix.RTM_GETROUTE)
	if err != nil {
		return false, err
	}
	for _, m := range msgs {
		// rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags(4)
		if len(m.Data) < 12 || m.Data[1] != 0 || m.Data[7] != unix.RTN_LOCAL {
			continue
		}
		ad, err := netlink.NewAttributeDecoder(m.Data[12:])
		if err != nil {
			continue
		}
		table := uint32(m.Data[4])
		for ad.Next() {
			if ad.Type() == unix.RTA_TABLE {
				table = ad.Uint32()
			}
		}
		if table == LocalTable {
			return true, nil
		}
	}
	return false, nil
}

// hasLocalRouting reports whether the IPv4 rule is present.
func hasLocalRouting(ns *os.File) (bool, error) {
	msgs, err := dump(ns, unix.RTM_GETRULE)
	if err != nil {
		return false, err
	}
	for _, m := range msgs {
		if len(m.Data) < 12 {
			continue
		}
		ad, err := netlink.NewAttributeDecoder(m.Data[12:])
		if err != nil {
			continue
		}
		var mark, table uint32
		for ad.Next() {
			switch ad.Type() {
			case unix.FRA_FWMARK:
				mark = ad.Uint32()
			case unix.FRA_TABLE:
				table = ad.Uint32()
			}
		}
		if mark == ConnMark && table == LocalTable {
			return true, nil
		}
	}
	return false, nil
}

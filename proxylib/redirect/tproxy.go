package redirect

import (
	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// TPROXY inbound capture (Config.InboundTPROXY), as Istio ambient's in-pod
// rules: instead of a NAT REDIRECT, the prerouting chain is a filter chain
// at mangle priority whose last rule is
//
//	meta l4proto tcp meta mark set 0x111 tproxy to :15006
//
// The kernel hands the packet, unchanged, to ztunnel's IP_TRANSPARENT
// listener (or the established socket of the same tuple); the mark sends it
// through the same policy route as source preservation (ip rule fwmark
// 0x111/0xfff lookup 133; table 133: local default dev lo), so a packet for
// the app's address is delivered locally. The accepted socket's local
// address is the original destination and no conntrack NAT entry exists.

// preroutingChainSpec is the inbound chain: nat for REDIRECT, filter at
// mangle priority for TPROXY (tproxy is only valid in prerouting, before
// the routing decision).
func (n *NFTables) preroutingChainSpec(t *nftables.Table) *nftables.Chain {
	if n.cfg.InboundTPROXY {
		return &nftables.Chain{Name: preroutingChain, Table: t, Type: nftables.ChainTypeFilter,
			Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityMangle}
	}
	return &nftables.Chain{Name: preroutingChain, Table: t, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityNATDest}
}

// needsLocalRouting: both source preservation and TPROXY route ConnMark
// packets to the local table.
func (n *NFTables) needsLocalRouting() bool { return n.cfg.PreserveSource || n.cfg.InboundTPROXY }

// tproxyTo sets the mark and diverts to port on the packet's own address
// (either family, so the inet table serves IPv4 and IPv6).
func tproxyTo(port uint16) []expr.Any {
	return []expr.Any{
		&expr.Immediate{Register: 1, Data: binaryutil.NativeEndian.PutUint32(ConnMark)},
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1, SourceRegister: true},
		&expr.Immediate{Register: 1, Data: binaryutil.BigEndian.PutUint16(port)},
		&expr.TProxy{Family: unix.NFPROTO_UNSPEC, TableFamily: byte(nftables.TableFamilyINet), RegPort: 1},
	}
}

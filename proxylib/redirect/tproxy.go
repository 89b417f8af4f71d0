package redirect

import (
	"fmt"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// TPROXY inbound capture (Config.InboundTPROXY), as Istio ambient's in-pod
// rules: instead of a NAT REDIRECT, the prerouting chain is a filter chain
// at mangle priority whose last rules are
//
//	ct state established,related return
//	meta l4proto tcp meta mark set 0x111 tproxy to :15006 accept
//	meta l4proto tcp drop
//
// The kernel hands the packet, unchanged, to ztunnel's IP_TRANSPARENT
// listener (or the established socket of the same tuple); the mark sends it
// through the same policy route as source preservation (ip rule fwmark
// 0x111/0xfff lookup 133; table 133: local default dev lo), so a packet for
// the app's address is delivered locally. The accepted socket's local
// address is the original destination and no conntrack NAT entry exists.
//
// Fail closed: nftables' tproxy does not drop a packet for which no
// transparent socket listens (ztunnel not there yet, or a ztunnel too old
// to open its listener transparent); it only ends the rule, and the packet
// would reach the app past ztunnel. The drop after it keeps such
// connections out (the client's SYN retransmission gets through once
// ztunnel listens), as a REDIRECT to a port nobody listens on is refused.
//
// Conntrack: only new connections are diverted (ct state established,related
// return before the tproxy rule, as Istio's in-pod rules). Packets of a
// connection ztunnel already accepted reach its socket by the ordinary
// established lookup (the app's address is local), and connections that
// were NATed to :15006 before the mesh switched from NAT to TPROXY keep
// their NAT binding: diverting their packets to the listener would reset
// them. ztunnel's own connection to the app from the client's address
// (marked 0x539) gets ct mark 0x111 (the source-preservation chains, which
// TPROXY mode needs: Config.PreserveSource), so the app's replies are
// routed back to ztunnel and never leave the pod or meet the NAT output
// chain as new connections; ztunnel never reuses the client's own port for
// it (netnsutil.DialFrom), so the two connections never share a tuple.

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
		&expr.Verdict{Kind: expr.VerdictAccept},
	}
}

// ctEstablished: ct state established,related return.
func ctEstablished() []expr.Any {
	return []expr.Any{
		&expr.Ct{Key: expr.CtKeySTATE, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(expr.CtStateBitESTABLISHED | expr.CtStateBitRELATED), Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)},
		verdictReturn(),
	}
}

// preroutingModeMatches reports whether the installed prerouting chain is
// of the configured mode (nat for REDIRECT, filter for TPROXY): the rule
// counts alone cannot tell the two apart, and a node agent switched to the
// other mode must replace the rules of pods it re-adopts.
func (n *NFTables) preroutingModeMatches(c *nftables.Conn) (bool, error) {
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return false, fmt.Errorf("list chains: %w", err)
	}
	want := n.preroutingChainSpec(table())
	for _, ch := range chains {
		if ch.Table.Name == TableName && ch.Name == preroutingChain {
			return ch.Type == want.Type, nil
		}
	}
	return false, nil
}

// InboundTPROXY reports whether Install captures inbound with TPROXY.
func (n *NFTables) InboundTPROXY() bool { return n.cfg.InboundTPROXY }

package redirect

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"github.com/ambientmesh/ambient/proxylib/netnsutil"
)

// NFTables implements Redirector with one `inet ambient` table and two nat
// chains, written in a single netlink transaction:
//
//	table inet ambient {
//	  chain output {      type nat hook output priority -100
//	    meta mark & 0xfff == 0x539 return
//	    meta skuid <skip owner> return ...
//	    oifname "lo" return
//	    tcp dport <skip outbound port> return ...
//	    udp dport <skip outbound port> return ...       (DNS capture only)
//	    ip(6) daddr <skip destination> return ...
//	    udp dport 53 redirect to :15053                  (DNS capture only)
//	    tcp dport 53 redirect to :15053                  (DNS capture only)
//	    meta l4proto tcp redirect to :15001 }
//	  chain prerouting {  type nat hook prerouting priority -100
//	    meta mark & 0xfff == 0x539 return
//	    iifname "lo" return
//	    ip(6) saddr <skip source> return ...
//	    tcp dport <ztunnel port> return ...
//	    meta l4proto tcp redirect to :15006 }
//	}
//
// With Config.InboundTPROXY the prerouting chain is a filter chain at
// mangle priority ending in a tproxy rule instead (tproxy.go).
type NFTables struct{ cfg Config }

// NewNFTables returns the nftables backend.
func NewNFTables(cfg Config) *NFTables { return &NFTables{cfg: cfg} }

var _ Redirector = (*NFTables)(nil)

const (
	outputChain     = "output"
	preroutingChain = "prerouting"
)

func (n *NFTables) conn(ns *os.File) (*nftables.Conn, error) {
	if ns == nil {
		return nil, errors.New("redirect: nil namespace")
	}
	return nftConn(ns)
}

// nftConn opens nftables in ns, directly when ns is the current namespace
// (see netnsutil.IsCurrent).
func nftConn(ns *os.File) (*nftables.Conn, error) {
	var opts []nftables.ConnOption
	if !netnsutil.IsCurrent(ns) {
		opts = append(opts, nftables.WithNetNSFd(int(ns.Fd())))
	}
	c, err := nftables.New(opts...)
	if err != nil {
		return nil, fmt.Errorf("nftables: %w", err)
	}
	return c, nil
}

func table() *nftables.Table {
	return &nftables.Table{Name: TableName, Family: nftables.TableFamilyINet}
}

// Install atomically replaces the table: add (no-op if present), delete,
// add with all chains and rules, in one batch.
func (n *NFTables) Install(ns *os.File) error {
	c, err := n.conn(ns)
	if err != nil {
		return err
	}
	t := table()
	c.AddTable(t)
	c.DelTable(t)
	c.AddTable(t)
	out := c.AddChain(&nftables.Chain{Name: outputChain, Table: t, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityNATDest})
	pre := c.AddChain(n.preroutingChainSpec(t))
	for _, e := range n.outputRules() {
		c.AddRule(&nftables.Rule{Table: t, Chain: out, Exprs: e})
	}
	for _, e := range n.preroutingRules() {
		c.AddRule(&nftables.Rule{Table: t, Chain: pre, Exprs: e})
	}
	if n.cfg.PreserveSource {
		mpre := c.AddChain(&nftables.Chain{Name: manglePrerouting, Table: t, Type: nftables.ChainTypeFilter,
			Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityMangle})
		mout := c.AddChain(&nftables.Chain{Name: mangleOutput, Table: t, Type: nftables.ChainTypeRoute,
			Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityMangle})
		c.AddRule(&nftables.Rule{Table: t, Chain: mpre, Exprs: n.connmarkFromMark()})
		c.AddRule(&nftables.Rule{Table: t, Chain: mout, Exprs: n.markFromConnmark()})
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("install nftables rules: %w", err)
	}
	// Without preservation, drop a return path an earlier install (with
	// --preserve-source) left: the rules then match the config exactly.
	return setLocalRouting(ns, n.cfg.MarkMask, n.needsLocalRouting())
}

// PreservesSource reports whether Install sets up source preservation.
func (n *NFTables) PreservesSource() bool { return n.cfg.PreserveSource }

const (
	manglePrerouting = "mangle_prerouting"
	mangleOutput     = "mangle_output"
)

// connmarkFromMark: ztunnel's (marked) connections get ct mark ConnMark.
func (n *NFTables) connmarkFromMark() []expr.Any {
	return append(n.markMatch(),
		&expr.Immediate{Register: 1, Data: binaryutil.NativeEndian.PutUint32(ConnMark)},
		&expr.Ct{Key: expr.CtKeyMARK, Register: 1, SourceRegister: true},
	)
}

// markFromConnmark: packets of those connections (the app's replies) carry
// ConnMark, which the policy rule routes to the local table.
func (n *NFTables) markFromConnmark() []expr.Any {
	return []expr.Any{
		&expr.Ct{Key: expr.CtKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(n.cfg.MarkMask), Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(ConnMark & n.cfg.MarkMask)},
		&expr.Immediate{Register: 1, Data: binaryutil.NativeEndian.PutUint32(ConnMark)},
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1, SourceRegister: true},
	}
}

// Remove deletes the table if present.
func (n *NFTables) Remove(ns *os.File) error {
	c, err := n.conn(ns)
	if err != nil {
		return err
	}
	t := table()
	c.AddTable(t) // makes the delete succeed when the table is absent
	c.DelTable(t)
	if err := c.Flush(); err != nil {
		return fmt.Errorf("remove nftables rules: %w", err)
	}
	// Always: a previous install may have preserved sources.
	return setLocalRouting(ns, n.cfg.MarkMask, false)
}

// Installed checks the table, both chains and their rule counts.
func (n *NFTables) Installed(ns *os.File) (bool, error) {
	c, err := n.conn(ns)
	if err != nil {
		return false, err
	}
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return false, fmt.Errorf("list tables: %w", err)
	}
	found := false
	for _, t := range tables {
		found = found || t.Name == TableName
	}
	if !found {
		return false, nil
	}
	if ok, err := n.preroutingModeMatches(c); err != nil || !ok {
		return false, err
	}
	want := map[string]int{outputChain: len(n.outputRules()), preroutingChain: len(n.preroutingRules())}
	if n.cfg.PreserveSource {
		want[manglePrerouting], want[mangleOutput] = 1, 1
	}
	if n.needsLocalRouting() {
		if ok, err := HasSourceRouting(ns); err != nil || !ok {
			return false, err
		}
	}
	for name, count := range want {
		ch := &nftables.Chain{Name: name, Table: table()}
		rules, err := c.GetRules(table(), ch)
		if err != nil {
			return false, nil // chain missing: incomplete
		}
		if len(rules) != count {
			return false, nil
		}
	}
	return true, nil
}

func (n *NFTables) outputRules() [][]expr.Any {
	rules := [][]expr.Any{append(n.markMatch(), verdictReturn())}
	for _, uid := range n.cfg.SkipOwnerUIDs {
		rules = append(rules, append(ownerUID(uid), verdictReturn()))
	}
	rules = append(rules, append(ifName(expr.MetaKeyOIFNAME, "lo"), verdictReturn()))
	for _, port := range n.cfg.SkipOutboundPorts {
		rules = append(rules, append(tcpDport(port), verdictReturn()))
		if n.cfg.DNSPort != 0 {
			rules = append(rules, append(udpDport(port), verdictReturn()))
		}
	}
	for _, p := range n.cfg.SkipOutboundDestinations {
		rules = append(rules, append(prefixMatch(p, true), verdictReturn()))
	}
	if n.cfg.DNSPort != 0 {
		rules = append(rules,
			append(udpDport(53), redirectTo(n.cfg.DNSPort)...),
			append(tcpDport(53), redirectTo(n.cfg.DNSPort)...))
	}
	return append(rules, append(tcpOnly(), redirectTo(n.cfg.OutboundPort)...))
}

func (n *NFTables) preroutingRules() [][]expr.Any {
	rules := [][]expr.Any{
		append(n.markMatch(), verdictReturn()),
		append(ifName(expr.MetaKeyIIFNAME, "lo"), verdictReturn()),
	}
	for _, p := range n.cfg.SkipInboundSources {
		rules = append(rules, append(prefixMatch(p, false), verdictReturn()))
	}
	for _, port := range n.cfg.SkipInboundPorts {
		rules = append(rules, append(tcpDport(port), verdictReturn()))
	}
	if n.cfg.InboundTPROXY {
		return append(rules, ctEstablished(), append(tcpOnly(), tproxyTo(n.cfg.InboundPort)...),
			append(tcpOnly(), &expr.Verdict{Kind: expr.VerdictDrop}))
	}
	return append(rules, append(tcpOnly(), redirectTo(n.cfg.InboundPort)...))
}

func (n *NFTables) markMatch() []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(n.cfg.MarkMask), Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(n.cfg.Mark & n.cfg.MarkMask)},
	}
}

func ifName(key expr.MetaKey, name string) []expr.Any {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, name)
	return []expr.Any{
		&expr.Meta{Key: key, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: b},
	}
}

func tcpOnly() []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
	}
}

func tcpDport(port uint16) []expr.Any {
	return append(tcpOnly(),
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(port)},
	)
}

func udpDport(port uint16) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_UDP}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(port)},
	}
}

func redirectTo(port uint16) []expr.Any {
	return []expr.Any{
		&expr.Immediate{Register: 1, Data: binaryutil.BigEndian.PutUint16(port)},
		&expr.Redir{RegisterProtoMin: 1},
	}
}

// ownerUID matches packets of sockets owned by uid (meta skuid).
func ownerUID(uid uint32) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeySKUID, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(uid)},
	}
}

// prefixMatch matches the network-layer source (or, with dst, the
// destination) against p in an inet table.
func prefixMatch(p netip.Prefix, dst bool) []expr.Any {
	p = p.Masked()
	family, offset := byte(unix.NFPROTO_IPV4), uint32(12)
	if p.Addr().Is6() {
		family, offset = unix.NFPROTO_IPV6, 8
	}
	if dst {
		offset += uint32(p.Addr().BitLen() / 8)
	}
	addr := p.Addr().AsSlice()
	mask := net.CIDRMask(p.Bits(), len(addr)*8)
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{family}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: uint32(len(addr))},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: uint32(len(addr)), Mask: mask, Xor: make([]byte, len(addr))},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: addr},
	}
}

func verdictReturn() expr.Any { return &expr.Verdict{Kind: expr.VerdictReturn} }

package redirect

import (
	"errors"
	"fmt"
	"net/netip"
	"os"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// Kubelet probes come from the node itself. Captured pods would redirect
// them to ztunnel's inbound port, where STRICT mTLS refuses plaintext. As
// Istio does, the node source-NATs connections that host sockets open to
// captured pods to a link-local address, and the in-pod rules let that
// address through (DefaultConfig skips it). Forwarded traffic (other pods,
// other nodes) has no local socket and is never rewritten.
var (
	ProbeSourceV4 = netip.MustParseAddr("169.254.7.127")
	ProbeSourceV6 = netip.MustParseAddr("fd16:9254:7127:1337:ffff:ffff:ffff:ffff")
)

// ProbeSNAT manages table `inet ambient_host` in the node's namespace:
//
//	set pods4 { type ipv4_addr }  set pods6 { type ipv6_addr }
//	chain postrouting { type nat hook postrouting priority srcnat
//	  meta skuid <any> ip daddr @pods4 snat ip to 169.254.7.127
//	  meta skuid <any> ip6 daddr @pods6 snat ip6 to fd16:9254:7127:1337:ffff:ffff:ffff:ffff }
//
// (`meta skuid` only matches packets that have a local socket.)
type ProbeSNAT struct{}

// HostTableName is the node-side table.
const HostTableName = "ambient_host"

func hostTable() *nftables.Table {
	return &nftables.Table{Name: HostTableName, Family: nftables.TableFamilyINet}
}

func hostSets(t *nftables.Table) (v4, v6 *nftables.Set) {
	return &nftables.Set{Table: t, Name: "pods4", KeyType: nftables.TypeIPAddr},
		&nftables.Set{Table: t, Name: "pods6", KeyType: nftables.TypeIP6Addr}
}

func hostConn(ns *os.File) (*nftables.Conn, error) {
	if ns == nil {
		return nftables.New()
	}
	return nftables.New(nftables.WithNetNSFd(int(ns.Fd())))
}

// Install (re)creates the table with empty pod sets; ns nil is the caller's
// namespace (the node agent runs on the host network).
func (ProbeSNAT) Install(ns *os.File) error {
	c, err := hostConn(ns)
	if err != nil {
		return err
	}
	t := hostTable()
	c.AddTable(t)
	c.DelTable(t)
	c.AddTable(t)
	v4, v6 := hostSets(t)
	if err := c.AddSet(v4, nil); err != nil {
		return err
	}
	if err := c.AddSet(v6, nil); err != nil {
		return err
	}
	ch := c.AddChain(&nftables.Chain{Name: "postrouting", Table: t, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource})
	for _, r := range []struct {
		set     *nftables.Set
		proto   byte
		off     uint32
		to      netip.Addr
		natFam  uint32
		addrLen uint32
	}{
		{v4, unix.NFPROTO_IPV4, 16, ProbeSourceV4, unix.NFPROTO_IPV4, 4},
		{v6, unix.NFPROTO_IPV6, 24, ProbeSourceV6, unix.NFPROTO_IPV6, 16},
	} {
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: []expr.Any{
			&expr.Meta{Key: expr.MetaKeySKUID, Register: 1}, // breaks without a local socket
			&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{r.proto}},
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: r.off, Len: r.addrLen},
			&expr.Lookup{SourceRegister: 1, SetName: r.set.Name, SetID: r.set.ID},
			&expr.Immediate{Register: 1, Data: r.to.AsSlice()},
			&expr.NAT{Type: expr.NATTypeSourceNAT, Family: r.natFam, RegAddrMin: 1},
		}})
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("install probe SNAT: %w", err)
	}
	return nil
}

// Remove deletes the table.
func (ProbeSNAT) Remove(ns *os.File) error {
	c, err := hostConn(ns)
	if err != nil {
		return err
	}
	t := hostTable()
	c.AddTable(t)
	c.DelTable(t)
	return c.Flush()
}

// AddPod adds a captured pod's addresses.
func (ProbeSNAT) AddPod(ns *os.File, ips []netip.Addr) error {
	return updateSets(ns, ips, true)
}

// RemovePod removes a released pod's addresses.
func (ProbeSNAT) RemovePod(ns *os.File, ips []netip.Addr) error {
	return updateSets(ns, ips, false)
}

func updateSets(ns *os.File, ips []netip.Addr, add bool) error {
	if len(ips) == 0 {
		return nil
	}
	c, err := hostConn(ns)
	if err != nil {
		return err
	}
	v4, v6 := hostSets(hostTable())
	var e4, e6 []nftables.SetElement
	for _, ip := range ips {
		ip = ip.Unmap()
		if ip.Is4() {
			e4 = append(e4, nftables.SetElement{Key: ip.AsSlice()})
		} else {
			e6 = append(e6, nftables.SetElement{Key: ip.AsSlice()})
		}
	}
	var errs []error
	for _, s := range []struct {
		set *nftables.Set
		els []nftables.SetElement
	}{{v4, e4}, {v6, e6}} {
		if len(s.els) == 0 {
			continue
		}
		if add {
			errs = append(errs, c.SetAddElements(s.set, s.els))
		} else {
			errs = append(errs, c.SetDeleteElements(s.set, s.els))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if err := c.Flush(); err != nil {
		if !add && errors.Is(err, unix.ENOENT) {
			return nil // already absent
		}
		return fmt.Errorf("update probe SNAT set: %w", err)
	}
	return nil
}

// Ensure installs the table unless a complete one is present, keeping the
// pod sets of a previous agent process (no window where probes break).
func (p ProbeSNAT) Ensure(ns *os.File) error {
	c, err := hostConn(ns)
	if err != nil {
		return err
	}
	if rules, err := c.GetRules(hostTable(), &nftables.Chain{Name: "postrouting", Table: hostTable()}); err == nil && len(rules) == 2 {
		return nil
	}
	return p.Install(ns)
}

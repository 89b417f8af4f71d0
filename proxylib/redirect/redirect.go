// Package redirect installs and removes the in-pod traffic redirection that
// sends a captured pod's TCP to ztunnel's sockets in the same namespace:
// outbound to 15001, inbound to 15006. Packets carrying ztunnel's mark are
// never redirected, so ztunnel's own connections pass. With DNS capture
// (Config.DNSPort) the pod's DNS, UDP and TCP port 53, goes to ztunnel's
// DNS proxy (15053); other UDP is left alone.
package redirect

import (
	"net/netip"
	"os"

	"github.com/ambientmesh/ambient/proxylib/netnsutil"
)

// Config describes the redirection; DefaultConfig matches docs/interfaces.md.
type Config struct {
	OutboundPort uint16 // ztunnel outbound capture (15001)
	InboundPort  uint16 // ztunnel inbound plaintext capture (15006)
	// SkipInboundPorts are pod ports that inbound traffic reaches directly
	// (ztunnel's own in-pod listeners).
	SkipInboundPorts []uint16
	Mark, MarkMask   uint32 // packets with mark&MarkMask == Mark pass untouched
	// SkipInboundSources pass inbound traffic from these prefixes untouched:
	// by default the node's probe SNAT addresses (see ProbeSNAT).
	SkipInboundSources []netip.Prefix
	// SkipOwnerUIDs pass outbound packets of sockets owned by these users
	// untouched: the sidecar's own connections, since a proxy running
	// unprivileged inside its pod cannot set a mark (SO_MARK needs
	// CAP_NET_ADMIN).
	SkipOwnerUIDs []uint32
	// SkipOutboundPorts and SkipOutboundDestinations pass outbound traffic
	// to these destination ports or prefixes untouched (Istio's
	// traffic.sidecar.istio.io/excludeOutboundPorts and
	// excludeOutboundIPRanges).
	SkipOutboundPorts        []uint16
	SkipOutboundDestinations []netip.Prefix
	// PreserveSource adds the connmark and policy routing that let ztunnel
	// connect to the app from the client's own address (see
	// sourcepreserve.go). Off in DefaultConfig; the node agent turns it on.
	PreserveSource bool
	// DNSPort, when not 0, redirects the pod's outbound DNS (UDP and TCP to
	// port 53) to ztunnel's DNS proxy on this port (15053, WithDNS): Istio
	// ambient's DNS capture. Marked packets (ztunnel forwarding the query to
	// the pod's resolver), loopback and the skipped destinations and ports
	// pass.
	DNSPort uint16
	// InboundTPROXY captures inbound TCP with TPROXY instead of a NAT
	// REDIRECT (see tproxy.go): no NAT entry is made for the client's
	// tuple, so ztunnel's transparent dial from an outside client's address
	// cannot collide with it. ztunnel's InboundPort listener must then be
	// IP_TRANSPARENT and read the original destination from its local
	// address.
	InboundTPROXY bool
}

// DNSProxyPort is ztunnel's DNS proxy in each pod (docs/interfaces.md).
const DNSProxyPort = 15053

// WithDNS returns c with DNS capture to ztunnel's DNS proxy.
func (c Config) WithDNS() Config {
	c.DNSPort = DNSProxyPort
	return c
}

// DefaultConfig is the contract: 15001 out, 15006 in, ztunnel ports and
// marked packets skipped.
func DefaultConfig() Config {
	return Config{
		OutboundPort:     15001,
		InboundPort:      15006,
		SkipInboundPorts: []uint16{15008, 15001, 15006, 15080, 15053},
		Mark:             netnsutil.Mark,
		MarkMask:         0xfff,
		SkipInboundSources: []netip.Prefix{
			netip.PrefixFrom(ProbeSourceV4, 32), netip.PrefixFrom(ProbeSourceV6, 128),
		},
	}
}

// Redirector manages the rules in one pod namespace at a time. All methods
// are idempotent.
type Redirector interface {
	// Install replaces any previous ambient rules in ns with the current ones.
	Install(ns *os.File) error
	// Remove deletes exactly the rules Install created; absent rules are fine.
	Remove(ns *os.File) error
	// Installed reports whether complete ambient rules are present in ns
	// (used to re-adopt pods after a node-agent restart).
	Installed(ns *os.File) (bool, error)
	// PreservesSource reports whether Install also installs the return path
	// for transparent dials from client addresses (Config.PreserveSource);
	// the node agent tells ztunnel (ZDS AddWorkload.preserve_source).
	PreservesSource() bool
	// InboundTPROXY reports whether Install captures inbound traffic with
	// TPROXY (Config.InboundTPROXY); the node agent tells ztunnel (ZDS
	// AddWorkload.inbound_tproxy).
	InboundTPROXY() bool
}

// TableName is the nftables table (family inet) holding every rule.
const TableName = "ambient"

// Package serviceentry holds the rules for Istio ServiceEntries that the
// discovery model and the VIP allocator share: which hosts get an
// auto-allocated VIP, where the allocation is kept (status.addresses, as
// Istio keeps it, so it survives restarts), and how a fresh one is chosen
// without collisions.
package serviceentry

import (
	"fmt"
	"net/netip"
	"strings"

	networkingv1alpha3 "istio.io/api/networking/v1alpha3"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
)

// AutoallocateLabel set to "false" opts a ServiceEntry out of VIP
// auto-allocation (Istio's label).
const AutoallocateLabel = "networking.istio.io/enable-autoallocate-ip"

// The ranges Istio auto-allocates ServiceEntry VIPs from (Class E and a
// benchmarking range, neither routed anywhere).
var (
	IPv4Range = netip.MustParsePrefix("240.240.0.0/16")
	IPv6Range = netip.MustParsePrefix("2001:2::/48")
)

// Wildcard reports whether host is a wildcard host ("*.example.com").
func Wildcard(host string) bool { return strings.HasPrefix(host, "*") }

// ShouldAutoAllocate: hosts of a ServiceEntry get VIPs unless its
// resolution is NONE (the data plane keeps the original destination, a
// VIP could not be honoured), it names its own addresses, or it opts out.
func ShouldAutoAllocate(se *networkingv1.ServiceEntry) bool {
	if se.Spec.Resolution == networkingv1alpha3.ServiceEntry_NONE || len(se.Spec.Addresses) > 0 {
		return false
	}
	return !strings.EqualFold(se.Labels[AutoallocateLabel], "false")
}

// StatusAddresses are the allocated VIPs recorded in the ServiceEntry's
// status, by host (unparsable values are ignored).
func StatusAddresses(se *networkingv1.ServiceEntry) map[string][]netip.Addr {
	out := map[string][]netip.Addr{}
	for _, a := range se.Status.GetAddresses() {
		if ip, err := netip.ParseAddr(a.GetValue()); err == nil && a.GetHost() != "" {
			out[a.GetHost()] = append(out[a.GetHost()], ip.Unmap())
		}
	}
	return out
}

// HostAddress parses one spec.addresses entry: an IP or a single-address
// CIDR. A wider CIDR cannot be a VIP (ok false).
func HostAddress(s string) (netip.Addr, bool) {
	if ip, err := netip.ParseAddr(s); err == nil {
		return ip.Unmap(), true
	}
	p, err := netip.ParsePrefix(s)
	if err != nil || p.Bits() != p.Addr().BitLen() {
		return netip.Addr{}, false
	}
	return p.Addr().Unmap(), true
}

// AllocatableHosts are the hosts of se that get a VIP when it allocates:
// every non-wildcard host, once, in spec order.
func AllocatableHosts(se *networkingv1.ServiceEntry) []string {
	var out []string
	seen := map[string]bool{}
	for _, h := range se.Spec.Hosts {
		if !Wildcard(h) && !seen[h] {
			seen[h] = true
			out = append(out, h)
		}
	}
	return out
}

// Condition the allocator sets on a ServiceEntry the mesh cannot serve
// (False with ReasonInvalidAddress); removed once the entry is fixed.
const (
	ConditionAccepted    = "Accepted"
	ReasonInvalidAddress = "InvalidAddress"
)

// Problem says why the mesh cannot serve se ("" when it can): an address
// that is not an IP or a single-address CIDR (a wider CIDR cannot be a
// VIP; the entry is skipped, as Istio's ambient control plane skips it).
func Problem(se *networkingv1.ServiceEntry) string {
	for i, a := range se.Spec.Addresses {
		if _, ok := HostAddress(a); !ok {
			return fmt.Sprintf("spec.addresses[%d] %q is not an IP address or a single-address CIDR; ambient serves only VIPs, so this entry is not served", i, a)
		}
	}
	return ""
}

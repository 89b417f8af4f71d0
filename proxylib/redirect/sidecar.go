package redirect

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// SidecarUID is the user the sidecar proxy runs as (Istio's 1337): the
// redirection lets that user's connections out unredirected.
const SidecarUID = 1337

// Exclusions are a pod's opt-outs from capture (Istio's annotations
// traffic.sidecar.istio.io/excludeOutboundPorts, excludeInboundPorts and
// excludeOutboundIPRanges).
type Exclusions struct {
	OutboundPorts        []uint16
	InboundPorts         []uint16
	OutboundDestinations []netip.Prefix
}

// ParseExclusions reads the annotations' comma-separated values: ports,
// ports, and CIDR prefixes (a bare address is a single host). Empty values
// exclude nothing.
func ParseExclusions(outboundPorts, inboundPorts, outboundRanges string) (Exclusions, error) {
	var ex Exclusions
	var err error
	if ex.OutboundPorts, err = parsePorts(outboundPorts); err != nil {
		return ex, fmt.Errorf("excludeOutboundPorts: %w", err)
	}
	if ex.InboundPorts, err = parsePorts(inboundPorts); err != nil {
		return ex, fmt.Errorf("excludeInboundPorts: %w", err)
	}
	for _, f := range fields(outboundRanges) {
		p, err := netip.ParsePrefix(f)
		if err != nil {
			a, aerr := netip.ParseAddr(f)
			if aerr != nil {
				return ex, fmt.Errorf("excludeOutboundIPRanges: %q is not a CIDR prefix or address", f)
			}
			p = netip.PrefixFrom(a, a.BitLen())
		}
		ex.OutboundDestinations = append(ex.OutboundDestinations, p.Masked())
	}
	return ex, nil
}

func parsePorts(s string) ([]uint16, error) {
	var out []uint16
	for _, f := range fields(s) {
		n, err := strconv.ParseUint(f, 10, 16)
		if err != nil || n == 0 {
			return nil, fmt.Errorf("%q is not a port (1-65535)", f)
		}
		out = append(out, uint16(n))
	}
	return out, nil
}

func fields(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// SidecarConfig is the redirection inside a pod served by its own sidecar
// running as uid: DefaultConfig's, with the sidecar's connections passing
// by owner (it cannot mark them), its metrics and readiness ports reached
// directly (kubelet probes, scrapes), and the pod's exclusions.
func SidecarConfig(uid uint32, ex Exclusions) Config {
	cfg := DefaultConfig()
	cfg.SkipOwnerUIDs = []uint32{uid}
	cfg.SkipInboundPorts = append(cfg.SkipInboundPorts, 15020, 15021)
	cfg.SkipInboundPorts = append(cfg.SkipInboundPorts, ex.InboundPorts...)
	cfg.SkipOutboundPorts = ex.OutboundPorts
	cfg.SkipOutboundDestinations = ex.OutboundDestinations
	return cfg
}

// Package dnsproxy is ztunnel's DNS proxy (:15053 inside each captured
// pod whose DNS the node agent redirects), as Istio ambient's DNS capture:
// it answers A and AAAA queries for the mesh's Kubernetes Services from the
// discovery state, in every search-domain form relative to the client pod's
// namespace, and forwards everything else to the pod's own resolvers, from
// inside the pod's network namespace with ztunnel's mark (so the query is
// not captured again), falling back to TCP when the UDP answer is
// truncated, passing the upstream's answer (NXDOMAIN and SERVFAIL too)
// through unchanged, and caching forwarded answers for their TTL in a
// bounded cache. Messages are parsed and built with github.com/miekg/dns.
package dnsproxy

import (
	"net/netip"
	"strings"

	"github.com/miekg/dns"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
)

// Port is the DNS proxy's port inside a captured pod (docs/interfaces.md).
const Port = 15053

// LocalTTL is the TTL of the answers the proxy makes itself (Istio's
// ztunnel uses the same 30 seconds).
const LocalTTL = 30

// Services is the part of the discovery state the proxy answers from
// (*discovery.State).
type Services interface {
	ServiceByKey(key string) *workloadapi.Service
	ServicesByHostname(host string) []*workloadapi.Service
	Endpoints(serviceKey string) []*workloadapi.Workload
}

// svcRef is a (name, namespace) a query name may mean.
type svcRef struct{ name, namespace string }

// candidates lists the services a query name may mean for a client in
// namespace clientNS, most literal first. Resolvers expand a short name
// with the pod's search list (<ns>.svc.<domain>, svc.<domain>, <domain>),
// so a query is tried as written and with each search suffix removed; what
// remains is one of svc, svc.ns, svc.ns.svc or svc.ns.svc.<domain>.
func candidates(qname, clientNS, domain string) []svcRef {
	name := strings.TrimSuffix(strings.ToLower(qname), ".")
	domain = strings.Trim(strings.ToLower(domain), ".")
	if name == "" || domain == "" {
		return nil
	}
	bases := []string{name}
	for _, suffix := range []string{clientNS + ".svc." + domain, "svc." + domain, domain} {
		if b, ok := strings.CutSuffix(name, "."+suffix); ok && b != "" {
			bases = append(bases, b)
		}
	}
	var out []svcRef
	seen := map[svcRef]bool{}
	for _, b := range bases {
		l := strings.Split(b, ".")
		var r svcRef
		switch {
		case len(l) == 1:
			r = svcRef{l[0], clientNS}
		case len(l) == 2:
			r = svcRef{l[0], l[1]}
		case len(l) == 3 && l[2] == "svc":
			r = svcRef{l[0], l[1]}
		case len(l) > 3 && strings.Join(l[2:], ".") == "svc."+domain:
			r = svcRef{l[0], l[1]}
		default:
			continue
		}
		if r.name == "" || r.namespace == "" || seen[r] {
			continue
		}
		seen[r] = true
		out = append(out, r)
	}
	return out
}

// lookup finds the service qname means for a client in clientNS, or nil:
// a Kubernetes Service in any search-domain form, else a ServiceEntry
// host, written in full.
func lookup(s Services, qname, clientNS, domain string) *workloadapi.Service {
	for _, r := range candidates(qname, clientNS, domain) {
		host := r.name + "." + r.namespace + ".svc." + strings.Trim(strings.ToLower(domain), ".")
		if svc := s.ServiceByKey(discovery.ServiceKey(r.namespace, host)); svc != nil {
			return svc
		}
	}
	return serviceEntryHost(s, strings.TrimSuffix(strings.ToLower(qname), "."), clientNS)
}

// serviceEntryHost is the ServiceEntry declaring host that the proxy can
// answer for: one with addresses (its VIPs, or its endpoints' addresses
// when it has none), the client's own namespace first, then the first by
// namespace (ServiceEntries are exported mesh-wide by default). Hosts
// without addresses (resolution NONE, DNS endpoints) are left to the
// pod's resolver, as Istio's proxy leaves them.
func serviceEntryHost(s Services, host, clientNS string) *workloadapi.Service {
	var first *workloadapi.Service
	for _, svc := range s.ServicesByHostname(host) {
		if len(serviceAddrs(s, svc)) == 0 {
			continue
		}
		if svc.GetNamespace() == clientNS {
			return svc
		}
		if first == nil {
			first = svc
		}
	}
	return first
}

// serviceAddrs are the addresses a service name resolves to: its VIPs, or
// for a headless service (no VIP) its endpoints' addresses, as Kubernetes
// DNS answers.
func serviceAddrs(s Services, svc *workloadapi.Service) []netip.Addr {
	var out []netip.Addr
	for _, a := range svc.GetAddresses() {
		if ip, ok := netip.AddrFromSlice(a.GetAddress()); ok {
			out = append(out, ip.Unmap())
		}
	}
	if len(out) > 0 {
		return out
	}
	for _, w := range s.Endpoints(discovery.ServiceKey(svc.GetNamespace(), svc.GetHostname())) {
		if w == nil || w.GetStatus() != workloadapi.WorkloadStatus_HEALTHY {
			continue
		}
		for _, b := range w.GetAddresses() {
			if ip, ok := netip.AddrFromSlice(b); ok {
				out = append(out, ip.Unmap())
			}
		}
	}
	return out
}

// records are the A or AAAA records (qtype) for addrs under owner name
// qname. An empty list for a known name is NODATA (NOERROR, no answers).
func records(qname string, qtype uint16, addrs []netip.Addr) []dns.RR {
	var out []dns.RR
	for _, ip := range addrs {
		hdr := dns.RR_Header{Name: qname, Rrtype: qtype, Class: dns.ClassINET, Ttl: LocalTTL}
		switch {
		case qtype == dns.TypeA && ip.Is4():
			out = append(out, &dns.A{Hdr: hdr, A: ip.AsSlice()})
		case qtype == dns.TypeAAAA && ip.Is6():
			out = append(out, &dns.AAAA{Hdr: hdr, AAAA: ip.AsSlice()})
		}
	}
	return out
}

package route

import (
	"fmt"
	"slices"
	"strings"

	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
)

// Port is one port an ingress gateway opens and what it serves there:
// plain HTTP, HTTPS terminating TLS with the certificates of its listeners
// (chosen by SNI), TLS passed through to the backend its TLSRoutes pick by
// SNI, or TCP relayed to the backend of its TCPRoute.
type Port struct {
	Port      uint16
	Protocol  gwv1.ProtocolType
	Listeners []gwv1.Listener
}

// Terminates reports whether the gateway terminates TLS on the port
// (HTTPS listeners).
func (p Port) Terminates() bool { return p.Protocol == gwv1.HTTPSProtocolType }

// L4 reports whether the port relays bytes (TLS passthrough, TCP) instead
// of serving HTTP.
func (p Port) L4() bool {
	return p.Protocol == gwv1.TLSProtocolType || p.Protocol == gwv1.TCPProtocolType
}

// RouteKinds are the route kinds a listener of protocol p can take, as
// Gateway API defines them per protocol.
func RouteKinds(p gwv1.ProtocolType) []gwv1.Kind {
	switch p {
	case gwv1.HTTPProtocolType, gwv1.HTTPSProtocolType:
		return []gwv1.Kind{"HTTPRoute", "GRPCRoute"}
	case gwv1.TLSProtocolType:
		return []gwv1.Kind{"TLSRoute"}
	case gwv1.TCPProtocolType:
		return []gwv1.Kind{"TCPRoute"}
	}
	return nil
}

// Plan decides which of a Gateway's listeners an ingress gateway serves and
// on which ports; rejected says why each other listener is not served.
// grants decide whether certificateRefs to Secrets of other namespaces are
// permitted. The operator reports from it and the gateway opens ports from
// it, so status says what the data path does.
func Plan(gw *gwv1.Gateway, grants *Grants) (ports []Port, rejected map[gwv1.SectionName]Rejection) {
	rejected = map[gwv1.SectionName]Rejection{}
	if gw == nil {
		return nil, rejected
	}
	for _, l := range gw.Spec.Listeners {
		if why := unservable(gw, l, grants); why.Message != "" {
			rejected[l.Name] = why
			continue
		}
		i := slices.IndexFunc(ports, func(p Port) bool { return p.Port == uint16(l.Port) })
		if i < 0 {
			ports = append(ports, Port{Port: uint16(l.Port), Protocol: l.Protocol})
			i = len(ports) - 1
		}
		if ports[i].Protocol != l.Protocol {
			rejected[l.Name] = Rejection{Reason: gwv1.ListenerReasonProtocolConflict,
				Message: fmt.Sprintf("port %d already serves %s listeners", l.Port, ports[i].Protocol)}
			continue
		}
		if why := sameNameOnPort(ports[i], l); why != "" {
			rejected[l.Name] = Rejection{Reason: gwv1.ListenerReasonHostnameConflict, Message: why}
			continue
		}
		ports[i].Listeners = append(ports[i].Listeners, l)
	}
	slices.SortFunc(ports, func(a, b Port) int { return int(a.Port) - int(b.Port) })
	return ports, rejected
}

// sameNameOnPort: a TCP port carries no name to tell listeners apart, and a
// TLS passthrough port tells them apart by hostname only, so a second
// listener the first cannot be told from is a conflict (the first keeps
// the port).
func sameNameOnPort(p Port, l gwv1.Listener) string {
	if !p.L4() {
		return ""
	}
	for _, o := range p.Listeners {
		if p.Protocol == gwv1.TCPProtocolType || ptrEq(o.Hostname, l.Hostname) {
			return fmt.Sprintf("listener %s already serves %s on port %d for the same hostname", o.Name, p.Protocol, l.Port)
		}
	}
	return ""
}

func ptrEq[T comparable](a, b *T) bool {
	return a == nil && b == nil || a != nil && b != nil && *a == *b
}

// Rejection says why a listener is not served, with the Gateway API's
// reason: a problem with its certificate references (ResolvedRefs false,
// the listener stays accepted) or with the listener itself (not accepted).
type Rejection struct {
	Reason  gwv1.ListenerConditionReason
	Message string
	// Refs: the listener is valid but a reference does not resolve.
	Refs bool
}

func unsupported(format string, args ...any) Rejection {
	return Rejection{Reason: gwv1.ListenerReasonUnsupportedProtocol, Message: fmt.Sprintf(format, args...)}
}

// unservable says why a listener cannot be served (zero when it can):
// HTTP; HTTPS terminating TLS with certificates from Secrets in the
// Gateway's own namespace or, permitted by a ReferenceGrant, in another;
// TLS in Passthrough mode; TCP. Reference problems come last, so nil
// grants never hide a listener that is invalid in itself.
func unservable(gw *gwv1.Gateway, l gwv1.Listener, grants *Grants) Rejection {
	kinds := RouteKinds(l.Protocol)
	if kinds == nil {
		return unsupported("protocol %s is not served by this gateway; HTTP, HTTPS, TLS (Passthrough) and TCP listeners are", l.Protocol)
	}
	if l.Protocol == gwv1.TLSProtocolType && (l.TLS == nil || l.TLS.Mode == nil || *l.TLS.Mode != gwv1.TLSModePassthrough) {
		// UnsupportedValue, as the API says for a tls.mode the
		// implementation does not serve (TLSRouteListenerTerminateNotSupported).
		return Rejection{Reason: gwv1.ListenerReasonUnsupportedValue,
			Message: "TLS listeners are served in tls.mode Passthrough only (TLS is terminated on HTTPS listeners)"}
	}
	if l.AllowedRoutes != nil {
		for _, k := range l.AllowedRoutes.Kinds {
			if k.Group != nil && *k.Group != gwv1.GroupName || !slices.Contains(kinds, k.Kind) {
				return Rejection{Reason: gwv1.ListenerReasonInvalidRouteKinds, Refs: true,
					Message: fmt.Sprintf("route kind %s is not supported on %s listeners (%s)", k.Kind, l.Protocol, kindList(kinds))}
			}
		}
	}
	if l.Protocol != gwv1.HTTPSProtocolType {
		return Rejection{}
	}
	if l.TLS == nil || len(l.TLS.CertificateRefs) == 0 {
		return Rejection{Reason: gwv1.ListenerReasonInvalidCertificateRef, Message: "an HTTPS listener needs tls.certificateRefs", Refs: true}
	}
	if l.TLS.Mode != nil && *l.TLS.Mode != gwv1.TLSModeTerminate {
		return Rejection{Reason: gwv1.ListenerReasonUnsupportedValue,
			Message: fmt.Sprintf("tls.mode %s is not served on HTTPS listeners; Terminate is (TLS listeners pass through)", *l.TLS.Mode)}
	}
	for _, ref := range l.TLS.CertificateRefs {
		if ref.Kind != nil && *ref.Kind != "Secret" || ref.Group != nil && *ref.Group != "" && *ref.Group != "core" {
			return Rejection{Reason: gwv1.ListenerReasonInvalidCertificateRef, Refs: true,
				Message: fmt.Sprintf("certificateRef %s: only core Secrets are supported", ref.Name)}
		}
		if ns := SecretNamespace(gw.Namespace, ref); !grants.Permits(gatewayRef(gw.Namespace), Ref{Kind: "Secret", Namespace: ns, Name: string(ref.Name)}) {
			return Rejection{Reason: gwv1.ListenerReasonRefNotPermitted, Refs: true,
				Message: fmt.Sprintf("certificateRef %s/%s: no ReferenceGrant in namespace %s permits Gateways of namespace %s to use this Secret", ns, ref.Name, ns, gw.Namespace)}
		}
	}
	return Rejection{}
}

func kindList(ks []gwv1.Kind) string {
	s := make([]string, len(ks))
	for i, k := range ks {
		s[i] = string(k)
	}
	return strings.Join(s, ", ")
}

func gatewayRef(ns string) Ref { return Ref{Group: gwv1.GroupName, Kind: "Gateway", Namespace: ns} }

// SecretNamespace is the namespace of a certificateRef of a Gateway in gwNS.
func SecretNamespace(gwNS string, ref gwv1.SecretObjectReference) string {
	if ref.Namespace != nil && *ref.Namespace != "" {
		return string(*ref.Namespace)
	}
	return gwNS
}

// SecretKey names a certificate Secret.
type SecretKey struct{ Namespace, Name string }

// CertificateDir is the directory (under the gateway's certificate
// directory) holding a Secret's tls.crt and tls.key: the Secret's name for
// the Gateway's own namespace, "<namespace>_<name>" for another ("_" is in
// neither a namespace nor a Secret name, so the two never collide).
func CertificateDir(gwNS string, s SecretKey) string {
	if s.Namespace == gwNS {
		return s.Name
	}
	return s.Namespace + "_" + s.Name
}

// CertificateSecrets names the Secrets the served HTTPS listeners of a
// Gateway in gwNS use, sorted (a passthrough listener holds no key).
func CertificateSecrets(gwNS string, ports []Port) []SecretKey {
	var out []SecretKey
	for _, p := range ports {
		if !p.Terminates() {
			continue
		}
		for _, l := range p.Listeners {
			if l.TLS == nil {
				continue
			}
			for _, ref := range l.TLS.CertificateRefs {
				k := SecretKey{Namespace: SecretNamespace(gwNS, ref), Name: string(ref.Name)}
				if !slices.Contains(out, k) {
					out = append(out, k)
				}
			}
		}
	}
	slices.SortFunc(out, func(a, b SecretKey) int {
		if a.Namespace != b.Namespace {
			return strings.Compare(a.Namespace, b.Namespace)
		}
		return strings.Compare(a.Name, b.Name)
	})
	return out
}

// WithoutListeners returns ports less the listeners named in drop (a port
// left with no listener is dropped).
func WithoutListeners(ports []Port, drop map[gwv1.SectionName]Rejection) []Port {
	var out []Port
	for _, p := range ports {
		q := p
		q.Listeners = slices.DeleteFunc(slices.Clone(p.Listeners), func(l gwv1.Listener) bool { _, ok := drop[l.Name]; return ok })
		if len(q.Listeners) > 0 {
			out = append(out, q)
		}
	}
	return out
}

// ListenerFor picks the listener of a TLS port whose hostname matches the
// client's SNI (most specific first; a listener without hostname catches
// the rest), or false when none does.
func ListenerFor(p Port, sni string) (gwv1.Listener, bool) {
	var best gwv1.Listener
	bestExact, bestLen, found := false, -2, false
	for _, l := range p.Listeners {
		h := ""
		if l.Hostname != nil {
			h = string(*l.Hostname)
			if !hostMatches(h, sni) {
				continue
			}
		}
		exact, n := hostRank(h)
		if !found || exact && !bestExact || exact == bestExact && n > bestLen {
			best, bestExact, bestLen, found = l, exact, n, true
		}
	}
	return best, found
}

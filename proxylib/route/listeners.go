package route

import (
	"fmt"
	"slices"
	"strings"

	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
)

// Port is one port an ingress gateway opens: plain HTTP, or HTTPS
// terminating TLS with the certificates of its listeners (chosen by SNI).
type Port struct {
	Port      uint16
	TLS       bool
	Listeners []gwv1.Listener
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
		tls := l.Protocol == gwv1.HTTPSProtocolType
		i := slices.IndexFunc(ports, func(p Port) bool { return p.Port == uint16(l.Port) })
		if i < 0 {
			ports = append(ports, Port{Port: uint16(l.Port), TLS: tls})
			i = len(ports) - 1
		}
		if ports[i].TLS != tls {
			rejected[l.Name] = Rejection{Reason: gwv1.ListenerReasonProtocolConflict,
				Message: fmt.Sprintf("port %d already serves %s listeners", l.Port, protoName(ports[i].TLS))}
			continue
		}
		ports[i].Listeners = append(ports[i].Listeners, l)
	}
	slices.SortFunc(ports, func(a, b Port) int { return int(a.Port) - int(b.Port) })
	return ports, rejected
}

func protoName(tls bool) string {
	if tls {
		return "HTTPS"
	}
	return "HTTP"
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
// HTTP, and HTTPS terminating TLS with certificates from Secrets in the
// Gateway's own namespace or, permitted by a ReferenceGrant, in another.
// Reference problems come last, so nil grants never hide a listener that
// is invalid in itself.
func unservable(gw *gwv1.Gateway, l gwv1.Listener, grants *Grants) Rejection {
	switch l.Protocol {
	case gwv1.HTTPProtocolType, gwv1.HTTPSProtocolType:
	default:
		return unsupported("protocol %s is not served by this gateway yet; HTTP and HTTPS listeners are", l.Protocol)
	}
	if l.AllowedRoutes != nil {
		for _, k := range l.AllowedRoutes.Kinds {
			if k.Group != nil && *k.Group != gwv1.GroupName || k.Kind != "HTTPRoute" && k.Kind != "GRPCRoute" {
				return Rejection{Reason: gwv1.ListenerReasonInvalidRouteKinds, Refs: true,
					Message: fmt.Sprintf("route kind %s is not supported on %s listeners (HTTPRoute, GRPCRoute)", k.Kind, l.Protocol)}
			}
		}
	}
	if l.Protocol == gwv1.HTTPProtocolType {
		return Rejection{}
	}
	if l.TLS == nil || len(l.TLS.CertificateRefs) == 0 {
		return Rejection{Reason: gwv1.ListenerReasonInvalidCertificateRef, Message: "an HTTPS listener needs tls.certificateRefs", Refs: true}
	}
	if l.TLS.Mode != nil && *l.TLS.Mode != gwv1.TLSModeTerminate {
		return unsupported("tls.mode %s is not served yet; Terminate is", *l.TLS.Mode)
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
// Gateway in gwNS use, sorted.
func CertificateSecrets(gwNS string, ports []Port) []SecretKey {
	var out []SecretKey
	for _, p := range ports {
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

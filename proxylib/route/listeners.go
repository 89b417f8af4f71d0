package route

import (
	"fmt"
	"slices"

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
// on which ports; rejected says why each other listener is not served. The
// operator reports from it and the gateway opens ports from it, so status
// says what the data path does.
func Plan(gw *gwv1.Gateway) (ports []Port, rejected map[gwv1.SectionName]Rejection) {
	rejected = map[gwv1.SectionName]Rejection{}
	if gw == nil {
		return nil, rejected
	}
	for _, l := range gw.Spec.Listeners {
		if why := unservable(gw, l); why.Message != "" {
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
// Gateway's own namespace, are served.
func unservable(gw *gwv1.Gateway, l gwv1.Listener) Rejection {
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
		if ref.Namespace != nil && string(*ref.Namespace) != gw.Namespace {
			return Rejection{Reason: gwv1.ListenerReasonRefNotPermitted, Refs: true,
				Message: fmt.Sprintf("certificateRef %s/%s: Secrets of other namespaces are not used (the gateway mounts its certificates from its own namespace)", *ref.Namespace, ref.Name)}
		}
	}
	return Rejection{}
}

// CertificateSecrets names the Secrets the served HTTPS listeners use.
func CertificateSecrets(ports []Port) []string {
	var out []string
	for _, p := range ports {
		for _, l := range p.Listeners {
			if l.TLS == nil {
				continue
			}
			for _, ref := range l.TLS.CertificateRefs {
				if !slices.Contains(out, string(ref.Name)) {
					out = append(out, string(ref.Name))
				}
			}
		}
	}
	slices.Sort(out)
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

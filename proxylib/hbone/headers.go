package hbone

import (
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
)

// Header names and baggage keys carried on every CONNECT (Istio's spelling).
const (
	HeaderForwarded = "Forwarded"
	HeaderBaggage   = "Baggage"

	// HeaderHairpinCaller is our extension: on a tunnel the destination's
	// ztunnel hair-pins to the destination's waypoint, the verified SPIFFE
	// identity of the original caller; absent when the caller had none
	// (plaintext). Only the waypoint reads it, and only from the
	// destination itself; see proxylib/waypoint.
	HeaderHairpinCaller = "X-Ambient-Hairpin-Caller"

	BaggageCluster        = "k8s.cluster.name"
	BaggageNamespace      = "k8s.namespace.name"
	BaggagePod            = "k8s.pod.name"
	BaggageWorkload       = "k8s.deployment.name"
	BaggageService        = "service.name"
	BaggageServiceVersion = "service.version"
)

// maxHeaderValue bounds the work done on one hostile header value.
const maxHeaderValue = 8 << 10

var (
	ErrBadForwarded = errors.New("malformed Forwarded header")
	ErrBadBaggage   = errors.New("malformed baggage header")
)

// FormatForwarded returns the RFC 7239 element naming the original source:
// for="10.0.0.1" or for="[fd00::1]".
func FormatForwarded(src netip.Addr) string {
	src = src.Unmap()
	if src.Is6() {
		return `for="[` + src.String() + `]"`
	}
	return `for="` + src.String() + `"`
}

// ParseForwardedFor reads the original source address from the first
// element of a Forwarded header (RFC 7239). Only IP literals are accepted;
// obfuscated identifiers, hostnames and "unknown" are errors. A port, if
// present, is ignored.
func ParseForwardedFor(value string) (netip.Addr, error) {
	bad := func(why string) (netip.Addr, error) {
		return netip.Addr{}, fmt.Errorf("%w: %s", ErrBadForwarded, why)
	}
	if len(value) > maxHeaderValue {
		return bad("too long")
	}
	first, _, _ := strings.Cut(value, ",")
	for pair := range strings.SplitSeq(first, ";") {
		k, v, ok := strings.Cut(strings.TrimSpace(pair), "=")
		if !ok {
			return bad("parameter without '='")
		}
		if !strings.EqualFold(k, "for") {
			continue
		}
		if len(v) >= 2 && v[0] == '"' && v[len(v)-1] == '"' {
			v = v[1 : len(v)-1]
		}
		if strings.HasPrefix(v, "[") {
			end := strings.IndexByte(v, ']')
			if end < 0 || (end != len(v)-1 && v[end+1] != ':') {
				return bad("unterminated IPv6 literal")
			}
			addr, err := netip.ParseAddr(v[1:end])
			if err != nil || !addr.Is6() || addr.Zone() != "" {
				return bad("not an IPv6 address")
			}
			return addr, nil
		}
		host, _, _ := strings.Cut(v, ":")
		addr, err := netip.ParseAddr(host)
		if err != nil || !addr.Is4() {
			return bad("not an IP address")
		}
		return addr, nil
	}
	return bad("no for= parameter")
}

// FormatBaggage encodes key/value pairs as a W3C baggage header, in order,
// percent-encoding the value bytes the header may not carry as they are.
// Empty values are skipped.
func FormatBaggage(pairs ...[2]string) string {
	var b strings.Builder
	for _, kv := range pairs {
		if kv[1] == "" {
			continue
		}
		if b.Len() > 0 {
			b.WriteByte(',')
		}
		b.WriteString(kv[0])
		b.WriteByte('=')
		for i := 0; i < len(kv[1]); i++ {
			if c := kv[1][i]; isBaggageOctet(c) && c != '%' {
				b.WriteByte(c)
			} else {
				fmt.Fprintf(&b, "%%%02X", c)
			}
		}
	}
	return b.String()
}

// isBaggageOctet: a byte a W3C baggage value may carry unencoded
// (printable ASCII but space, '"', ',', ';' and '\\').
func isBaggageOctet(c byte) bool {
	return c > 0x20 && c < 0x7f && c != '"' && c != ',' && c != ';' && c != '\\'
}

// ParseBaggage decodes a W3C baggage header into a map. Properties after ';'
// are dropped; keys must be tokens; duplicate keys keep the first value.
func ParseBaggage(value string) (map[string]string, error) {
	if len(value) > maxHeaderValue {
		return nil, fmt.Errorf("%w: too long", ErrBadBaggage)
	}
	out := map[string]string{}
	for member := range strings.SplitSeq(value, ",") {
		member, _, _ = strings.Cut(member, ";")
		member = strings.TrimSpace(member)
		if member == "" {
			continue
		}
		k, v, ok := strings.Cut(member, "=")
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		if !ok || !isToken(k) {
			return nil, fmt.Errorf("%w: member %q", ErrBadBaggage, truncate(member, 64))
		}
		for i := 0; i < len(v); i++ {
			if !isBaggageOctet(v[i]) {
				return nil, fmt.Errorf("%w: value of %q: byte %#x must be percent-encoded", ErrBadBaggage, k, v[i])
			}
		}
		dv, err := url.PathUnescape(v)
		if err != nil {
			return nil, fmt.Errorf("%w: value of %q: %v", ErrBadBaggage, k, err)
		}
		if _, dup := out[k]; !dup {
			out[k] = dv
		}
	}
	return out, nil
}

// Source describes the originating workload for the CONNECT headers.
type Source struct {
	Addr           netip.Addr
	Cluster        string
	Namespace      string
	Pod            string
	Workload       string
	Service        string
	ServiceVersion string
}

// SourceHeader builds the Forwarded and baggage headers a tunnel carries.
func SourceHeader(src Source) http.Header {
	h := http.Header{}
	if src.Addr.IsValid() {
		h.Set(HeaderForwarded, FormatForwarded(src.Addr))
	}
	if b := FormatBaggage(
		[2]string{BaggageCluster, src.Cluster},
		[2]string{BaggageNamespace, src.Namespace},
		[2]string{BaggagePod, src.Pod},
		[2]string{BaggageWorkload, src.Workload},
		[2]string{BaggageService, src.Service},
		[2]string{BaggageServiceVersion, src.ServiceVersion},
	); b != "" {
		h.Set(HeaderBaggage, b)
	}
	return h
}

// ParseSource reads the Forwarded and baggage headers back; missing headers
// leave fields empty, malformed ones are errors.
func ParseSource(h http.Header) (Source, error) {
	var src Source
	if v := h.Get(HeaderForwarded); v != "" {
		addr, err := ParseForwardedFor(v)
		if err != nil {
			return Source{}, err
		}
		src.Addr = addr
	}
	if v := h.Get(HeaderBaggage); v != "" {
		b, err := ParseBaggage(v)
		if err != nil {
			return Source{}, err
		}
		src.Cluster, src.Namespace, src.Pod = b[BaggageCluster], b[BaggageNamespace], b[BaggagePod]
		src.Workload, src.Service, src.ServiceVersion = b[BaggageWorkload], b[BaggageService], b[BaggageServiceVersion]
	}
	return src, nil
}

func isToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c <= ' ' || c >= 0x7f || strings.IndexByte(`"(),/:;<=>?@[\]{}`, c) >= 0 {
			return false
		}
	}
	return true
}

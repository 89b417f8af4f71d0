// Package identity holds workload identities (SPIFFE IDs) and the
// certificates that prove them.
package identity

import (
	"crypto/x509"
	"errors"
	"fmt"
	"strings"
)

// Identity is a workload's SPIFFE identity:
// spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>.
type Identity struct {
	TrustDomain    string
	Namespace      string
	ServiceAccount string
}

const scheme = "spiffe://"

// maxIDLength bounds parsing work on hostile input (SPIFFE caps IDs at 2048 bytes).
const maxIDLength = 2048

// Errors returned by Parse; callers match them with errors.Is.
var (
	ErrNotSPIFFE      = errors.New("not a spiffe:// URI")
	ErrBadTrustDomain = errors.New("invalid trust domain")
	ErrBadPath        = errors.New("path is not /ns/<namespace>/sa/<service-account>")
	ErrTooLong        = errors.New("SPIFFE ID longer than 2048 bytes")
)

// Parse parses a SPIFFE ID of the form spiffe://td/ns/<ns>/sa/<sa>. It is
// strict: no query, fragment, port, userinfo, empty or dot segments, and only
// the characters Kubernetes names and trust domains allow.
func Parse(s string) (Identity, error) {
	if len(s) > maxIDLength {
		return Identity{}, ErrTooLong
	}
	rest, ok := strings.CutPrefix(s, scheme)
	if !ok {
		return Identity{}, fmt.Errorf("%w: %q", ErrNotSPIFFE, s)
	}
	td, path, _ := strings.Cut(rest, "/")
	if !validTrustDomain(td) {
		return Identity{}, fmt.Errorf("%w: %q", ErrBadTrustDomain, td)
	}
	parts := strings.Split(path, "/")
	if len(parts) != 4 || parts[0] != "ns" || parts[2] != "sa" || !validName(parts[1]) || !validName(parts[3]) {
		return Identity{}, fmt.Errorf("%w: %q", ErrBadPath, "/"+path)
	}
	return Identity{TrustDomain: td, Namespace: parts[1], ServiceAccount: parts[3]}, nil
}

// MustParse is Parse for constants in tests and defaults.
func MustParse(s string) Identity {
	id, err := Parse(s)
	if err != nil {
		panic(err)
	}
	return id
}

// String formats the identity as a SPIFFE URI.
func (i Identity) String() string {
	return scheme + i.TrustDomain + "/ns/" + i.Namespace + "/sa/" + i.ServiceAccount
}

// Principal is the identity without the scheme, as Istio's
// AuthorizationPolicy `principals` field spells it: td/ns/<ns>/sa/<sa>.
func (i Identity) Principal() string {
	return strings.TrimPrefix(i.String(), scheme)
}

// IsZero reports whether the identity is unset.
func (i Identity) IsZero() bool { return i == Identity{} }

// FromCertificate extracts the single SPIFFE identity from a certificate's URI
// SANs. A certificate with zero or several URI SANs is rejected: the identity
// must be unambiguous.
func FromCertificate(cert *x509.Certificate) (Identity, error) {
	if len(cert.URIs) != 1 {
		return Identity{}, fmt.Errorf("certificate has %d URI SANs, want exactly 1", len(cert.URIs))
	}
	return Parse(cert.URIs[0].String())
}

func validTrustDomain(td string) bool {
	if td == "" || len(td) > 255 {
		return false
	}
	for _, c := range td {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '.' || c == '-' || c == '_') {
			return false
		}
	}
	return td[0] != '.' && td[len(td)-1] != '.'
}

// validName accepts Kubernetes namespace and service-account names (DNS-1123
// subdomains, at most 253 bytes).
func validName(s string) bool {
	if s == "" || len(s) > 253 || s == "." || s == ".." {
		return false
	}
	for i, c := range s {
		alnum := c >= 'a' && c <= 'z' || c >= '0' && c <= '9'
		if !alnum && !((c == '-' || c == '.') && i > 0 && i < len(s)-1) {
			return false
		}
	}
	return true
}

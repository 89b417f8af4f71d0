package hbone

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/ambientmesh/ambient/proxylib/identity"
)

// Verification errors shared by every transport; callers match them with
// errors.Is so a log line or metric says exactly why a peer was refused.
var (
	ErrNoPeerCertificate  = errors.New("peer presented no certificate")
	ErrUntrustedPeer      = errors.New("peer certificate does not chain to the mesh roots")
	ErrPeerIdentity       = errors.New("peer certificate has no valid SPIFFE identity")
	ErrWrongTrustDomain   = errors.New("peer identity is in another trust domain")
	ErrUnexpectedPeer     = errors.New("peer identity is not an expected destination identity")
	ErrNoExpectedIdentity = errors.New("dial request names no expected peer identity")
	ErrBadAuthority       = errors.New("CONNECT authority is not a valid ip:port")
)

// VerifyPeer checks a peer's certificate chain the way every HBONE hop must:
// it chains to roots for the given key usage, carries exactly one URI SAN that
// is a strict SPIFFE ID, and lies in trustDomain. DNS names are never looked at.
func VerifyPeer(rawCerts [][]byte, roots *x509.CertPool, trustDomain string, usage x509.ExtKeyUsage) (identity.Identity, error) {
	if len(rawCerts) == 0 {
		return identity.Identity{}, ErrNoPeerCertificate
	}
	certs := make([]*x509.Certificate, 0, len(rawCerts))
	for _, raw := range rawCerts {
		c, err := x509.ParseCertificate(raw)
		if err != nil {
			return identity.Identity{}, fmt.Errorf("%w: %v", ErrUntrustedPeer, err)
		}
		certs = append(certs, c)
	}
	intermediates := x509.NewCertPool()
	for _, c := range certs[1:] {
		intermediates.AddCert(c)
	}
	opts := x509.VerifyOptions{Roots: roots, Intermediates: intermediates, KeyUsages: []x509.ExtKeyUsage{usage}}
	if _, err := certs[0].Verify(opts); err != nil {
		return identity.Identity{}, fmt.Errorf("%w: %v", ErrUntrustedPeer, err)
	}
	id, err := identity.FromCertificate(certs[0])
	if err != nil {
		return identity.Identity{}, fmt.Errorf("%w: %v", ErrPeerIdentity, err)
	}
	if id.TrustDomain != trustDomain {
		return identity.Identity{}, fmt.Errorf("%w: %s, want trust domain %q", ErrWrongTrustDomain, id, trustDomain)
	}
	return id, nil
}

// CheckExpected fails unless id is one of expected. An empty expected list
// fails closed.
func CheckExpected(id identity.Identity, expected []identity.Identity) error {
	if len(expected) == 0 {
		return ErrNoExpectedIdentity
	}
	if !slices.Contains(expected, id) {
		return fmt.Errorf("%w: got %s", ErrUnexpectedPeer, id)
	}
	return nil
}

// ParseAuthority parses a CONNECT authority strictly: an IP literal (IPv6 in
// brackets, no zone) and a decimal port 1-65535, in canonical form so that one
// target has exactly one spelling. Hostnames, missing or zero ports,
// unspecified and multicast addresses are refused.
func ParseAuthority(authority string) (netip.AddrPort, error) {
	bad := func(why string) (netip.AddrPort, error) {
		return netip.AddrPort{}, fmt.Errorf("%w: %q: %s", ErrBadAuthority, truncate(authority, 64), why)
	}
	if len(authority) > len("[ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255]:65535") {
		return bad("too long")
	}
	i := strings.LastIndexByte(authority, ':')
	if i < 0 {
		return bad("no port")
	}
	port, err := strconv.ParseUint(authority[i+1:], 10, 16)
	if err != nil || port == 0 {
		return bad("port must be 1-65535")
	}
	ap, err := netip.ParseAddrPort(authority)
	if err != nil {
		return bad("not an ip:port")
	}
	addr := ap.Addr()
	switch {
	case addr.Zone() != "":
		return bad("IPv6 zone not allowed")
	case addr.IsUnspecified() || addr.IsMulticast():
		return bad("not a unicast address")
	case ap.String() != authority:
		return bad("not in canonical form")
	}
	return ap, nil
}

// ClientTLSConfig is the TLS 1.3 client configuration for dialing a tunnel:
// it presents source's certificate and accepts only a peer that passes
// VerifyPeer and is one of expected. alpn is "h2" or "h3".
func ClientTLSConfig(certs CertSource, source identity.Identity, expected []identity.Identity, alpn string) *tls.Config {
	expected = slices.Clone(expected)
	return &tls.Config{
		MinVersion:         tls.VersionTLS13,
		NextProtos:         []string{alpn},
		InsecureSkipVerify: true, // replaced by VerifyPeerCertificate: SPIFFE, not DNS names
		GetClientCertificate: func(info *tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return certs.Certificate(contextOf(info.Context()), source)
		},
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			id, err := VerifyPeer(raw, certs.Roots(), certs.TrustDomain(), x509.ExtKeyUsageServerAuth)
			if err != nil {
				return err
			}
			return CheckExpected(id, expected)
		},
	}
}

// ServerTLSConfig is the TLS 1.3 server configuration for accepting tunnels
// as local: a client certificate is required and must pass VerifyPeer; which
// peers may do what is the handler's (authorization's) decision.
func ServerTLSConfig(certs CertSource, local identity.Identity, alpn string) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		NextProtos: []string{alpn},
		ClientAuth: tls.RequireAnyClientCert, // verified below against the mesh roots
		// VerifyPeerCertificate does not run on resumed sessions, so a
		// resumption would skip the SPIFFE checks (and trust-bundle changes).
		SessionTicketsDisabled: true,
		GetCertificate: func(info *tls.ClientHelloInfo) (*tls.Certificate, error) {
			return certs.Certificate(contextOf(info.Context()), local)
		},
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			_, err := VerifyPeer(raw, certs.Roots(), certs.TrustDomain(), x509.ExtKeyUsageClientAuth)
			return err
		},
	}
}

// PeerIdentity reads the peer's identity from a completed handshake whose
// chain VerifyPeer already accepted.
func PeerIdentity(state tls.ConnectionState) (identity.Identity, error) {
	if len(state.PeerCertificates) == 0 {
		return identity.Identity{}, ErrNoPeerCertificate
	}
	id, err := identity.FromCertificate(state.PeerCertificates[0])
	if err != nil {
		return identity.Identity{}, fmt.Errorf("%w: %v", ErrPeerIdentity, err)
	}
	return id, nil
}

func contextOf(ctx context.Context) context.Context {
	if ctx == nil {
		return context.Background()
	}
	return ctx
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// RejectedError is a CONNECT the peer answered with a non-200 status.
type RejectedError struct {
	Status int
}

func (e *RejectedError) Error() string {
	return fmt.Sprintf("HBONE CONNECT rejected by peer: %d %s", e.Status, http.StatusText(e.Status))
}

// StatusOf returns the HTTP status of a rejected tunnel, or 0.
func StatusOf(err error) int {
	if re, ok := errors.AsType[*RejectedError](err); ok {
		return re.Status
	}
	return 0
}

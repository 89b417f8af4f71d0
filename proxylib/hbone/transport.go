// Package hbone defines the HBONE tunnel transport shared by ztunnel and the
// waypoint: HTTP CONNECT over mutual TLS with SPIFFE identities on port 15008.
// Implementations live in subpackages (h2: HTTP/2, the default; h3: HTTP/3
// over QUIC, experimental). Callers depend only on this package.
package hbone

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"net/http"
	"net/netip"

	"github.com/ambientmesh/ambient/proxylib/identity"
)

// Port is the HBONE port (TCP for HTTP/2, UDP for HTTP/3).
const Port = 15008

// Protocol names a transport.
type Protocol string

const (
	HTTP2 Protocol = "HTTP2"
	HTTP3 Protocol = "HTTP3"
)

// Stream is one tunnel: a bidirectional byte stream that supports half-close.
// CloseWrite ends our direction (END_STREAM). Close releases the tunnel; if
// it had not ended cleanly the peer sees a reset (RST_STREAM), so an upstream
// reset propagates as a reset, never as a clean EOF.
//
// Both directions half-close independently on either side, as TCP does:
// after CloseWrite the stream still reads until the peer's END_STREAM. A
// Close after our CloseWrite tells a peer still sending to stop
// (RST_STREAM(NO_ERROR) over HTTP/2): it still reads all we sent, then EOF.
// Hand a finished Stream and its upstream to Relay to get these semantics.
type Stream interface {
	net.Conn
	CloseWrite() error
}

// DialRequest says where and how to open a tunnel.
type DialRequest struct {
	// Source is the local workload's identity; its certificate is presented.
	Source identity.Identity
	// Expected lists the acceptable peer identities; the peer's single URI SAN
	// must equal one of them (never checked by DNS name). Must not be empty.
	Expected []identity.Identity
	// ProxyAddr is the peer's HBONE address (destination pod or waypoint :15008).
	ProxyAddr netip.AddrPort
	// Target is the CONNECT authority: "ip:port" of the destination pod or,
	// towards a waypoint, of the service VIP.
	Target netip.AddrPort
	// Header carries Forwarded (original source) and baggage; may be nil.
	Header http.Header
}

// Dialer opens tunnels. Implementations pool connections per
// (source identity, destination identity set, proxy address).
type Dialer interface {
	Dial(ctx context.Context, req DialRequest) (Stream, error)
	// Close drains the pool: no new streams, open ones finish.
	Close() error
}

// Request is an accepted CONNECT, with everything authorization needs.
type Request struct {
	Target   netip.AddrPort    // parsed, validated CONNECT authority
	Peer     identity.Identity // verified peer identity from its certificate
	PeerAddr netip.AddrPort    // TCP/UDP source of the outer connection
	Local    netip.AddrPort    // local address of the outer connection
	Header   http.Header       // request headers (Forwarded, baggage, ...)
	Protocol Protocol          // transport the tunnel arrived on
}

// Responder answers a CONNECT. Exactly one of Accept or Reject is called.
type Responder interface {
	// Accept sends 200 and returns the tunnel stream.
	Accept() (Stream, error)
	// Reject answers with an HTTP status (400, 403, 503, ...) and a reason that
	// is logged; nothing is tunnelled.
	Reject(status int, reason string)
}

// ResponseHeaderer is a dialed Stream that exposes the headers of the
// CONNECT's 200 (our extensions, e.g. proxylib/handover's session answer);
// the h2 engine implements it.
type ResponseHeaderer interface {
	ResponseHeader() http.Header
}

// HeaderAccepter is a Responder that can add headers to its 200; the h2
// engine implements it.
type HeaderAccepter interface {
	AcceptWithHeader(h http.Header) (Stream, error)
}

// Handler decides what to do with each CONNECT. It runs in its own goroutine
// per tunnel and owns the stream after Accept; it may block for the tunnel's
// life or return and hand the stream to other goroutines. A handler that
// returns without answering is answered 503 (fail closed).
type Handler interface {
	ServeHBONE(ctx context.Context, req *Request, resp Responder)
}

// HandlerFunc adapts a function to Handler.
type HandlerFunc func(ctx context.Context, req *Request, resp Responder)

func (f HandlerFunc) ServeHBONE(ctx context.Context, req *Request, resp Responder) { f(ctx, req, resp) }

// Server serves HBONE CONNECTs; it is already listening when returned
// (proxylib/hbone/meshtransport builds them).
type Server interface {
	// Serve blocks until the server stops; nil after Drain, Shutdown or Close.
	Serve() error
	// Drain stops accepting and lets open tunnels run to their end in the
	// background.
	Drain()
	// Shutdown stops accepting and waits for open tunnels until ctx ends,
	// then closes the rest.
	Shutdown(ctx context.Context) error
	// Close ends everything at once.
	Close() error
}

// CertSource gives the certificate for a local identity (rotated underneath;
// implemented by identity.Store) and the trust roots peers are verified with.
type CertSource interface {
	Certificate(ctx context.Context, id identity.Identity) (*tls.Certificate, error)
	Roots() *x509.CertPool
	TrustDomain() string
}

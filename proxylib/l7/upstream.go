package l7

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"time"
)

// DialFunc opens a byte stream to an endpoint (an HBONE tunnel in the
// waypoint).
type DialFunc func(ctx context.Context, endpoint netip.AddrPort) (net.Conn, error)

// Upstream sends requests to endpoints, pooling connections per endpoint,
// speaking HTTP/1.1 or HTTP/2 (h2c prior knowledge) as asked.
type Upstream struct {
	h1, h2 *http.Transport
}

// NewUpstream builds the transports over dial.
func NewUpstream(dial DialFunc) *Upstream {
	dc := func(ctx context.Context, _, addr string) (net.Conn, error) {
		ap, err := netip.ParseAddrPort(addr)
		if err != nil {
			return nil, fmt.Errorf("upstream address %q: %w", addr, err)
		}
		return dial(ctx, ap)
	}
	mk := func(h2 bool) *http.Transport {
		t := &http.Transport{
			DialContext:            dc,
			DisableCompression:     true,
			MaxIdleConns:           1024,
			MaxIdleConnsPerHost:    64,
			IdleConnTimeout:        90 * time.Second,
			MaxResponseHeaderBytes: 64 << 10,
			ExpectContinueTimeout:  0,
		}
		p := new(http.Protocols)
		if h2 {
			p.SetUnencryptedHTTP2(true)
		} else {
			p.SetHTTP1(true)
		}
		t.Protocols = p
		return t
	}
	return &Upstream{h1: mk(false), h2: mk(true)}
}

// RoundTrip sends out (a client request: RequestURI empty) to endpoint.
// The request's Host header is kept; only the connection target changes.
func (u *Upstream) RoundTrip(out *http.Request, endpoint netip.AddrPort, h2 bool) (*http.Response, error) {
	out.URL.Scheme = "http"
	out.URL.Host = endpoint.String()
	if _, ok := out.Header["User-Agent"]; !ok {
		out.Header.Set("User-Agent", "") // do not add Go's default
	}
	if h2 {
		return u.h2.RoundTrip(out)
	}
	return u.h1.RoundTrip(out)
}

// Close drops idle pooled connections.
func (u *Upstream) Close() {
	u.h1.CloseIdleConnections()
	u.h2.CloseIdleConnections()
}

// Outbound prepares the upstream request for in: a client request with the
// same method, URL path and query, Host, headers without hop-by-hop ones and
// with our forwarding headers, and the same body and trailers. HTTP/2 keeps
// "TE: trailers" (gRPC needs it).
func Outbound(ctx context.Context, in *http.Request, fwd Forwarding) *http.Request {
	out := in.Clone(ctx)
	out.RequestURI = ""
	out.Close = false
	upgrade := UpgradeProtocol(in)
	RemoveHopByHop(out.Header, in.ProtoMajor == 2)
	if upgrade != "" {
		// Protocol upgrades (WebSocket) are end to end by intent: re-add
		// the two hop-by-hop headers that carry them.
		out.Header.Set("Connection", "Upgrade")
		out.Header.Set("Upgrade", upgrade)
	}
	SetForwarded(out.Header, fwd)
	if in.ContentLength == 0 {
		out.Body = http.NoBody
	} else {
		out.Body = in.Body
	}
	out.Trailer = in.Trailer
	return out
}

// UpgradeProtocol is the protocol an HTTP/1.1 request asks to switch to
// ("websocket"), or "" (h2c upgrades are handled by the server itself).
func UpgradeProtocol(req *http.Request) string {
	if req.ProtoMajor != 1 || !headerHasToken(req.Header, "Connection", "upgrade") {
		return ""
	}
	up := req.Header.Get("Upgrade")
	if up == "" || strings.EqualFold(up, "h2c") {
		return ""
	}
	return up
}

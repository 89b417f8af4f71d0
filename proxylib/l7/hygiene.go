package l7

import (
	"bufio"
	"bytes"
	"errors"
	"net/http"
	"net/netip"
	"strings"
)

// Limits on request heads. Envoy's defaults: 60 KiB of headers, 100 headers.
const (
	DefaultMaxHeaderBytes = 60 << 10
	DefaultMaxHeaders     = 100
)

// headError is a refused request head: the status to answer and why.
type headError struct {
	status int
	reason string
}

func (e *headError) Error() string { return e.reason }

func badRequest(reason string) *headError {
	return &headError{status: http.StatusBadRequest, reason: reason}
}

var errHeadTooLarge = &headError{status: http.StatusRequestHeaderFieldsTooLarge, reason: "request header too large"}

// readHead reads one request head (request line and headers, through the
// empty line) of at most max bytes. Lines must end in CRLF: a bare LF is a
// known smuggling vector between lenient and strict parsers.
func readHead(br *bufio.Reader, max, maxHeaders int) ([]byte, error) {
	var head []byte
	lines, skipped := 0, 0
	for {
		line, err := br.ReadSlice('\n')
		if len(head)+len(line) > max {
			return nil, errHeadTooLarge
		}
		if err == bufio.ErrBufferFull {
			head = append(head, line...)
			continue
		}
		if err != nil {
			if len(head) == 0 && len(line) == 0 {
				return nil, err // clean end between requests
			}
			return nil, badRequest("incomplete request head")
		}
		head = append(head, line...)
		if !bytes.HasSuffix(head, []byte("\r\n")) {
			return nil, badRequest("line not terminated by CRLF")
		}
		if len(head) == 2 && lines == 0 {
			if skipped++; skipped > 1 {
				return nil, badRequest("empty lines before the request line")
			}
			head = head[:0] // tolerate one empty line before a request (RFC 9112 §2.2)
			continue
		}
		if bytes.HasSuffix(head, []byte("\r\n\r\n")) {
			return head, nil
		}
		lines++
		if lines > maxHeaders+1 {
			return nil, errHeadTooLarge
		}
	}
}

// validateHead refuses the request-smuggling shapes that lenient parsers
// (including Go's, which merges identical duplicate Content-Length headers
// and prefers Transfer-Encoding) would let through: duplicate or malformed
// Content-Length, Content-Length with Transfer-Encoding, any transfer coding
// but a single "chunked", obsolete line folding, whitespace before the colon,
// invalid field names, a missing or repeated Host on HTTP/1.1.
func validateHead(head []byte) *headError {
	lines := strings.Split(strings.TrimSuffix(string(head), "\r\n\r\n"), "\r\n")
	reqLine := lines[0]
	parts := strings.Split(reqLine, " ")
	if len(parts) != 3 || parts[0] == "" || parts[1] == "" {
		return badRequest("malformed request line")
	}
	for _, c := range parts[0] {
		if !isTokenChar(c) {
			return badRequest("invalid method")
		}
	}
	if parts[2] != "HTTP/1.1" && parts[2] != "HTTP/1.0" {
		return badRequest("unsupported HTTP version")
	}
	var cl, te, host int
	for _, l := range lines[1:] {
		if l == "" {
			continue
		}
		if l[0] == ' ' || l[0] == '\t' {
			return badRequest("obsolete line folding")
		}
		name, value, ok := strings.Cut(l, ":")
		if !ok || name == "" {
			return badRequest("header line without a colon")
		}
		for _, c := range name {
			if !isTokenChar(c) {
				return badRequest("invalid header name")
			}
		}
		if strings.ContainsAny(value, "\x00\r\n") {
			return badRequest("invalid header value")
		}
		value = strings.TrimSpace(value)
		switch strings.ToLower(name) {
		case "content-length":
			cl++
			if value == "" || strings.Trim(value, "0123456789") != "" || len(value) > 18 {
				return badRequest("invalid Content-Length")
			}
		case "transfer-encoding":
			te++
			if !strings.EqualFold(value, "chunked") {
				return &headError{status: http.StatusNotImplemented, reason: "unsupported Transfer-Encoding"}
			}
		case "host":
			host++
		}
	}
	switch {
	case cl > 1:
		return badRequest("duplicate Content-Length")
	case te > 1:
		return badRequest("duplicate Transfer-Encoding")
	case cl > 0 && te > 0:
		return badRequest("Content-Length with Transfer-Encoding")
	case parts[2] == "HTTP/1.1" && host != 1:
		return badRequest("HTTP/1.1 request needs exactly one Host")
	case host > 1:
		return badRequest("duplicate Host")
	}
	return nil
}

func isTokenChar(c rune) bool {
	if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' {
		return true
	}
	return strings.ContainsRune("!#$%&'*+-.^_`|~", c)
}

// hopByHop are the connection-level headers (RFC 9110 §7.6.1) a proxy must
// not forward, plus the legacy ones proxies strip.
var hopByHop = []string{
	"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate",
	"Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade",
}

// RemoveHopByHop strips hop-by-hop headers and every header named in
// Connection. "TE: trailers" survives when keepTrailersTE is set (gRPC over
// HTTP/2 needs it end to end).
func RemoveHopByHop(h http.Header, keepTrailersTE bool) {
	for _, v := range h.Values("Connection") {
		for _, name := range strings.Split(v, ",") {
			if name = strings.TrimSpace(name); name != "" {
				h.Del(name)
			}
		}
	}
	trailersTE := false
	for _, v := range h.Values("Te") {
		for _, t := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), "trailers") {
				trailersTE = true
			}
		}
	}
	for _, name := range hopByHop {
		h.Del(name)
	}
	if keepTrailersTE && trailersTE {
		h.Set("Te", "trailers")
	}
}

// Forwarding identifies the client for the upstream, from what we verified.
type Forwarding struct {
	ClientIP netip.Addr
	// PeerID is the verified SPIFFE URI of the HBONE peer; ProxyID ours.
	PeerID  string
	ProxyID string
}

// SetForwarded replaces every client-supplied forwarding header with ours:
// X-Forwarded-For is the verified peer address, X-Forwarded-Client-Cert
// names the verified peer identity, X-Forwarded-Proto is http. A client's
// own values are never trusted or appended to.
func SetForwarded(h http.Header, f Forwarding) {
	for _, name := range []string{"X-Forwarded-For", "X-Forwarded-Client-Cert", "X-Forwarded-Proto", "X-Forwarded-Host", "Forwarded", "X-Real-Ip", "X-Envoy-External-Address"} {
		h.Del(name)
	}
	if f.ClientIP.IsValid() {
		h.Set("X-Forwarded-For", f.ClientIP.Unmap().String())
	}
	if f.PeerID != "" {
		xfcc := "URI=" + f.PeerID
		if f.ProxyID != "" {
			xfcc = "By=" + f.ProxyID + ";" + xfcc
		}
		h.Set("X-Forwarded-Client-Cert", xfcc)
	}
	h.Set("X-Forwarded-Proto", "http")
}

// errBodyTooLarge guards trailer parsing.
var errTrailerTooLarge = errors.New("request trailers too large")

package l7

import (
	"errors"
	"net/http"
	"net/url"
	"strings"
)

// ErrBadPath is a request path that cannot be normalized (not origin-form,
// or a broken percent-encoding): the request is refused with 400.
var ErrBadPath = errors.New("malformed request path")

// NormalizePath is Istio's default path normalization plus merged slashes,
// applied to the escaped (on-the-wire) path: RFC 3986 §6.2.2 (percent-
// encodings of unreserved characters decoded, the others' hex upper-cased;
// dot segments removed, §5.2.4) and runs of '/' merged into one. A trailing
// slash is kept. Encodings of reserved characters such as %2F stay encoded,
// so what the backend receives still means what the client sent.
//
// Policy and routing match the result, and the result is what is forwarded:
// "/./admin", "//admin", "/x/../admin" and "/%61dmin" are all "/admin".
func NormalizePath(escaped string) (string, error) {
	if escaped == "*" { // OPTIONS * (asterisk-form) has no path to normalize
		return escaped, nil
	}
	if !strings.HasPrefix(escaped, "/") {
		return "", ErrBadPath
	}
	decoded, err := decodeUnreserved(escaped)
	if err != nil {
		return "", err
	}
	return removeDotSegments(decoded), nil
}

// decodeUnreserved decodes %XX of unreserved characters and upper-cases
// the hex of every other encoding.
func decodeUnreserved(s string) (string, error) {
	if !strings.Contains(s, "%") {
		return s, nil
	}
	var b strings.Builder
	b.Grow(len(s))
	for i := 0; i < len(s); i++ {
		if s[i] != '%' {
			b.WriteByte(s[i])
			continue
		}
		if i+2 >= len(s) || !isHex(s[i+1]) || !isHex(s[i+2]) {
			return "", ErrBadPath
		}
		c := unhex(s[i+1])<<4 | unhex(s[i+2])
		if isUnreserved(c) {
			b.WriteByte(c)
		} else {
			b.WriteByte('%')
			b.WriteString(strings.ToUpper(s[i+1 : i+3]))
		}
		i += 2
	}
	return b.String(), nil
}

// removeDotSegments resolves "." and ".." and merges empty segments of a
// path that starts with '/'. ".." above the root stays at the root.
func removeDotSegments(p string) string {
	segs := strings.Split(p[1:], "/")
	out := make([]string, 0, len(segs))
	trailing := false
	for i, s := range segs {
		last := i == len(segs)-1
		switch s {
		case "", ".":
			trailing = last
		case "..":
			if len(out) > 0 {
				out = out[:len(out)-1]
			}
			trailing = last
		default:
			out = append(out, s)
			trailing = false
		}
	}
	res := "/" + strings.Join(out, "/")
	if trailing && len(out) > 0 {
		res += "/"
	}
	return res
}

// NormalizeRequest normalizes r's path in place (Path and RawPath), before
// anything matches on it.
func NormalizeRequest(r *http.Request) error {
	if r.URL == nil || r.Method == http.MethodConnect {
		return nil
	}
	norm, err := NormalizePath(r.URL.EscapedPath())
	if err != nil {
		return err
	}
	p, err := url.PathUnescape(norm)
	if err != nil {
		return ErrBadPath
	}
	r.URL.Path, r.URL.RawPath = p, norm
	r.RequestURI = r.URL.RequestURI()
	return nil
}

func isUnreserved(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' ||
		c == '-' || c == '.' || c == '_' || c == '~'
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

func unhex(c byte) byte {
	switch {
	case '0' <= c && c <= '9':
		return c - '0'
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10
	}
	return c - 'A' + 10
}

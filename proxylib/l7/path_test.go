package l7

import (
	"bufio"
	"net/http"
	"net/url"
	"strings"
	"testing"
)

func TestNormalizePath(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"/", "/"},
		{"/admin", "/admin"},
		{"/./admin", "/admin"},
		{"//admin", "/admin"},
		{"/x/../admin", "/admin"},
		{"/x/./y/..//admin/", "/x/admin/"},
		{"/../../admin", "/admin"},
		{"/%61dmin", "/admin"},
		{"/%2e%2e/admin", "/admin"},
		{"/x/%2E%2E/admin", "/admin"},
		{"/admin/.", "/admin/"},
		{"/admin/..", "/"},
		{"/a%2fb", "/a%2Fb"}, // an encoded slash is data, not a separator
		{"/a%2F..%2Fb", "/a%2F..%2Fb"},
		{"/caf%C3%A9", "/caf%C3%A9"},
		{"/a b", "/a b"},
		{"*", "*"},
	} {
		got, err := NormalizePath(c.in)
		if err != nil || got != c.want {
			t.Errorf("NormalizePath(%q) = %q, %v; want %q", c.in, got, err, c.want)
		}
	}
	for _, bad := range []string{"", "admin", "/%", "/%4", "/%zz", "http://x/admin"} {
		if got, err := NormalizePath(bad); err == nil {
			t.Errorf("NormalizePath(%q) = %q, want an error", bad, got)
		}
	}
}

func TestNormalizeRequestRewritesWhatIsForwarded(t *testing.T) {
	r, err := http.ReadRequest(bufioReader("GET /x/..//%61dmin/%2fsecret?q=/../a HTTP/1.1\r\nHost: h\r\n\r\n"))
	if err != nil {
		t.Fatal(err)
	}
	if err := NormalizeRequest(r); err != nil {
		t.Fatal(err)
	}
	if r.URL.Path != "/admin//secret" || r.URL.EscapedPath() != "/admin/%2Fsecret" || r.URL.RawQuery != "q=/../a" {
		t.Fatalf("Path %q, escaped %q, query %q", r.URL.Path, r.URL.EscapedPath(), r.URL.RawQuery)
	}
	if r.RequestURI != "/admin/%2Fsecret?q=/../a" {
		t.Fatalf("RequestURI %q", r.RequestURI)
	}
}

// FuzzNormalizePath: the result is a fixed point, rooted, without empty or
// dot segments, and its decoded form matches the same prefix rules a
// policy would apply.
func FuzzNormalizePath(f *testing.F) {
	for _, s := range []string{"/", "/./admin", "//admin", "/x/../admin", "/%61dmin", "/%2e%2E/x", "/a%2fb/..", "/admin/.", "/%", "*", "/a//b///c/"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		out, err := NormalizePath(in)
		if err != nil {
			return
		}
		if out == "*" {
			return
		}
		again, err := NormalizePath(out)
		if err != nil || again != out {
			t.Fatalf("not a fixed point: %q -> %q -> %q (%v)", in, out, again, err)
		}
		if !strings.HasPrefix(out, "/") || strings.Contains(out, "//") {
			t.Fatalf("%q -> %q: not rooted or has an empty segment", in, out)
		}
		for _, seg := range strings.Split(out, "/") {
			if seg == "." || seg == ".." {
				t.Fatalf("%q -> %q: dot segment left", in, out)
			}
		}
		if _, err := url.PathUnescape(out); err != nil {
			t.Fatalf("%q -> %q: does not decode: %v", in, out, err)
		}
	})
}

func bufioReader(s string) *bufio.Reader { return bufio.NewReader(strings.NewReader(s)) }

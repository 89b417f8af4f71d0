package route

import (
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"

	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
)

type headerMod struct {
	set, add []gwv1.HTTPHeader
	remove   []string
}

func (h *headerMod) apply(hdr http.Header) {
	if h == nil {
		return
	}
	for _, s := range h.set {
		hdr.Set(string(s.Name), s.Value)
	}
	for _, a := range h.add {
		hdr.Add(string(a.Name), a.Value)
	}
	for _, r := range h.remove {
		hdr.Del(r)
	}
}

type pathMod struct {
	full   *string
	prefix *string
}

type redirectSpec struct {
	scheme   *string
	hostname *string
	port     *int32
	status   int
	path     *pathMod
}

type rewriteSpec struct {
	hostname *string
	path     *pathMod
}

type filterSet struct {
	reqHeaders  *headerMod
	respHeaders *headerMod
	redirect    *redirectSpec
	rewrite     *rewriteSpec
}

// compileFilters accepts the filters we implement. Any other filter makes the
// rule invalid (500): serving the request with a filter silently ignored
// could skip something the user relies on (auth, CORS).
func compileFilters(in []gwv1.HTTPRouteFilter) (filterSet, error) {
	var fs filterSet
	for _, f := range in {
		switch f.Type {
		case gwv1.HTTPRouteFilterRequestHeaderModifier:
			fs.reqHeaders = headerModOf(f.RequestHeaderModifier)
		case gwv1.HTTPRouteFilterResponseHeaderModifier:
			fs.respHeaders = headerModOf(f.ResponseHeaderModifier)
		case gwv1.HTTPRouteFilterRequestRedirect:
			if f.RequestRedirect == nil {
				return fs, fmt.Errorf("RequestRedirect filter without requestRedirect")
			}
			r := f.RequestRedirect
			rs := &redirectSpec{scheme: r.Scheme, status: http.StatusFound}
			if r.Hostname != nil {
				h := string(*r.Hostname)
				rs.hostname = &h
			}
			if r.Port != nil {
				p := int32(*r.Port)
				rs.port = &p
			}
			if r.StatusCode != nil {
				rs.status = *r.StatusCode
			}
			pm, err := pathModOf(r.Path)
			if err != nil {
				return fs, err
			}
			rs.path = pm
			fs.redirect = rs
		case gwv1.HTTPRouteFilterURLRewrite:
			if f.URLRewrite == nil {
				return fs, fmt.Errorf("URLRewrite filter without urlRewrite")
			}
			rw := &rewriteSpec{}
			if f.URLRewrite.Hostname != nil {
				h := string(*f.URLRewrite.Hostname)
				rw.hostname = &h
			}
			pm, err := pathModOf(f.URLRewrite.Path)
			if err != nil {
				return fs, err
			}
			rw.path = pm
			fs.rewrite = rw
		default:
			return fs, fmt.Errorf("filter %q is not supported by this waypoint", f.Type)
		}
	}
	if fs.redirect != nil && fs.rewrite != nil {
		return fs, fmt.Errorf("RequestRedirect and URLRewrite cannot be combined")
	}
	return fs, nil
}

func headerModOf(f *gwv1.HTTPHeaderFilter) *headerMod {
	if f == nil {
		return nil
	}
	return &headerMod{set: f.Set, add: f.Add, remove: f.Remove}
}

func pathModOf(p *gwv1.HTTPPathModifier) (*pathMod, error) {
	if p == nil {
		return nil, nil
	}
	switch p.Type {
	case gwv1.FullPathHTTPPathModifier:
		if p.ReplaceFullPath == nil {
			return nil, fmt.Errorf("ReplaceFullPath without replaceFullPath")
		}
		return &pathMod{full: p.ReplaceFullPath}, nil
	case gwv1.PrefixMatchHTTPPathModifier:
		if p.ReplacePrefixMatch == nil {
			return nil, fmt.Errorf("ReplacePrefixMatch without replacePrefixMatch")
		}
		return &pathMod{prefix: p.ReplacePrefixMatch}, nil
	}
	return nil, fmt.Errorf("unknown path modifier %q", p.Type)
}

// rewritePath applies a path modifier given the matched prefix.
func (p *pathMod) rewritePath(path, matchedPrefix string) string {
	if p == nil {
		return path
	}
	if p.full != nil {
		return *p.full
	}
	prefix := strings.TrimSuffix(matchedPrefix, "/")
	rest := strings.TrimPrefix(path, prefix)
	repl := strings.TrimSuffix(*p.prefix, "/")
	out := repl + rest
	if out == "" || out[0] != '/' {
		out = "/" + out
	}
	return out
}

// IsRedirect reports whether the rule answers with a redirect.
func (m Match) IsRedirect() bool { return m.Rule != nil && m.Rule.filters.redirect != nil }

// Redirect computes the redirect status and Location for req.
func (m Match) Redirect(req *http.Request) (int, string) {
	r := m.Rule.filters.redirect
	scheme := "http"
	if req.TLS != nil {
		scheme = "https"
	}
	host, port := splitHostPort(req.Host)
	if r.scheme != nil {
		scheme = *r.scheme
		port = "" // well-known port of the new scheme
	}
	if r.hostname != nil {
		host = *r.hostname
	}
	if r.port != nil {
		port = strconv.Itoa(int(*r.port))
	}
	if (scheme == "http" && port == "80") || (scheme == "https" && port == "443") {
		port = ""
	}
	path := r.path.rewritePath(req.URL.Path, m.prefix)
	loc := scheme + "://" + host
	if port != "" {
		loc = scheme + "://" + net.JoinHostPort(host, port)
	}
	loc += path
	if req.URL.RawQuery != "" {
		loc += "?" + req.URL.RawQuery
	}
	return r.status, loc
}

func splitHostPort(hostport string) (string, string) {
	h, p, err := net.SplitHostPort(hostport)
	if err != nil {
		return hostport, ""
	}
	return h, p
}

// ApplyRequest runs the rule's and the backend's request filters on req:
// header modifiers, then URL rewrite.
func (m Match) ApplyRequest(req *http.Request, b Backend) {
	for _, fs := range []filterSet{m.Rule.filters, b.filters} {
		fs.reqHeaders.apply(req.Header)
		if rw := fs.rewrite; rw != nil {
			if rw.hostname != nil {
				req.Host = *rw.hostname
			}
			if rw.path != nil {
				req.URL.Path = rw.path.rewritePath(req.URL.Path, m.prefix)
				req.URL.RawPath = ""
			}
		}
	}
}

// ApplyResponse runs the response header modifiers on the upstream response.
func (m Match) ApplyResponse(h http.Header, b Backend) {
	m.Rule.filters.respHeaders.apply(h)
	b.filters.respHeaders.apply(h)
}

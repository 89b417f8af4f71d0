package h2_test

import (
	"context"
	"net/http"
	"testing"

	"github.com/ambientmesh/ambient/proxylib/hbone"
)

// FuzzServerRequest sends arbitrary :method and :authority values to a real
// server over real TLS and checks the server's verdict against the parser:
// only a CONNECT with a valid authority reaches the handler (which answers
// 403 here), everything else is 400/405 or a protocol-level refusal, and the
// server never crashes.
func FuzzServerRequest(f *testing.F) {
	for _, seed := range [][2]string{
		{"CONNECT", "10.0.0.5:80"}, {"CONNECT", "[fd00::1]:8080"}, {"CONNECT", "10.0.0.5"},
		{"CONNECT", "example.com:443"}, {"GET", "10.0.0.5:80"}, {"CONNECT", "10.0.0.5:0"},
		{"CONNECT", "::1"}, {"connect", "10.0.0.5:80"}, {"CONNECT", ""},
	} {
		f.Add(seed[0], seed[1])
	}
	reached := make(chan *hbone.Request, 1)
	e := newEnv(f, withHandler(hbone.HandlerFunc(func(_ context.Context, req *hbone.Request, resp hbone.Responder) {
		select {
		case reached <- req:
		default:
		}
		resp.Reject(http.StatusForbidden, "fuzz")
	})))
	f.Fuzz(func(t *testing.T, method, authority string) {
		rc := e.rawConn(t)
		defer rc.conn.Close()
		if method == "CONNECT" {
			rc.writeHeaders(1, false, ":method", method, ":authority", authority)
		} else {
			rc.writeHeaders(1, false, ":method", method, ":scheme", "https", ":path", "/", ":authority", authority)
		}
		status := rc.status(1)
		var req *hbone.Request
		select {
		case req = <-reached:
		default:
		}
		target, perr := hbone.ParseAuthority(authority)
		switch status {
		case http.StatusForbidden:
			if method != "CONNECT" || perr != nil || req == nil || req.Target != target {
				t.Fatalf("%q %q reached the handler (req=%v, parse err=%v)", method, authority, req, perr)
			}
		case http.StatusBadRequest, http.StatusMethodNotAllowed, -1, 0:
			if req != nil {
				t.Fatalf("%q %q: status %d but the handler ran", method, authority, status)
			}
			if status == http.StatusBadRequest && method == "CONNECT" && perr == nil && target != e.addr {
				t.Fatalf("valid authority %q refused with 400", authority)
			}
		default:
			t.Fatalf("%q %q: unexpected status %d", method, authority, status)
		}
	})
}

package proxyerr

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"testing"
)

func TestReasonOf(t *testing.T) {
	base := New(AuthorizationPolicyRejection, "policy %s", "ns/deny")
	cases := []struct {
		name string
		err  error
		want Reason
	}{
		{"nil", nil, ""},
		{"direct", base, AuthorizationPolicyRejection},
		{"wrapped by fmt", fmt.Errorf("inbound: %w", base), AuthorizationPolicyRejection},
		{"wrap of foreign", Wrap(UpstreamConnectFailed, io.EOF, "dial %s", "10.0.0.1:80"), UpstreamConnectFailed},
		{"foreign", io.EOF, ConnectionClosed},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := ReasonOf(c.err); got != c.want {
				t.Fatalf("ReasonOf = %q, want %q", got, c.want)
			}
		})
	}
}

func TestErrorMessageAndUnwrap(t *testing.T) {
	err := Wrap(UpstreamConnectFailed, io.ErrUnexpectedEOF, "dial %s", "10.0.0.1:80")
	if got, want := err.Error(), "upstream_connect_failed: dial 10.0.0.1:80: unexpected EOF"; got != want {
		t.Fatalf("Error() = %q, want %q", got, want)
	}
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatal("cause not reachable with errors.Is")
	}
	if Wrap(UpstreamReset, nil, "x") != nil {
		t.Fatal("Wrap(nil) must be nil")
	}
}

func TestHTTPStatus(t *testing.T) {
	cases := map[Reason]int{
		AuthorizationPolicyRejection: http.StatusForbidden,
		PlaintextRejected:            http.StatusForbidden,
		UnknownDestination:           http.StatusBadRequest,
		SelfTarget:                   http.StatusBadRequest,
		NotReady:                     http.StatusServiceUnavailable,
		UpstreamConnectFailed:        http.StatusServiceUnavailable,
		Reason("something_else"):     http.StatusInternalServerError,
	}
	for r, want := range cases {
		if got := HTTPStatus(r); got != want {
			t.Errorf("HTTPStatus(%s) = %d, want %d", r, got, want)
		}
	}
}

package grpcwire

import (
	"net/http"
	"testing"
	"time"
)

func TestEncodeTimeout(t *testing.T) {
	for _, tc := range []struct {
		d    time.Duration
		want string
	}{
		{0, "1n"},
		{time.Nanosecond, "1n"},
		{99999999 * time.Nanosecond, "99999999n"},
		{100 * time.Millisecond, "100000u"},
		{10 * time.Second, "10000000u"},
		{100 * time.Second, "100000m"},
		{100*time.Second + time.Nanosecond, "100001m"}, // rounded up, never shorter
		{1000 * time.Hour, "3600000S"},
		{2000000 * time.Hour, "2000000H"},
	} {
		if got := encodeTimeout(tc.d); got != tc.want {
			t.Errorf("encodeTimeout(%v) = %q, want %q", tc.d, got, tc.want)
		}
	}
}

func TestStatusFrom(t *testing.T) {
	for _, tc := range []struct {
		name, status, message string
		want                  *Status
	}{
		{"ok", "0", "", nil},
		{"decoded", "5", "a%20b%25c%0A%C3%BC", &Status{NotFound, "a b%c\nü"}},
		{"malformed escape kept", "13", "50%zz%4", &Status{Internal, "50%zz%4"}},
		{"missing", "", "", &Status{Internal, "server closed the stream without a grpc-status"}},
		{"garbage", "x", "", &Status{Internal, `malformed grpc-status "x"`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := http.Header{}
			if tc.status != "" {
				h.Set("grpc-status", tc.status)
			}
			h.Set("grpc-message", tc.message)
			got := statusFrom(h)
			if (got == nil) != (tc.want == nil) || got != nil && *got != *tc.want {
				t.Fatalf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestHTTPStatusCode(t *testing.T) {
	for status, want := range map[int]Code{400: Internal, 401: Unauthenticated, 403: PermissionDenied, 404: Unimplemented,
		429: Unavailable, 502: Unavailable, 503: Unavailable, 504: Unavailable, 500: Unknown} {
		if got := httpStatusCode(status); got != want {
			t.Errorf("HTTP %d: %v, want %v", status, got, want)
		}
	}
}

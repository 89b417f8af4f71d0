package h2

import (
	"errors"
	"fmt"
	"testing"

	"golang.org/x/net/http2"
)

// TestRetryable: errors x/net returns before a stream was started on a
// connection going away are retried on another connection; others are not.
func TestRetryable(t *testing.T) {
	for _, c := range []struct {
		err  error
		want bool
	}{
		{http2.ErrNoCachedConn, true},
		{errors.New("http2: client conn not usable"), true}, // a pooled connection that just got GOAWAY
		{errors.New("http2: server sent GOAWAY and closed the connection"), true},
		{errors.New("http2: client connection lost"), true},
		{fmt.Errorf("stream error: stream ID 3; REFUSED_STREAM"), true},
		{errors.New("remote error: tls: bad certificate"), false},
		{errors.New("hbone: CONNECT rejected by peer: 403 Forbidden"), false},
	} {
		if got := retryable(c.err); got != c.want {
			t.Errorf("retryable(%q) = %v, want %v", c.err, got, c.want)
		}
	}
}

package h2

import (
	"errors"
	"fmt"
	"testing"

	"github.com/ambientmesh/ambient/proxylib/hbone"
)

// TestRetryable: a stream refused before the peer processed it (GOAWAY,
// REFUSED_STREAM, a connection that died before the answer) is retried on
// another connection; a rejection or a TLS failure is not.
func TestRetryable(t *testing.T) {
	for _, c := range []struct {
		err  error
		want bool
	}{
		{fmt.Errorf("hbone: CONNECT x via y: %w", errGoAway), true},
		{fmt.Errorf("hbone: CONNECT x via y: %w", errRefused), true},
		{fmt.Errorf("hbone: CONNECT x via y: %w", errConnClosed), true},
		{errors.New("remote error: tls: bad certificate"), false},
		{fmt.Errorf("hbone: CONNECT x via y: %w", &hbone.RejectedError{Status: 403}), false},
		{&ResetError{Code: 8, Remote: true}, false},
	} {
		if got := retryable(c.err); got != c.want {
			t.Errorf("retryable(%q) = %v, want %v", c.err, got, c.want)
		}
	}
}

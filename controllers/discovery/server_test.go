package discovery

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/http/httptest"
	"os"
	"testing"
	"time"

	"github.com/go-logr/logr"
)

// TestServeClosesConnectionsUntilSynced: before the first full model a
// connection is closed at once (the proxy backs off and dials again)
// instead of waiting in the listen backlog for a handshake nobody answers;
// once synced the same listener serves TLS.
func TestServeClosesConnectionsUntilSynced(t *testing.T) {
	ts := httptest.NewUnstartedServer(nil)
	ts.StartTLS()
	certs := ts.TLS.Certificates
	ts.Close()
	c := &Controller{}
	srv := &Server{Controller: c, TLS: &tls.Config{Certificates: certs, MinVersion: tls.VersionTLS13}, Log: logr.Discard()}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, lis) }()

	conn, err := net.Dial("tcp", lis.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	if err := conn.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("a connection before the model synced was left open (read: %v)", err)
	}
	conn.Close()

	c.synced.Store(true)
	tc, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", lis.Addr().String(), &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13}) //nolint:gosec // the test's own server
	if err != nil {
		t.Fatalf("synced server did not serve TLS: %v", err)
	}
	tc.Close()
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

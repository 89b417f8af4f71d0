package caclient

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/ambientmesh/ambient/proxylib/ca"
	"github.com/ambientmesh/ambient/proxylib/caclient/capb"
	"github.com/ambientmesh/ambient/proxylib/caclient/capb/caservice"
	"github.com/ambientmesh/ambient/proxylib/identity"
	"github.com/ambientmesh/ambient/test/svcproxy"
)

// replicaCA is one control-plane replica's CA: it signs honestly, after
// hold (if set) lets the request go on.
type replicaCA struct {
	caservice.UnimplementedIstioCertificateServiceServer
	auth     *ca.Authority
	received chan struct{}
	hold     chan struct{}
}

func (r *replicaCA) CreateCertificate(ctx context.Context, req *capb.IstioCertificateRequest) (*capb.IstioCertificateResponse, error) {
	if r.received != nil {
		r.received <- struct{}{}
	}
	if r.hold != nil {
		select {
		case <-r.hold:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	id := identity.MustParse(req.GetMetadata().GetFields()[ImpersonatedIdentityKey].GetStringValue())
	cert, err := r.auth.SignCSR([]byte(req.Csr), id, time.Hour)
	if err != nil {
		return nil, err
	}
	return &capb.IstioCertificateResponse{CertChain: []string{string(ca.EncodeCerts(r.auth.ChainFor(cert)...))}}, nil
}

func startReplica(t *testing.T, cert tls.Certificate, srv *replicaCA) (*grpc.Server, string) {
	t.Helper()
	gs := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13})))
	caservice.RegisterIstioCertificateServiceServer(gs, srv)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = gs.Serve(lis) }()
	t.Cleanup(gs.Stop)
	return gs, lis.Addr().String()
}

// The CA Service has two replicas; the one serving a request dies (its
// process exits with the request in flight) or its node is lost (the
// connection hangs). The request in flight is retried on the other
// replica; after a hang, the next request does not wait on the dead
// connection again.
func TestSignFailsOverToAnotherReplica(t *testing.T) {
	rootCert, rootKey, err := ca.NewSelfSignedRoot("cluster.local", time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	auth := &ca.Authority{Cert: rootCert, Key: rootKey, Roots: []*x509.Certificate{rootCert}}
	serverCert, err := issueTestServerCert(auth)
	if err != nil {
		t.Fatal(err)
	}
	id := identity.MustParse("spiffe://cluster.local/ns/app/sa/web")
	newClient := func(addr string, timeout time.Duration) *Client {
		c, err := New(Config{Address: addr, Timeout: timeout,
			TLS:   &tls.Config{RootCAs: auth.RootPool(), ServerName: "ca.test", MinVersion: tls.VersionTLS13},
			Token: func() (string, error) { return "tok", nil }})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() })
		return c
	}

	t.Run("replica dies with the request in flight", func(t *testing.T) {
		a := &replicaCA{auth: auth, received: make(chan struct{}, 1), hold: make(chan struct{})}
		gsA, addrA := startReplica(t, serverCert, a)
		_, addrB := startReplica(t, serverCert, &replicaCA{auth: auth})
		svc := svcproxy.New(t, addrA, addrB)
		c := newClient(svc.Addr(), 20*time.Second)
		go func() {
			<-a.received // the request reached replica A: kill it
			svc.Remove(addrA)
			gsA.Stop()
		}()
		chain, err := c.Sign(context.Background(), testCSR(t), id, time.Hour)
		if err != nil {
			t.Fatalf("Sign with its replica killed mid-request: %v", err)
		}
		if got, _ := identity.FromCertificate(chain[0]); got != id {
			t.Fatalf("signed %v", got)
		}
		if svc.Connections(addrB) == 0 {
			t.Fatal("the retry did not reach the surviving replica")
		}
	})

	t.Run("replica's node is lost", func(t *testing.T) {
		a := &replicaCA{auth: auth, received: make(chan struct{}, 1)}
		_, addrA := startReplica(t, serverCert, a)
		_, addrB := startReplica(t, serverCert, &replicaCA{auth: auth})
		svc := svcproxy.New(t, addrA, addrB)
		c := newClient(svc.Addr(), 2*time.Second)
		if _, err := c.Sign(context.Background(), testCSR(t), id, time.Hour); err != nil {
			t.Fatal(err)
		}
		<-a.received
		svc.Freeze(addrA) // connections to A stay open but carry nothing
		if _, err := c.Sign(context.Background(), testCSR(t), id, time.Hour); err == nil {
			t.Fatal("a request on a frozen connection succeeded")
		}
		// The caller (identity.Store) retries: that request must not wait
		// on the dead connection again.
		if _, err := c.Sign(context.Background(), testCSR(t), id, time.Hour); err != nil {
			t.Fatalf("Sign after a timeout on a lost replica: %v", err)
		}
	})
}

// Package caclient is the proxies' client of the mesh CA: Istio's
// IstioCertificateService/CreateCertificate over gRPC and TLS, authenticated
// with the proxy's projected service-account token. It implements
// identity.CAClient.
package caclient

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"sync"
	"time"

	"google.golang.org/protobuf/types/known/structpb"

	"github.com/ambientmesh/ambient/proxylib/caclient/capb"
	"github.com/ambientmesh/ambient/proxylib/grpcwire"
	"github.com/ambientmesh/ambient/proxylib/identity"
)

// CreateCertificateMethod is the CA's method.
const CreateCertificateMethod = "/istio.v1.auth.IstioCertificateService/CreateCertificate"

// ImpersonatedIdentityKey names the requested identity in the metadata (as
// Istio's ztunnel does).
const ImpersonatedIdentityKey = "ImpersonatedIdentity"

// maxChainPEM bounds what we parse from the CA.
const maxChainPEM = 64 << 10

// Config configures a Client.
type Config struct {
	// Address of the CA, host:port (port 15012).
	Address string
	// TLS verifies the CA (mesh roots, ServerName ambient-controlplane.<ns>.svc).
	TLS *tls.Config
	// Token returns the bearer token (projected SA token, audience ambient-mesh).
	Token func() (string, error)
	// Timeout of one request (default 10s).
	Timeout time.Duration
}

// Client signs CSRs with the mesh CA.
//
// The CA is a Service over several control-plane replicas. A request whose
// replica goes away (UNAVAILABLE) is retried on a new connection, which the
// Service routes to a live replica; a request that times out (a replica on
// a lost node never answers, nor resets the connection) drops the
// connection so the next request dials anew instead of waiting on it.
type Client struct {
	cfg Config

	mu   sync.Mutex
	conn *grpcwire.Conn
}

var _ identity.CAClient = (*Client)(nil)

// New creates a client; the connection is made lazily.
func New(cfg Config) (*Client, error) {
	if cfg.TLS == nil || cfg.Token == nil {
		return nil, errors.New("caclient: TLS and Token are required")
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 10 * time.Second
	}
	conn, err := newConn(cfg)
	if err != nil {
		return nil, err
	}
	return &Client{cfg: cfg, conn: conn}, nil
}

// Retries of CreateCertificate (signing a CSR twice is harmless) when the
// replica serving it went away or none was reachable: backoff from
// retryMin doubling to retryMax, until the request's timeout. A new
// attempt dials anew when the connection broke, and the Service routes
// the dial to a live replica.
const (
	retryMin = 100 * time.Millisecond
	retryMax = time.Second
)

// newConn makes a (lazily connecting) client of the CA.
func newConn(cfg Config) (*grpcwire.Conn, error) {
	conn, err := grpcwire.New(grpcwire.Config{
		Address:        cfg.Address,
		TLS:            cfg.TLS,
		Metadata:       grpcwire.Bearer(cfg.Token),
		ConnectTimeout: 5 * time.Second,
	})
	if err != nil {
		return nil, fmt.Errorf("caclient: %w", err)
	}
	return conn, nil
}

func (c *Client) current() *grpcwire.Conn {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.conn
}

// Close releases the connection.
func (c *Client) Close() error {
	return c.current().Close()
}

// createCertificate calls the CA, retrying while it is Unavailable.
func (c *Client) createCertificate(ctx context.Context, req *capb.IstioCertificateRequest) (*capb.IstioCertificateResponse, error) {
	wait := retryMin
	for {
		conn := c.current()
		resp := new(capb.IstioCertificateResponse)
		err := conn.Invoke(ctx, CreateCertificateMethod, req, resp)
		switch grpcwire.CodeOf(err) {
		case grpcwire.OK:
			return resp, nil
		case grpcwire.DeadlineExceeded:
			c.replace(conn)
			return nil, err
		case grpcwire.Unavailable:
		default:
			return nil, err
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, err
		case <-t.C:
		}
		wait = min(2*wait, retryMax)
	}
}

// Sign asks the CA to sign csrPEM for id and returns the chain, leaf first.
// It checks that the leaf binds the CSR's key to exactly id.
func (c *Client) Sign(ctx context.Context, csrPEM []byte, id identity.Identity, ttl time.Duration) ([]*x509.Certificate, error) {
	csr, err := parseCSR(csrPEM)
	if err != nil {
		return nil, err
	}
	md, err := structpb.NewStruct(map[string]any{ImpersonatedIdentityKey: id.String()})
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, c.cfg.Timeout)
	defer cancel()
	resp, err := c.createCertificate(ctx, &capb.IstioCertificateRequest{
		Csr: string(csrPEM), ValidityDuration: int64(ttl / time.Second), Metadata: md,
	})
	if err != nil {
		return nil, fmt.Errorf("CreateCertificate for %s: %w", id, err)
	}
	chain, err := parseChain(resp.GetCertChain())
	if err != nil {
		return nil, err
	}
	got, err := identity.FromCertificate(chain[0])
	if err != nil {
		return nil, fmt.Errorf("CA returned a certificate without a valid identity: %w", err)
	}
	if got != id {
		return nil, fmt.Errorf("CA returned a certificate for %s, asked for %s", got, id)
	}
	if !publicKeysEqual(chain[0].PublicKey, csr.PublicKey) {
		return nil, errors.New("CA returned a certificate for another key")
	}
	return chain, nil
}

// replace drops conn after a request timed out on it (unless another
// request already did), so the next request does not wait on a dead peer.
func (c *Client) replace(conn *grpcwire.Conn) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conn != conn {
		return
	}
	next, err := newConn(c.cfg)
	if err != nil {
		return
	}
	c.conn = next
	_ = conn.Close()
}

func parseCSR(csrPEM []byte) (*x509.CertificateRequest, error) {
	block, _ := pem.Decode(csrPEM)
	if block == nil {
		return nil, errors.New("CSR is not PEM")
	}
	return x509.ParseCertificateRequest(block.Bytes)
}

func parseChain(pems []string) ([]*x509.Certificate, error) {
	var chain []*x509.Certificate
	total := 0
	for _, p := range pems {
		total += len(p)
		if total > maxChainPEM {
			return nil, errors.New("CA response too large")
		}
		rest := []byte(p)
		for {
			var b *pem.Block
			b, rest = pem.Decode(rest)
			if b == nil {
				break
			}
			if b.Type != "CERTIFICATE" {
				continue
			}
			cert, err := x509.ParseCertificate(b.Bytes)
			if err != nil {
				return nil, fmt.Errorf("CA returned an invalid certificate: %w", err)
			}
			chain = append(chain, cert)
		}
	}
	if len(chain) == 0 {
		return nil, errors.New("CA returned no certificate")
	}
	return chain, nil
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	ea, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && ea.Equal(b)
}

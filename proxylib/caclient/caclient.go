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

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/ambientmesh/ambient/proxylib/caclient/capb"
	"github.com/ambientmesh/ambient/proxylib/identity"
)

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
	conn *grpc.ClientConn
	ca   capb.IstioCertificateServiceClient
}

var _ identity.CAClient = (*Client)(nil)

type bearer struct{ token func() (string, error) }

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	t, err := b.token()
	if err != nil {
		return nil, fmt.Errorf("reading token: %w", err)
	}
	return map[string]string{"authorization": "Bearer " + t}, nil
}

func (bearer) RequireTransportSecurity() bool { return true }

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
	return &Client{cfg: cfg, conn: conn, ca: capb.NewIstioCertificateServiceClient(conn)}, nil
}

// retryPolicy retries CreateCertificate (signing a CSR twice is harmless)
// when the replica serving it went away; the retry waits for a connection
// (WaitForReady), which the Service gives to a live replica.
const retryPolicy = `{"methodConfig":[{"name":[{"service":"istio.v1.auth.IstioCertificateService"}],
 "retryPolicy":{"maxAttempts":5,"initialBackoff":"0.1s","maxBackoff":"1s","backoffMultiplier":2,"retryableStatusCodes":["UNAVAILABLE"]}}]}`

// reconnect bounds how long a broken connection waits before redialling
// (gRPC's default grows to two minutes).
var reconnect = grpc.ConnectParams{
	Backoff:           backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 5 * time.Second},
	MinConnectTimeout: 5 * time.Second,
}

// newConn makes a (lazily connecting) channel to the CA.
func newConn(cfg Config) (*grpc.ClientConn, error) {
	conn, err := grpc.NewClient(cfg.Address,
		grpc.WithTransportCredentials(credentials.NewTLS(cfg.TLS)),
		grpc.WithPerRPCCredentials(bearer{cfg.Token}),
		grpc.WithDefaultServiceConfig(retryPolicy),
		grpc.WithConnectParams(reconnect))
	if err != nil {
		return nil, fmt.Errorf("caclient: %w", err)
	}
	return conn, nil
}

func (c *Client) stub() (*grpc.ClientConn, capb.IstioCertificateServiceClient) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.conn, c.ca
}

// Close releases the connection.
func (c *Client) Close() error {
	conn, _ := c.stub()
	return conn.Close()
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
	conn, stub := c.stub()
	resp, err := stub.CreateCertificate(ctx, &capb.IstioCertificateRequest{
		Csr: string(csrPEM), ValidityDuration: int64(ttl / time.Second), Metadata: md,
	}, grpc.WaitForReady(true))
	if err != nil {
		if status.Code(err) == codes.DeadlineExceeded {
			c.replace(conn)
		}
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
func (c *Client) replace(conn *grpc.ClientConn) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conn != conn {
		return
	}
	next, err := newConn(c.cfg)
	if err != nil {
		return
	}
	c.conn, c.ca = next, capb.NewIstioCertificateServiceClient(next)
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

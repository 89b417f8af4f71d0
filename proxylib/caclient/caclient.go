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
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
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
type Client struct {
	cfg  Config
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
	conn, err := grpc.NewClient(cfg.Address,
		grpc.WithTransportCredentials(credentials.NewTLS(cfg.TLS)),
		grpc.WithPerRPCCredentials(bearer{cfg.Token}))
	if err != nil {
		return nil, fmt.Errorf("caclient: %w", err)
	}
	return &Client{cfg: cfg, conn: conn, ca: capb.NewIstioCertificateServiceClient(conn)}, nil
}

// Close releases the connection.
func (c *Client) Close() error { return c.conn.Close() }

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
	resp, err := c.ca.CreateCertificate(ctx, &capb.IstioCertificateRequest{
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

package main

import (
	"context"
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

// grpcCA is a minimal identity.CAClient over Istio's CreateCertificate, used
// until proxylib/caclient provides the shared one.
type grpcCA struct {
	client capb.IstioCertificateServiceClient
}

type bearer struct{ token func() (string, error) }

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	t, err := b.token()
	if err != nil {
		return nil, err
	}
	return map[string]string{"authorization": "Bearer " + t}, nil
}
func (bearer) RequireTransportSecurity() bool { return true }

func newCAClient(addr string, tlsConf *tls.Config, token func() (string, error)) (*grpcCA, error) {
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(tlsConf)), grpc.WithPerRPCCredentials(bearer{token}))
	if err != nil {
		return nil, fmt.Errorf("CA client: %w", err)
	}
	return &grpcCA{client: capb.NewIstioCertificateServiceClient(cc)}, nil
}

func (c *grpcCA) Sign(ctx context.Context, csrPEM []byte, id identity.Identity, ttl time.Duration) ([]*x509.Certificate, error) {
	md, err := structpb.NewStruct(map[string]any{"ImpersonatedIdentity": id.String()})
	if err != nil {
		return nil, err
	}
	resp, err := c.client.CreateCertificate(ctx, &capb.IstioCertificateRequest{Csr: string(csrPEM), ValidityDuration: int64(ttl / time.Second), Metadata: md})
	if err != nil {
		return nil, err
	}
	var chain []*x509.Certificate
	for _, p := range resp.GetCertChain() {
		rest := []byte(p)
		for {
			var b *pem.Block
			b, rest = pem.Decode(rest)
			if b == nil {
				break
			}
			cert, err := x509.ParseCertificate(b.Bytes)
			if err != nil {
				return nil, err
			}
			chain = append(chain, cert)
		}
	}
	if len(chain) == 0 {
		return nil, errors.New("CA returned no certificate")
	}
	return chain, nil
}

package controlplane

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/ambientmesh/ambient/proxylib/ca"
	"github.com/ambientmesh/ambient/proxylib/caclient"
	xds "github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/identity"
)

// Every replica signs, the leader alone writes the CA Secret: a replica
// that did not write it (this control plane never does) must sign with the
// CA the Secret holds now, learnt from a watch, not at its next periodic
// reload (an hour in this suite; it was a minute, the window in which a
// follower handed out certificates of a replaced root).
func TestCAFollowsSecretChange(t *testing.T) {
	ctx := context.Background()
	zt := ztunnel(t, "zt-ha", "node-a", "10.200.0.9")
	ensureNamespace(t, "ha-app", map[string]string{ambientLabel: "ambient"})
	createPod(t, podSpec{ns: "ha-app", name: "web", node: "node-a", sa: "web", ip: "10.9.0.1"})
	tok := token(t, zt, xds.TokenAudience)

	key := client.ObjectKey{Namespace: meshNS, Name: "ambient-ca"}
	orig := &corev1.Secret{}
	if err := s.k8s.Get(ctx, key, orig); err != nil {
		t.Fatal(err)
	}
	rootCert, rootKey, err := ca.NewSelfSignedRoot("cluster.local", 24*time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	inter, err := ca.NewIntermediate(&ca.Authority{Cert: rootCert, Key: rootKey, Roots: []*x509.Certificate{rootCert}}, "cluster.local", 12*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	keyPEM, err := ca.EncodeKey(inter.Key)
	if err != nil {
		t.Fatal(err)
	}
	both := s.roots.Clone()
	both.AddCert(rootCert)
	newRoot := x509.NewCertPool()
	newRoot.AddCert(rootCert)
	signsWith := func(roots *x509.CertPool) func() bool {
		return func() bool {
			c, err := caclient.New(caclient.Config{Address: s.caAddr, Token: func() (string, error) { return tok, nil },
				TLS: &tls.Config{RootCAs: both, ServerName: "ambient-controlplane." + meshNS + ".svc", MinVersion: tls.VersionTLS13}})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			chain, err := c.Sign(ctx, newCSR(t), identity.MustParse("spiffe://cluster.local/ns/ha-app/sa/web"), time.Hour)
			return err == nil && verifies(chain, roots) == nil
		}
	}

	eventually(t, "signing with the suite's CA", signsWith(s.roots))
	// The leader replaces the CA (as after deleting a broken ambient-ca).
	replaced := orig.DeepCopy()
	replaced.Data = map[string][]byte{"ca.crt": ca.EncodeCerts(inter.Cert), "ca.key": keyPEM, "root.crt": ca.EncodeCerts(rootCert)}
	if err := s.k8s.Update(ctx, replaced); err != nil {
		t.Fatal(err)
	}
	restore := func() {
		cur := &corev1.Secret{}
		if err := s.k8s.Get(ctx, key, cur); err != nil {
			t.Fatal(err)
		}
		cur.Data = orig.Data
		if err := s.k8s.Update(ctx, cur); err != nil {
			t.Fatal(err)
		}
	}
	defer func() {
		restore()
		eventually(t, "signing with the suite's CA again", signsWith(s.roots))
	}()
	eventually(t, "signing with the new CA", signsWith(newRoot))
}

func verifies(chain []*x509.Certificate, roots *x509.CertPool) error {
	if len(chain) == 0 {
		return fmt.Errorf("empty chain")
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	_, err := chain[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	return err
}

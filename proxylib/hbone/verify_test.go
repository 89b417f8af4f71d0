package hbone_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"math/big"
	"net/url"
	"testing"
	"time"

	"github.com/ambientmesh/ambient/proxylib/ca"
	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/identity"
)

func TestParseAuthority(t *testing.T) {
	tests := []struct {
		in   string
		want string // "" means rejected
	}{
		{"10.0.0.5:80", "10.0.0.5:80"},
		{"[fd00::1]:8080", "[fd00::1]:8080"},
		{"10.0.0.5", ""},
		{"10.0.0.5:0", ""},
		{"10.0.0.5:65536", ""},
		{"10.0.0.5:080", ""},
		{"10.0.0.5:+80", ""},
		{"fd00::1", ""},
		{"fd00::1:80", ""},
		{"[fd00::1%eth0]:80", ""},
		{"[FD00::1]:80", ""},
		{"example.com:80", ""},
		{"0.0.0.0:80", ""},
		{"224.0.0.1:80", ""},
		{"", ""},
		{":80", ""},
		{"10.0.0.5:80/x", ""},
		{"user@10.0.0.5:80", ""},
		{"010.0.0.5:80", ""},
	}
	for _, tt := range tests {
		got, err := hbone.ParseAuthority(tt.in)
		if tt.want == "" {
			if err == nil || !errors.Is(err, hbone.ErrBadAuthority) {
				t.Errorf("ParseAuthority(%q) = %v, %v; want ErrBadAuthority", tt.in, got, err)
			}
			continue
		}
		if err != nil || got.String() != tt.want {
			t.Errorf("ParseAuthority(%q) = %v, %v; want %s", tt.in, got, err, tt.want)
		}
	}
}

func FuzzParseAuthority(f *testing.F) {
	for _, s := range []string{"10.0.0.5:80", "[fd00::1]:8080", "a:1", "[::]:0", "1.2.3.4:65535"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ap, err := hbone.ParseAuthority(s)
		if err != nil {
			return
		}
		if ap.String() != s || ap.Port() == 0 {
			t.Fatalf("accepted %q as %v", s, ap)
		}
	})
}

func TestVerifyPeer(t *testing.T) {
	const td = "cluster.local"
	mesh := newTestCA(t, td)
	other := newTestCA(t, td)
	good := identity.MustParse("spiffe://cluster.local/ns/a/sa/b")
	now := time.Now()
	tests := []struct {
		name  string
		chain [][]byte
		want  error
	}{
		{"valid", mesh.leaf(t, now, uris(good.String())), nil},
		{"no certificate", nil, hbone.ErrNoPeerCertificate},
		{"other CA", other.leaf(t, now, uris(good.String())), hbone.ErrUntrustedPeer},
		{"expired", mesh.leaf(t, now.Add(-48*time.Hour), uris(good.String())), hbone.ErrUntrustedPeer},
		{"not yet valid", mesh.leaf(t, now.Add(48*time.Hour), uris(good.String())), hbone.ErrUntrustedPeer},
		{"other trust domain", mesh.leaf(t, now, uris("spiffe://evil.local/ns/a/sa/b")), hbone.ErrWrongTrustDomain},
		{"no URI SAN", mesh.leaf(t, now, nil), hbone.ErrPeerIdentity},
		{"two URI SANs", mesh.leaf(t, now, uris(good.String(), "spiffe://cluster.local/ns/c/sa/d")), hbone.ErrPeerIdentity},
		{"malformed path", mesh.leaf(t, now, uris("spiffe://cluster.local/ns/a")), hbone.ErrPeerIdentity},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			id, err := hbone.VerifyPeer(tt.chain, mesh.pool, td, x509.ExtKeyUsageClientAuth)
			if tt.want == nil {
				if err != nil || id != good {
					t.Fatalf("VerifyPeer = %v, %v; want %v", id, err, good)
				}
				return
			}
			if !errors.Is(err, tt.want) {
				t.Fatalf("VerifyPeer error = %v, want %v", err, tt.want)
			}
		})
	}
}

func TestCheckExpected(t *testing.T) {
	a := identity.MustParse("spiffe://td/ns/a/sa/a")
	b := identity.MustParse("spiffe://td/ns/b/sa/b")
	if err := hbone.CheckExpected(a, []identity.Identity{b, a}); err != nil {
		t.Errorf("expected identity refused: %v", err)
	}
	if err := hbone.CheckExpected(a, []identity.Identity{b}); !errors.Is(err, hbone.ErrUnexpectedPeer) {
		t.Errorf("unexpected identity: err = %v", err)
	}
	if err := hbone.CheckExpected(a, nil); !errors.Is(err, hbone.ErrNoExpectedIdentity) {
		t.Errorf("empty expected list: err = %v", err)
	}
}

type testCA struct {
	auth *ca.Authority
	pool *x509.CertPool
}

func newTestCA(t *testing.T, td string) *testCA {
	t.Helper()
	root, key, err := ca.NewSelfSignedRoot(td, 24*time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	auth := &ca.Authority{Cert: root, Key: key, Roots: []*x509.Certificate{root}}
	return &testCA{auth: auth, pool: auth.RootPool()}
}

// leaf signs a workload-like certificate with arbitrary URI SANs, valid for
// an hour around notBefore, so malformed identities can be tested.
func (c *testCA) leaf(t *testing.T, notBefore time.Time, sans []*url.URL) [][]byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		NotBefore:    notBefore.Add(-time.Minute),
		NotAfter:     notBefore.Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:         sans,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.auth.Cert, key.Public(), c.auth.Key)
	if err != nil {
		t.Fatal(err)
	}
	return [][]byte{der}
}

func uris(ss ...string) []*url.URL {
	var out []*url.URL
	for _, s := range ss {
		u, err := url.Parse(s)
		if err != nil {
			panic(err)
		}
		out = append(out, u)
	}
	return out
}

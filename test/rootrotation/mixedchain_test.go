// Package rootrotation proves a mesh root rotation end to end on the data
// path: proxies in separate network namespaces (pods on two nodes) talk
// HBONE (HTTP/2 CONNECT over mutual TLS with SPIFFE identities) while their
// certificates come from the old or the new root's chain, through the real
// certificate store that re-issues when its trust bundle changes.
package rootrotation

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/ambientmesh/ambient/proxylib/ca"
	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/hbone/h2"
	"github.com/ambientmesh/ambient/proxylib/identity"
	"github.com/ambientmesh/ambient/test/netns"
)

const td = "rotation.test"

// chain is a root and the intermediate it signs workloads with.
type chain struct {
	root  *x509.Certificate
	inter *ca.Authority
}

func newChain(t *testing.T) chain {
	t.Helper()
	root, key, err := ca.NewSelfSignedRoot(td, 48*time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	inter, err := ca.NewIntermediate(&ca.Authority{Cert: root, Key: key, Roots: []*x509.Certificate{root}}, td, 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return chain{root: root, inter: inter}
}

// meshCA is the mesh CA as proxies see it: it signs with whichever chain
// the rotation currently signs from.
type meshCA struct {
	mu      sync.Mutex
	signing chain
}

func (m *meshCA) use(c chain) { m.mu.Lock(); m.signing = c; m.mu.Unlock() }

func (m *meshCA) Sign(_ context.Context, csr []byte, id identity.Identity, ttl time.Duration) ([]*x509.Certificate, error) {
	m.mu.Lock()
	c := m.signing
	m.mu.Unlock()
	leaf, err := c.inter.SignCSR(csr, id, ttl)
	if err != nil {
		return nil, err
	}
	return append(c.inter.ChainFor(leaf), c.root), nil
}

func pool(roots ...*x509.Certificate) *x509.CertPool {
	p := x509.NewCertPool()
	for _, r := range roots {
		p.AddCert(r)
	}
	return p
}

// peer is a pod's proxy: an HBONE server on <pod IP>:15008 inside the pod's
// network namespace that echoes what a tunnel carries, and a certificate
// source for dialing out of that namespace.
type peer struct {
	pod   *netns.Pod
	id    identity.Identity
	certs hbone.CertSource
	addr  netip.AddrPort
}

func startPeer(t *testing.T, pod *netns.Pod, id identity.Identity, certs hbone.CertSource) *peer {
	t.Helper()
	p := &peer{pod: pod, id: id, certs: certs, addr: netip.AddrPortFrom(pod.IP, 15008)}
	srv, err := h2.NewServer(h2.ServerConfig{Certs: certs, Identity: id, Handler: hbone.HandlerFunc(echo)})
	if err != nil {
		t.Fatal(err)
	}
	var ln net.Listener
	if err := pod.Run(func() (err error) { ln, err = net.Listen("tcp", p.addr.String()); return err }); err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close() })
	return p
}

// echo accepts every tunnel and sends its bytes back (the upstream app).
func echo(_ context.Context, _ *hbone.Request, resp hbone.Responder) {
	st, err := resp.Accept()
	if err != nil {
		return
	}
	defer st.Close()
	_, _ = io.Copy(st, st)
}

// call opens a fresh HBONE connection from `from`'s namespace to `to` and
// round-trips a message: every call is a new mutual TLS handshake.
func call(from, to *peer) error {
	d, err := h2.NewDialer(h2.DialerConfig{Certs: from.certs, HandshakeTimeout: 5 * time.Second,
		DialContext: func(ctx context.Context, network, addr string) (c net.Conn, err error) {
			err = from.pod.Run(func() error {
				c, err = (&net.Dialer{}).DialContext(ctx, network, addr)
				return err
			})
			return c, err
		}})
	if err != nil {
		return err
	}
	defer d.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := d.Dial(ctx, hbone.DialRequest{Source: from.id, Expected: []identity.Identity{to.id}, ProxyAddr: to.addr,
		Target: netip.AddrPortFrom(to.pod.IP, 8080)})
	if err != nil {
		return err
	}
	defer st.Close()
	msg := []byte(fmt.Sprintf("%s->%s", from.id.ServiceAccount, to.id.ServiceAccount))
	if _, err := st.Write(msg); err != nil {
		return err
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(st, got); err != nil {
		return err
	}
	if string(got) != string(msg) {
		return errors.New("echo mismatch")
	}
	return nil
}

// issuedBy waits until s holds a certificate for id issued by c's chain.
func issuedBy(t *testing.T, s *identity.Store, id identity.Identity, c chain) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		cert, err := s.Certificate(context.Background(), id)
		if err == nil && cert.Leaf.CheckSignatureFrom(c.inter.Cert) == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: no certificate from the expected chain (err %v)", id, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func newStore(t *testing.T, mca *meshCA, roots *x509.CertPool) *identity.Store {
	t.Helper()
	s, err := identity.NewStore(identity.StoreConfig{Client: mca, TrustDomain: td, Roots: roots, TTL: time.Hour, ReissueSpread: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

// TestMixedChainPeersDuringRootRotation follows the rotation's phases on
// two pods on different nodes: each phase's bundle change reaches the
// proxies' stores, which re-issue; while the bundle overlaps, an old-chain
// client and a new-chain server (and the reverse) verify each other; once
// the old root is removed, an old-chain peer is refused in both roles.
func TestMixedChainPeersDuringRootRotation(t *testing.T) {
	cl := netns.NewCluster(t)
	n1, n2 := cl.AddNode("rr-n1"), cl.AddNode("rr-n2")
	oldC, newC := newChain(t), newChain(t)
	mca := &meshCA{signing: oldC}

	storeA, storeB := newStore(t, mca, pool(oldC.root)), newStore(t, mca, pool(oldC.root))
	a := startPeer(t, n1.AddPod("rr-a"), identity.Identity{TrustDomain: td, Namespace: "app", ServiceAccount: "client"}, storeA)
	b := startPeer(t, n2.AddPod("rr-b"), identity.Identity{TrustDomain: td, Namespace: "app", ServiceAccount: "server"}, storeB)
	for _, s := range []struct {
		st *identity.Store
		id identity.Identity
	}{{storeA, a.id}, {storeB, b.id}} {
		issuedBy(t, s.st, s.id, oldC)
	}
	mustCall := func(phase string, from, to *peer) {
		t.Helper()
		if err := call(from, to); err != nil {
			t.Fatalf("%s: %s -> %s: %v", phase, from.id.ServiceAccount, to.id.ServiceAccount, err)
		}
	}
	mustCall("before", a, b)

	// Overlapping: both proxies get the bundle with both roots; the CA
	// still signs from the old chain.
	for _, st := range []*identity.Store{storeA, storeB} {
		before := attempts(st)
		st.SetRoots(pool(oldC.root, newC.root))
		waitAttempts(t, st, before+1) // re-issued (from the old chain) before the switch
	}

	// Reissuing: the CA signs from the new chain. B's bundle change has
	// arrived (it re-issues from the new chain), A's not yet: mixed chains.
	mca.use(newC)
	storeB.SetRoots(pool(newC.root, oldC.root))
	issuedBy(t, storeB, b.id, newC)
	if cert, _ := storeA.Certificate(context.Background(), a.id); cert.Leaf.CheckSignatureFrom(oldC.inter.Cert) != nil {
		t.Fatal("A was expected to still hold its old-chain certificate")
	}
	mustCall("old-chain client -> new-chain server", a, b)
	mustCall("new-chain client -> old-chain server", b, a)

	// A straggler that kept an old-chain certificate (a third pod) while
	// the overlap bundle is in force still works both ways.
	oldCert := staticCert(t, oldC, identity.Identity{TrustDomain: td, Namespace: "app", ServiceAccount: "straggler"})
	straggler := startPeer(t, n1.AddPod("rr-c"), oldCert.id, oldCert.source(pool(oldC.root, newC.root)))
	mustCall("old-chain straggler -> new-chain server", straggler, b)

	// A re-issues too; then the old root is removed from both bundles.
	storeA.SetRoots(pool(newC.root, oldC.root))
	issuedBy(t, storeA, a.id, newC)
	storeA.SetRoots(pool(newC.root))
	storeB.SetRoots(pool(newC.root))
	issuedBy(t, storeA, a.id, newC)
	mustCall("after removal", a, b)
	mustCall("after removal", b, a)
	if err := call(straggler, b); err == nil {
		t.Fatal("an old-chain client was accepted after the old root was removed")
	}
	if err := call(a, straggler); err == nil {
		t.Fatal("an old-chain server was accepted after the old root was removed")
	}
}

type static struct {
	id   identity.Identity
	cert *tls.Certificate
}

func staticCert(t *testing.T, c chain, id identity.Identity) static {
	t.Helper()
	key, err := ca.NewKey()
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := c.inter.SignPublicKey(key.Public(), id, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return static{id: id, cert: &tls.Certificate{Certificate: [][]byte{leaf.Raw, c.inter.Cert.Raw}, PrivateKey: key, Leaf: leaf}}
}

func (s static) source(roots *x509.CertPool) *identity.StaticSource {
	src := identity.NewStaticSource(td, roots)
	src.Set(s.id, s.cert)
	return src
}

func attempts(s *identity.Store) int {
	n := 0
	for _, st := range s.Status() {
		n += st.Attempts
	}
	return n
}

func waitAttempts(t *testing.T, s *identity.Store, n int) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for attempts(s) < n {
		if time.Now().After(deadline) {
			t.Fatalf("no re-issue after the bundle changed (%d signing attempts, want %d)", attempts(s), n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

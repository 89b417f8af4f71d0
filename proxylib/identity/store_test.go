package identity_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/ambientmesh/ambient/proxylib/hbone/hbonetest"
	"github.com/ambientmesh/ambient/proxylib/identity"
)

const (
	initialBackoff = time.Second
	maxBackoff     = time.Minute
)

type fixture struct {
	ca     *hbonetest.CA
	clock  *hbonetest.FakeClock
	client *hbonetest.CAClient
	store  *identity.Store
	id     identity.Identity
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	f := &fixture{ca: hbonetest.NewCA(t, "cluster.local"), clock: hbonetest.NewFakeClock(time.Now())}
	f.ca.SetClock(f.clock.Now)
	f.client = f.ca.Client()
	f.id = f.ca.ID("default", "sleep")
	store, err := identity.NewStore(identity.StoreConfig{
		Client: f.client, TrustDomain: "cluster.local", Roots: f.ca.Roots(), TTL: 24 * time.Hour,
		Clock: f.clock, InitialBackoff: initialBackoff, MaxBackoff: maxBackoff,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(store.Close)
	f.store = store
	return f
}

// eventually polls cond; it bounds the wait but asserts nothing about time.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// asleep waits until the rotation loop has made `calls` CA requests and is
// waiting on the fake clock again.
func (f *fixture) asleep(t *testing.T, calls int) {
	t.Helper()
	eventually(t, "rotation loop to sleep", func() bool { return f.client.Calls() == calls && f.clock.Waiters() == 1 })
}

// advanceToTimer moves the fake clock to the rotation loop's next wake-up
// and returns how far that was.
func (f *fixture) advanceToTimer(t *testing.T) time.Duration {
	t.Helper()
	at, ok := f.clock.NextDeadline()
	if !ok {
		t.Fatal("no timer pending")
	}
	d := at.Sub(f.clock.Now())
	f.clock.Advance(d)
	return d
}

func (f *fixture) cert(t *testing.T) *x509.Certificate {
	t.Helper()
	c, err := f.store.Certificate(context.Background(), f.id)
	if err != nil {
		t.Fatalf("Certificate: %v", err)
	}
	return c.Leaf
}

func TestStoreRotatesAtHalfLife(t *testing.T) {
	f := newFixture(t)
	first := f.cert(t)
	if got, _ := identity.FromCertificate(first); got != f.id {
		t.Fatalf("issued for %v, want %v", got, f.id)
	}
	f.asleep(t, 1)
	halfLife := first.NotBefore.Add(first.NotAfter.Sub(first.NotBefore) / 2)

	f.clock.Advance(halfLife.Sub(f.clock.Now()) - time.Minute)
	if got := f.cert(t); !got.Equal(first) || f.client.Calls() != 1 {
		t.Fatalf("rotated before half life (calls=%d)", f.client.Calls())
	}
	f.clock.Advance(time.Minute)
	f.asleep(t, 2)
	second := f.cert(t)
	if second.Equal(first) {
		t.Fatal("not rotated at half life")
	}
	if second.PublicKey.(*ecdsa.PublicKey).Equal(first.PublicKey) {
		t.Fatal("rotation reused the private key")
	}
}

func TestStoreCAOutageKeepsCertUntilExpiry(t *testing.T) {
	f := newFixture(t)
	cert := f.cert(t)
	f.asleep(t, 1)
	f.client.SetAvailable(false)

	// Half life passes with the CA down: retries back off exponentially
	// (with jitter) up to the cap, and the current certificate keeps serving.
	f.advanceToTimer(t)
	f.asleep(t, 2)
	var delays []time.Duration
	for calls := 3; calls <= 12; calls++ {
		delays = append(delays, f.advanceToTimer(t))
		f.asleep(t, calls)
		if got := f.cert(t); !got.Equal(cert) {
			t.Fatal("certificate changed while the CA was down")
		}
	}
	for i := 1; i < 5; i++ {
		if delays[i] <= delays[i-1] {
			t.Errorf("backoff not increasing: %v", delays)
		}
	}
	lo, hi := time.Duration(float64(initialBackoff)*0.8), time.Duration(float64(maxBackoff)*1.2)
	for _, d := range delays {
		if d < lo || d > hi {
			t.Errorf("backoff %v outside [%v, %v]: %v", d, lo, hi, delays)
		}
	}

	// Past expiry the old certificate is never handed out.
	f.clock.Advance(cert.NotAfter.Sub(f.clock.Now()))
	eventually(t, "loop to retry after expiry", func() bool { return f.clock.Waiters() == 1 })
	c, err := f.store.Certificate(context.Background(), f.id)
	if !errors.Is(err, identity.ErrNoCertificate) || c != nil {
		t.Fatalf("after expiry: got cert=%v err=%v, want ErrNoCertificate", c != nil, err)
	}
	if !errors.Is(err, hbonetest.ErrCAUnavailable) {
		t.Errorf("error does not name the CA failure: %v", err)
	}

	// The CA comes back: the next retry succeeds.
	f.client.SetAvailable(true)
	calls := f.client.Calls()
	f.advanceToTimer(t)
	f.asleep(t, calls+1)
	fresh := f.cert(t)
	if !f.clock.Now().Before(fresh.NotAfter) || fresh.Equal(cert) {
		t.Fatal("no fresh certificate after the CA recovered")
	}
}

func TestStoreDedupesConcurrentFetches(t *testing.T) {
	f := newFixture(t)
	var wg sync.WaitGroup
	certs := make([]*x509.Certificate, 32)
	for i := range certs {
		wg.Go(func() { certs[i] = f.cert(t) })
	}
	wg.Wait()
	if n := f.client.Calls(); n != 1 {
		t.Fatalf("%d concurrent requests made %d CA calls, want 1", len(certs), n)
	}
	for _, c := range certs[1:] {
		if !c.Equal(certs[0]) {
			t.Fatal("concurrent requests got different certificates")
		}
	}
}

func TestStoreFirstFetchFailure(t *testing.T) {
	f := newFixture(t)
	f.client.SetAvailable(false)
	if _, err := f.store.Certificate(context.Background(), f.id); !errors.Is(err, identity.ErrNoCertificate) {
		t.Fatalf("err = %v, want ErrNoCertificate", err)
	}
	f.asleep(t, 1)
	// While backing off, requests fail fast instead of hammering the CA.
	for range 5 {
		if _, err := f.store.Certificate(context.Background(), f.id); err == nil {
			t.Fatal("got a certificate from a CA that is down")
		}
	}
	if n := f.client.Calls(); n != 1 {
		t.Fatalf("requests during backoff made %d CA calls, want 1", n)
	}
}

func TestStoreRefusesOtherTrustDomain(t *testing.T) {
	f := newFixture(t)
	other := identity.MustParse("spiffe://evil.local/ns/default/sa/sleep")
	if _, err := f.store.Certificate(context.Background(), other); !errors.Is(err, identity.ErrNoCertificate) {
		t.Fatalf("err = %v, want ErrNoCertificate", err)
	}
	if f.client.Calls() != 0 {
		t.Fatal("asked the CA for a foreign identity")
	}
}

// signFunc adapts a function to identity.CAClient, for CAs that misbehave.
type signFunc func(ctx context.Context, csr []byte, id identity.Identity, ttl time.Duration) ([]*x509.Certificate, error)

func (f signFunc) Sign(ctx context.Context, csr []byte, id identity.Identity, ttl time.Duration) ([]*x509.Certificate, error) {
	return f(ctx, csr, id, ttl)
}

func TestStoreRejectsWrongIssuedCertificate(t *testing.T) {
	mesh := hbonetest.NewCA(t, "cluster.local")
	foreign := hbonetest.NewCA(t, "cluster.local")
	want := mesh.ID("default", "sleep")
	tests := []struct {
		name string
		sign signFunc
	}{
		{"other identity", func(ctx context.Context, csr []byte, _ identity.Identity, ttl time.Duration) ([]*x509.Certificate, error) {
			return mesh.Client().Sign(ctx, csr, mesh.ID("default", "admin"), ttl)
		}},
		{"other key", func(ctx context.Context, _ []byte, id identity.Identity, _ time.Duration) ([]*x509.Certificate, error) {
			c := mesh.Issue(t, id)
			return []*x509.Certificate{c.Leaf, mesh.Intermediate.Cert}, nil
		}},
		{"untrusted chain", foreign.Client().Sign},
		{"empty chain", func(context.Context, []byte, identity.Identity, time.Duration) ([]*x509.Certificate, error) {
			return nil, nil
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			store, err := identity.NewStore(identity.StoreConfig{Client: tt.sign, TrustDomain: "cluster.local", Roots: mesh.Roots()})
			if err != nil {
				t.Fatal(err)
			}
			defer store.Close()
			if _, err := store.Certificate(context.Background(), want); !errors.Is(err, identity.ErrBadIssued) {
				t.Fatalf("err = %v, want ErrBadIssued", err)
			}
		})
	}
}

func TestStaticSource(t *testing.T) {
	mesh := hbonetest.NewCA(t, "cluster.local")
	id := mesh.ID("a", "b")
	src := mesh.Source(t, id)
	c, err := src.Certificate(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := identity.FromCertificate(c.Leaf); got != id {
		t.Fatalf("static cert for %v, want %v", got, id)
	}
	if _, err := src.Certificate(context.Background(), mesh.ID("a", "c")); !errors.Is(err, identity.ErrNoCertificate) {
		t.Fatalf("unknown identity: err = %v", err)
	}
	if src.TrustDomain() != "cluster.local" || src.Roots() == nil {
		t.Fatal("trust domain or roots missing")
	}
}

func TestStorePrefetchForgetStatus(t *testing.T) {
	f := newFixture(t)
	if err := f.store.Prefetch(f.id); err != nil {
		t.Fatal(err)
	}
	f.asleep(t, 1)
	st := f.store.Status()
	if len(st) != 1 || st[0].Identity != f.id || st[0].Serial == "" || st[0].Attempts != 1 || st[0].LastError != "" {
		t.Fatalf("Status = %+v", st)
	}
	f.store.Forget(f.id)
	eventually(t, "rotation loop to stop", func() bool { return f.clock.Waiters() == 0 || len(f.store.Status()) == 0 })
	if len(f.store.Status()) != 0 {
		t.Fatal("forgotten identity still listed")
	}
	// Forgotten means no more rotation: advancing past half life asks nothing.
	f.clock.Advance(13 * time.Hour)
	if f.client.Calls() != 1 {
		t.Fatalf("CA called %d times after Forget, want 1", f.client.Calls())
	}
	f.store.Close()
	if _, err := f.store.Certificate(context.Background(), f.id); !errors.Is(err, identity.ErrStoreClosed) {
		t.Fatalf("after Close: err = %v, want ErrStoreClosed", err)
	}
}

// TestStoreReissuesOnBundleChange: a changed trust bundle (a root rotation
// switching the CA's chain) re-issues the certificate within the spread,
// not at half life; the old certificate serves until then.
func TestStoreReissuesOnBundleChange(t *testing.T) {
	f := newFixture(t)
	first := f.cert(t)
	f.asleep(t, 1)
	other := hbonetest.NewCA(t, "cluster.local")
	pool := f.ca.Roots()
	pool.AddCert(other.Root)
	f.store.SetRoots(pool)
	// The loop now waits for the spread (a new timer; the abandoned
	// half-life timer stays registered with the fake clock), not half life.
	eventually(t, "re-issue timer", func() bool {
		at, ok := f.clock.NextDeadline()
		return ok && f.clock.Waiters() == 2 && at.Sub(f.clock.Now()) <= 5*time.Second
	})
	if got := f.cert(t); !got.Equal(first) {
		t.Fatal("certificate replaced before the re-issue")
	}
	if d := f.advanceToTimer(t); d > 5*time.Second {
		t.Fatalf("re-issue waited %s, want at most the 5s spread", d)
	}
	eventually(t, "the re-issued certificate", func() bool { return !f.cert(t).Equal(first) })
	if c := f.client.Calls(); c != 2 {
		t.Fatalf("CA calls = %d, want 2", c)
	}
}

// TestStoreWaitsForRetryUntilDeadline: with no certificate and the CA
// down, a request that can wait (its ctx has a deadline: a handshake, a
// connect) is answered by the first retry that succeeds instead of failing
// with the last error; when its deadline comes first it fails and names
// the CA's error.
func TestStoreWaitsForRetryUntilDeadline(t *testing.T) {
	f := newFixture(t)
	f.client.SetAvailable(false)
	if _, err := f.store.Certificate(context.Background(), f.id); !errors.Is(err, identity.ErrNoCertificate) {
		t.Fatalf("first fetch with the CA down: err = %v, want ErrNoCertificate", err)
	}
	f.asleep(t, 1)

	short, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := f.store.Certificate(short, f.id); !errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, hbonetest.ErrCAUnavailable) {
		t.Fatalf("deadline passed during the outage: err = %v, want the deadline and the CA error", err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	type result struct {
		c   *x509.Certificate
		err error
	}
	got := make(chan result, 1)
	go func() {
		c, err := f.store.Certificate(ctx, f.id)
		if err != nil {
			got <- result{err: err}
			return
		}
		got <- result{c: c.Leaf}
	}()
	f.advanceToTimer(t) // a retry while the CA is still down: keep waiting
	f.asleep(t, 2)
	f.client.SetAvailable(true)
	f.advanceToTimer(t)
	r := <-got
	if r.err != nil || r.c == nil {
		t.Fatalf("waiting request: %v, want the certificate of the retry that succeeded", r.err)
	}
	if n := f.client.Calls(); n != 3 {
		t.Errorf("%d CA calls, want 3 (first, failed retry, successful retry): waiting must not call the CA itself", n)
	}
}

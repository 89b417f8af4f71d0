package identity

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"net/url"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
)

// CAClient asks the mesh CA to sign a certificate for id. The gRPC
// implementation (Istio's CreateCertificate shape) is in proxylib/caclient.
type CAClient interface {
	// Sign sends a PEM CSR and returns the issued chain, leaf first, up to
	// (optionally including) the root.
	Sign(ctx context.Context, csrPEM []byte, id Identity, ttl time.Duration) ([]*x509.Certificate, error)
}

// Errors returned by Store; callers match them with errors.Is.
var (
	ErrNoCertificate = errors.New("no valid certificate for identity")
	ErrStoreClosed   = errors.New("certificate store closed")
	ErrBadIssued     = errors.New("CA returned an unusable certificate")
)

// StoreConfig configures a Store. Client and TrustDomain are required.
type StoreConfig struct {
	Client      CAClient
	TrustDomain string
	// Roots is the trust bundle peers are verified with, and issued
	// certificates are checked against. Replace it later with SetRoots.
	Roots *x509.CertPool
	// TTL is the requested certificate lifetime; 0 asks for the CA's own
	// (the mesh's workloadCertTTL), so changing it needs no proxy restart.
	TTL time.Duration
	// Clock defaults to the wall clock.
	Clock Clock
	// InitialBackoff and MaxBackoff bound the retry delay after a failed
	// signing attempt (defaults 1s and 2m); each delay is jittered by ±20%.
	InitialBackoff, MaxBackoff time.Duration
	// RequestTimeout bounds one signing attempt (default 30s).
	RequestTimeout time.Duration
	// ReissueSpread bounds the random delay before certificates are
	// re-issued after a trust bundle change (default 5s), so the proxies
	// of a cluster do not all call the CA at once.
	ReissueSpread time.Duration
	Log           logr.Logger
}

// Store is a certificate store keyed by identity: the first request for an
// identity fetches its certificate through the CA client with a freshly
// generated key, and a goroutine per identity then rotates it at half life.
// While the CA is unreachable it keeps serving the current certificate,
// retrying with exponential backoff and jitter, but it never hands out an
// expired one. Concurrent requests share one signing attempt.
// Store satisfies hbone.CertSource.
type Store struct {
	cfg   StoreConfig
	roots atomic.Pointer[x509.CertPool]

	mu      sync.Mutex
	entries map[Identity]*entry
	closed  bool
}

// entry is one identity's certificate and its rotation loop.
type entry struct {
	id   Identity
	stop chan struct{}
	// reissue wakes the rotation loop early (buffered: one pending is enough).
	reissue chan struct{}

	mu       sync.Mutex
	cert     *tls.Certificate
	lastErr  error
	attempts int           // signing attempts made (for status)
	running  bool          // a signing attempt is in flight
	next     chan struct{} // closed when the next attempt (the running one, if any) finishes
}

// NewStore validates cfg and returns a store. Close it to stop rotation.
func NewStore(cfg StoreConfig) (*Store, error) {
	if cfg.Client == nil {
		return nil, errors.New("identity store: CA client is required")
	}
	if !validTrustDomain(cfg.TrustDomain) {
		return nil, fmt.Errorf("identity store: %w: %q", ErrBadTrustDomain, cfg.TrustDomain)
	}
	if cfg.TTL < 0 {
		return nil, fmt.Errorf("identity store: negative certificate TTL %s", cfg.TTL)
	}
	if cfg.Clock == nil {
		cfg.Clock = RealClock{}
	}
	if cfg.InitialBackoff <= 0 {
		cfg.InitialBackoff = time.Second
	}
	if cfg.MaxBackoff < cfg.InitialBackoff {
		cfg.MaxBackoff = max(2*time.Minute, cfg.InitialBackoff)
	}
	if cfg.RequestTimeout <= 0 {
		cfg.RequestTimeout = 30 * time.Second
	}
	if cfg.ReissueSpread <= 0 {
		cfg.ReissueSpread = 5 * time.Second
	}
	s := &Store{cfg: cfg, entries: map[Identity]*entry{}}
	s.roots.Store(cfg.Roots)
	return s, nil
}

// Roots returns the current trust bundle.
func (s *Store) Roots() *x509.CertPool { return s.roots.Load() }

// SetRoots replaces the trust bundle (the root ConfigMap changed) and
// re-issues every certificate within ReissueSpread: a changed bundle is
// how a root rotation tells proxies that the CA signs from a new chain
// (docs/operations.md), so no certificate of the old chain outlives the
// switch by more than the spread plus the CA round trip. The current
// certificates keep serving until their replacements arrive.
func (s *Store) SetRoots(pool *x509.CertPool) {
	if old := s.roots.Swap(pool); old == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, e := range s.entries {
		select {
		case e.reissue <- struct{}{}:
		default:
		}
	}
}

// TrustDomain returns the local trust domain.
func (s *Store) TrustDomain() string { return s.cfg.TrustDomain }

// Certificate returns a valid certificate for id. The first call for an
// identity waits for its first signing attempt; later calls return the
// cached certificate or wait for an attempt already in flight. With no
// unexpired certificate, a ctx with a deadline (a handshake, a connect)
// also waits for the retries after that, until one succeeds or ctx ends:
// a connection arriving during a short CA outage (a control-plane
// failover) is delayed, not refused. Without a deadline it fails fast
// with the last CA error.
func (s *Store) Certificate(ctx context.Context, id Identity) (*tls.Certificate, error) {
	if id.TrustDomain != s.cfg.TrustDomain {
		return nil, fmt.Errorf("%w: %s is not in trust domain %q", ErrNoCertificate, id, s.cfg.TrustDomain)
	}
	e, err := s.entry(id)
	if err != nil {
		return nil, err
	}
	_, canWait := ctx.Deadline()
	for waited := false; ; waited = true {
		e.mu.Lock()
		if c := e.valid(s.cfg.Clock.Now()); c != nil {
			e.mu.Unlock()
			return c, nil
		}
		next, running, lastErr := e.next, e.running, e.lastErr
		e.mu.Unlock()
		// Without a deadline: only the attempt already running, once.
		if !canWait && (waited || !running) {
			if lastErr != nil {
				return nil, fmt.Errorf("%w: %s: %w", ErrNoCertificate, id, lastErr)
			}
			return nil, fmt.Errorf("%w: %s: expired, renewal pending", ErrNoCertificate, id)
		}
		select {
		case <-next:
		case <-e.stop: // forgotten (the workload left) or the store closed
			return nil, fmt.Errorf("%w: %s: no longer managed", ErrNoCertificate, id)
		case <-ctx.Done():
			if lastErr != nil {
				return nil, fmt.Errorf("%w: %s: %w (last CA error: %w)", ErrNoCertificate, id, ctx.Err(), lastErr)
			}
			return nil, fmt.Errorf("%w: %s: %w", ErrNoCertificate, id, ctx.Err())
		}
	}
}

// Prefetch starts fetching and rotating id's certificate without waiting.
func (s *Store) Prefetch(id Identity) error {
	if id.TrustDomain != s.cfg.TrustDomain {
		return fmt.Errorf("%w: %s is not in trust domain %q", ErrNoCertificate, id, s.cfg.TrustDomain)
	}
	_, err := s.entry(id)
	return err
}

// Forget stops rotating id and drops its certificate (the workload left).
func (s *Store) Forget(id Identity) {
	s.mu.Lock()
	e := s.entries[id]
	delete(s.entries, id)
	s.mu.Unlock()
	if e != nil {
		close(e.stop)
	}
}

// Close stops every rotation loop; later requests fail with ErrStoreClosed.
func (s *Store) Close() {
	s.mu.Lock()
	entries := s.entries
	s.entries = map[Identity]*entry{}
	s.closed = true
	s.mu.Unlock()
	for _, e := range entries {
		close(e.stop)
	}
}

// CertificateStatus describes one managed identity, for admin endpoints.
type CertificateStatus struct {
	Identity  Identity
	Serial    string
	NotBefore time.Time
	NotAfter  time.Time
	Attempts  int
	LastError string
}

// Status lists the managed identities in a stable order.
func (s *Store) Status() []CertificateStatus {
	s.mu.Lock()
	entries := make([]*entry, 0, len(s.entries))
	for _, e := range s.entries {
		entries = append(entries, e)
	}
	s.mu.Unlock()
	out := make([]CertificateStatus, 0, len(entries))
	for _, e := range entries {
		e.mu.Lock()
		st := CertificateStatus{Identity: e.id, Attempts: e.attempts}
		if e.cert != nil {
			st.Serial = e.cert.Leaf.SerialNumber.Text(16)
			st.NotBefore, st.NotAfter = e.cert.Leaf.NotBefore, e.cert.Leaf.NotAfter
		}
		if e.lastErr != nil {
			st.LastError = e.lastErr.Error()
		}
		e.mu.Unlock()
		out = append(out, st)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Identity.String() < out[j].Identity.String() })
	return out
}

// entry returns id's entry, creating it and starting its rotation loop.
func (s *Store) entry(id Identity) (*entry, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, ErrStoreClosed
	}
	if e, ok := s.entries[id]; ok {
		return e, nil
	}
	e := &entry{id: id, stop: make(chan struct{}), reissue: make(chan struct{}, 1), running: true, next: make(chan struct{})}
	s.entries[id] = e
	go s.rotate(e)
	return e, nil
}

// valid returns the current certificate unless it has expired. e.mu held.
func (e *entry) valid(now time.Time) *tls.Certificate {
	if e.cert == nil || !now.Before(e.cert.Leaf.NotAfter) {
		return nil
	}
	return e.cert
}

// rotate fetches id's certificate, then sleeps until its half life (or the
// backoff after a failure) and fetches again, until stopped.
func (s *Store) rotate(e *entry) {
	log := s.cfg.Log.WithValues("identity", e.id.String())
	failures := 0
	for {
		err := s.attempt(e)
		var wait time.Duration
		if err == nil {
			failures = 0
			e.mu.Lock()
			leaf := e.cert.Leaf
			e.mu.Unlock()
			wait = leaf.NotBefore.Add(leaf.NotAfter.Sub(leaf.NotBefore) / 2).Sub(s.cfg.Clock.Now())
			wait = max(wait, s.cfg.InitialBackoff) // a CA handing out tiny lifetimes must not cause a hot loop
			log.V(1).Info("certificate issued", "serial", leaf.SerialNumber.Text(16), "notAfter", leaf.NotAfter, "rotateIn", wait)
		} else {
			failures++
			wait = s.backoff(failures)
			log.Error(err, "certificate signing failed; keeping the current certificate until it expires", "attempt", failures, "retryIn", wait)
		}
		select {
		case <-s.cfg.Clock.After(wait):
		case <-e.reissue:
			log.Info("trust bundle changed; re-issuing the certificate")
			select {
			case <-s.cfg.Clock.After(time.Duration(mrand.Int64N(int64(s.cfg.ReissueSpread)))):
			case <-e.stop:
				return
			}
		case <-e.stop:
			return
		}
		select { // both may be ready; stopping wins
		case <-e.stop:
			return
		default:
		}
		e.mu.Lock()
		e.running = true
		e.mu.Unlock()
	}
}

// attempt runs one signing attempt and publishes its outcome, waking
// requests that wait for it.
func (s *Store) attempt(e *entry) error {
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.RequestTimeout)
	go func() {
		select {
		case <-e.stop:
			cancel()
		case <-ctx.Done():
		}
	}()
	cert, err := s.sign(ctx, e.id)
	cancel()
	e.mu.Lock()
	defer e.mu.Unlock()
	e.attempts++
	if err == nil {
		e.cert, e.lastErr = cert, nil
	} else {
		e.lastErr = err
	}
	e.running = false
	close(e.next)
	e.next = make(chan struct{})
	return err
}

// sign generates a key, has the CA sign it, and checks what came back: the
// leaf must carry our key and exactly our identity, and chain to the roots.
func (s *Store) sign(ctx context.Context, id Identity) (*tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	csr, err := NewCSR(key, id)
	if err != nil {
		return nil, err
	}
	chain, err := s.cfg.Client.Sign(ctx, csr, id, s.cfg.TTL)
	if err != nil {
		return nil, err
	}
	if len(chain) == 0 {
		return nil, fmt.Errorf("%w: empty chain", ErrBadIssued)
	}
	leaf := chain[0]
	if pub, ok := leaf.PublicKey.(*ecdsa.PublicKey); !ok || !pub.Equal(key.Public()) {
		return nil, fmt.Errorf("%w: leaf does not carry the requested key", ErrBadIssued)
	}
	got, err := FromCertificate(leaf)
	if err != nil || got != id {
		return nil, fmt.Errorf("%w: leaf identity %v (%v), want %s", ErrBadIssued, got, err, id)
	}
	now := s.cfg.Clock.Now()
	if !now.Before(leaf.NotAfter) {
		return nil, fmt.Errorf("%w: already expired at %s", ErrBadIssued, leaf.NotAfter)
	}
	var der [][]byte
	inter := x509.NewCertPool()
	for i, c := range chain {
		if i > 0 && c.CheckSignatureFrom(c) == nil {
			continue // peers have the root; do not send it
		}
		der = append(der, c.Raw)
		if i > 0 {
			inter.AddCert(c)
		}
	}
	if roots := s.Roots(); roots != nil {
		opts := x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}
		if _, err := leaf.Verify(opts); err != nil {
			return nil, fmt.Errorf("%w: does not chain to the trust bundle: %v", ErrBadIssued, err)
		}
	}
	return &tls.Certificate{Certificate: der, PrivateKey: key, Leaf: leaf}, nil
}

// backoff is the delay before retry n (n ≥ 1): exponential, capped, ±20% jitter.
func (s *Store) backoff(n int) time.Duration {
	d := s.cfg.InitialBackoff
	for i := 1; i < n && d < s.cfg.MaxBackoff; i++ {
		d *= 2
	}
	d = min(d, s.cfg.MaxBackoff)
	jitter := (mrand.Float64()*0.4 - 0.2) * float64(d)
	return d + time.Duration(jitter)
}

// NewCSR returns a PEM certificate signing request for id's SPIFFE URI.
func NewCSR(key crypto.Signer, id Identity) ([]byte, error) {
	uri, err := url.Parse(id.String())
	if err != nil {
		return nil, err
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{uri}}, key)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), nil
}

// Package fallback selects the HBONE transport per mesh or per dial: HTTP/3
// first when asked for, and HTTP/2 when the peer does not answer over QUIC,
// remembering such peers for a while so later dials do not wait again.
package fallback

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/quic-go/quic-go"

	"github.com/ambientmesh/ambient/proxylib/hbone"
)

// Defaults for zero Config fields.
const (
	DefaultH3Timeout = time.Second
	DefaultRemember  = 5 * time.Minute
)

// Reasons a dial went over HTTP/2 although HTTP/3 was asked for; the label of
// hbone_transport_fallback_total.
const (
	ReasonNoQUICAnswer = "no_quic_answer" // HTTP/3 tried now, the peer stayed silent
	ReasonRemembered   = "remembered"     // the peer stayed silent recently; HTTP/3 skipped
)

// Config wires the two transports.
type Config struct {
	H2, H3 hbone.Dialer
	// Protocol is the mesh-wide choice: hbone.HTTP3 tries HTTP/3 first,
	// anything else dials HTTP/2 only.
	Protocol hbone.Protocol
	// H3Timeout bounds the HTTP/3 attempt (handshake and CONNECT) before
	// falling back; keep it short, a QUIC peer on the node network answers
	// in milliseconds.
	H3Timeout time.Duration
	// Remember is how long a peer that did not answer over QUIC is dialed
	// with HTTP/2 directly.
	Remember time.Duration
	Log      logr.Logger
	// Registerer receives hbone_transport_fallback_total; may be nil.
	Registerer prometheus.Registerer
	Now        func() time.Time // injectable clock; time.Now when nil
}

// Dialer implements hbone.Dialer over both transports.
type Dialer struct {
	cfg       Config
	fallbacks *prometheus.CounterVec

	mu     sync.Mutex
	silent map[netip.AddrPort]time.Time // peer -> until when HTTP/3 is skipped
}

var _ hbone.Dialer = (*Dialer)(nil)

// New validates cfg and registers the fallback counter.
func New(cfg Config) (*Dialer, error) {
	if cfg.H2 == nil || (cfg.Protocol == hbone.HTTP3 && cfg.H3 == nil) {
		return nil, errors.New("fallback: HTTP/2 dialer required, and an HTTP/3 dialer when Protocol is HTTP3")
	}
	if cfg.H3Timeout <= 0 {
		cfg.H3Timeout = DefaultH3Timeout
	}
	if cfg.Remember <= 0 {
		cfg.Remember = DefaultRemember
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	counter := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "hbone_transport_fallback_total",
		Help: "HBONE dials that used HTTP/2 although HTTP/3 was selected, by reason.",
	}, []string{"reason"})
	if cfg.Registerer != nil {
		if err := cfg.Registerer.Register(counter); err != nil {
			are, ok := errors.AsType[prometheus.AlreadyRegisteredError](err)
			if !ok {
				return nil, fmt.Errorf("fallback: registering metric: %w", err)
			}
			counter = are.ExistingCollector.(*prometheus.CounterVec)
		}
	}
	return &Dialer{cfg: cfg, fallbacks: counter, silent: map[netip.AddrPort]time.Time{}}, nil
}

// Dial uses the mesh-wide protocol.
func (d *Dialer) Dial(ctx context.Context, req hbone.DialRequest) (hbone.Stream, error) {
	return d.DialProtocol(ctx, d.cfg.Protocol, req)
}

// DialProtocol overrides the protocol for one dial.
func (d *Dialer) DialProtocol(ctx context.Context, proto hbone.Protocol, req hbone.DialRequest) (hbone.Stream, error) {
	if proto != hbone.HTTP3 || d.cfg.H3 == nil {
		return d.cfg.H2.Dial(ctx, req)
	}
	if d.recentlySilent(req.ProxyAddr) {
		d.fallbacks.WithLabelValues(ReasonRemembered).Inc()
		return d.cfg.H2.Dial(ctx, req)
	}
	attempt, cancel := context.WithTimeout(ctx, d.cfg.H3Timeout)
	s, err := d.cfg.H3.Dial(attempt, req)
	cancel()
	if err == nil || ctx.Err() != nil || !noQUICAnswer(err) {
		// Success, the caller gave up, or the peer answered over QUIC and
		// refused (TLS identity, CONNECT status): never retried over HTTP/2.
		return s, err
	}
	d.rememberSilent(req.ProxyAddr)
	d.fallbacks.WithLabelValues(ReasonNoQUICAnswer).Inc()
	d.cfg.Log.Info("HBONE peer did not answer over QUIC, falling back to HTTP/2",
		"proxy", req.ProxyAddr.String(), "target", req.Target.String(), "error", err.Error(),
		"http3_skipped_for", d.cfg.Remember.String())
	return d.cfg.H2.Dial(ctx, req)
}

// Close closes both transports.
func (d *Dialer) Close() error {
	var errs []error
	if d.cfg.H3 != nil {
		errs = append(errs, d.cfg.H3.Close())
	}
	errs = append(errs, d.cfg.H2.Close())
	return errors.Join(errs...)
}

// noQUICAnswer reports whether err means nothing answered over QUIC (as
// opposed to a peer that answered and refused).
func noQUICAnswer(err error) bool {
	if _, ok := errors.AsType[*quic.HandshakeTimeoutError](err); ok {
		return true
	}
	if _, ok := errors.AsType[*quic.IdleTimeoutError](err); ok {
		return true
	}
	return errors.Is(err, context.DeadlineExceeded)
}

func (d *Dialer) recentlySilent(peer netip.AddrPort) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	until, ok := d.silent[peer]
	if !ok {
		return false
	}
	if d.cfg.Now().After(until) {
		delete(d.silent, peer)
		return false
	}
	return true
}

func (d *Dialer) rememberSilent(peer netip.AddrPort) {
	d.mu.Lock()
	defer d.mu.Unlock()
	now := d.cfg.Now()
	for p, until := range d.silent { // bounded: expired entries go on every insert
		if now.After(until) {
			delete(d.silent, p)
		}
	}
	d.silent[peer] = now.Add(d.cfg.Remember)
}

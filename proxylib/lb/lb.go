// Package lb picks an endpoint of a service for each request: round robin or
// least request (power of two choices), with passive health checking that
// ejects an endpoint after consecutive 5xx responses or connect failures,
// as Envoy's outlier detection does. Endpoints are named by a string key
// (e.g. "10.0.0.5:8080"); health from discovery is applied by the caller,
// which passes only healthy candidates.
package lb

import (
	"math/rand/v2"
	"sync"
	"time"
)

// Policy selects the algorithm.
type Policy int

const (
	RoundRobin Policy = iota
	LeastRequest
)

// Outcome of one request to an endpoint.
type Outcome int

const (
	Success Outcome = iota
	ServerError
	ConnectFailure
)

// Outlier configures ejection. Zero values take the defaults.
type Outlier struct {
	// Consecutive failures (5xx or connect) that eject an endpoint. Default 5.
	Consecutive int
	// BaseEjection is multiplied by the number of times the endpoint has been
	// ejected. Default 30s; capped at MaxEjection (default 300s).
	BaseEjection time.Duration
	MaxEjection  time.Duration
	// MaxEjectionPercent of the pool may be ejected at once; at least one
	// endpoint may always be ejected (as Envoy does). Default 50.
	MaxEjectionPercent int
}

func (o Outlier) withDefaults() Outlier {
	if o.Consecutive <= 0 {
		o.Consecutive = 5
	}
	if o.BaseEjection <= 0 {
		o.BaseEjection = 30 * time.Second
	}
	if o.MaxEjection <= 0 {
		o.MaxEjection = 300 * time.Second
	}
	if o.MaxEjectionPercent <= 0 {
		o.MaxEjectionPercent = 50
	}
	return o
}

type endpoint struct {
	active       int
	consecutive  int
	ejections    int
	ejectedUntil time.Time
}

// Balancer balances one pool (one service). Safe for concurrent use.
type Balancer struct {
	policy  Policy
	outlier Outlier
	now     func() time.Time

	mu        sync.Mutex
	next      uint64
	endpoints map[string]*endpoint
	poolSize  int
}

// New returns a balancer. now may be nil (time.Now).
func New(p Policy, o Outlier, now func() time.Time) *Balancer {
	if now == nil {
		now = time.Now
	}
	return &Balancer{policy: p, outlier: o.withDefaults(), now: now, endpoints: map[string]*endpoint{}}
}

// Pick chooses among candidates, skipping ejected endpoints (unless every
// candidate is ejected: then all are used rather than failing). It returns
// the key and a done func that must be called with the outcome.
func (b *Balancer) Pick(candidates []string) (string, func(Outcome), bool) {
	return b.PickTiered([][]string{candidates})
}

// PickTiered is Pick over tiers of candidates, closest first (Tiers): it
// uses the first tier with an endpoint that is not ejected, so traffic
// stays close while a close endpoint is healthy and fails over to the next
// tier when every one of them is gone or ejected. When every candidate of
// every tier is ejected, the first tier is used rather than failing.
func (b *Balancer) PickTiered(tiers [][]string) (string, func(Outcome), bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.poolSize = 0
	for _, t := range tiers {
		b.poolSize += len(t)
	}
	now := b.now()
	var avail, first []string
	for _, candidates := range tiers {
		if len(candidates) == 0 {
			continue
		}
		if first == nil {
			first = candidates
		}
		for _, c := range candidates {
			if e := b.endpoints[c]; e == nil || !now.Before(e.ejectedUntil) {
				avail = append(avail, c)
			}
		}
		if len(avail) > 0 {
			break
		}
	}
	if first == nil {
		return "", nil, false
	}
	if len(avail) == 0 {
		avail = first
	}
	var key string
	switch b.policy {
	case LeastRequest:
		key = b.leastRequest(avail)
	default:
		key = avail[b.next%uint64(len(avail))]
		b.next++
	}
	e := b.get(key)
	e.active++
	var once sync.Once
	return key, func(o Outcome) { once.Do(func() { b.done(key, o) }) }, true
}

func (b *Balancer) get(key string) *endpoint {
	e := b.endpoints[key]
	if e == nil {
		e = &endpoint{}
		b.endpoints[key] = e
	}
	return e
}

// leastRequest is power of two choices: two random candidates, the one
// with fewer active requests wins.
func (b *Balancer) leastRequest(avail []string) string {
	if len(avail) == 1 {
		return avail[0]
	}
	i := rand.IntN(len(avail))
	j := rand.IntN(len(avail) - 1)
	if j >= i {
		j++
	}
	a, c := avail[i], avail[j]
	if b.get(c).active < b.get(a).active {
		return c
	}
	return a
}

func (b *Balancer) done(key string, o Outcome) {
	b.mu.Lock()
	defer b.mu.Unlock()
	e := b.get(key)
	e.active--
	if o == Success {
		e.consecutive = 0
		return
	}
	e.consecutive++
	if e.consecutive < b.outlier.Consecutive {
		return
	}
	now := b.now()
	if now.Before(e.ejectedUntil) || !b.mayEject(now) {
		return
	}
	e.consecutive = 0
	e.ejections++
	d := time.Duration(e.ejections) * b.outlier.BaseEjection
	if d > b.outlier.MaxEjection {
		d = b.outlier.MaxEjection
	}
	e.ejectedUntil = now.Add(d)
}

func (b *Balancer) mayEject(now time.Time) bool {
	ejected := 0
	for _, e := range b.endpoints {
		if now.Before(e.ejectedUntil) {
			ejected++
		}
	}
	limit := b.poolSize * b.outlier.MaxEjectionPercent / 100
	if limit < 1 {
		limit = 1
	}
	return ejected < limit
}

// Ejected reports whether key is currently ejected (for admin output/tests).
func (b *Balancer) Ejected(key string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	e := b.endpoints[key]
	return e != nil && b.now().Before(e.ejectedUntil)
}

// Forget drops state of endpoints not in keep (called when discovery
// changes the pool, so state does not grow without bound).
func (b *Balancer) Forget(keep map[string]bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for k, e := range b.endpoints {
		if !keep[k] && e.active == 0 {
			delete(b.endpoints, k)
		}
	}
}

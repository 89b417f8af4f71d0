// Package httpauth guards the operator's HTTP endpoints (metrics, the control
// plane's debug views) the way Kubernetes guards its own: the caller's bearer
// token is checked with a TokenReview, then the request with a
// SubjectAccessReview on its non-resource URL. Access is granted by ordinary
// RBAC, e.g. a ClusterRole with nonResourceURLs: ["/metrics"], verbs: [get].
package httpauth

import (
	"context"
	"crypto/sha256"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/go-logr/logr"
	authnv1 "k8s.io/api/authentication/v1"
	authzv1 "k8s.io/api/authorization/v1"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
)

// Defaults.
const (
	DefaultCacheTTL = 10 * time.Second
	maxCacheEntries = 4096
)

// Decision is the outcome for one request.
type Decision int

const (
	// Allowed: authenticated and authorized.
	Allowed Decision = iota
	// Unauthenticated: no token, or the API server rejected it (401).
	Unauthenticated
	// Forbidden: a valid user without RBAC for this URL and verb (403).
	Forbidden
)

// Authorizer decides requests with the API server. Safe for concurrent use.
type Authorizer struct {
	// Client creates TokenReviews and SubjectAccessReviews.
	Client client.Client
	// Audiences the token must be valid for; empty means the API server's own.
	Audiences []string
	// CacheTTL keeps decisions (not errors) this long; default 10s, so RBAC
	// changes take effect within it.
	CacheTTL time.Duration
	Log      logr.Logger

	now   func() time.Time
	mu    sync.Mutex
	cache map[cacheKey]cached
}

type cacheKey struct {
	token      [sha256.Size]byte
	verb, path string
}

type cached struct {
	decision Decision
	user     string
	expires  time.Time
}

// FilterProvider plugs the Authorizer into controller-runtime's metrics
// server (metricsserver.Options.FilterProvider).
func FilterProvider(cfg *rest.Config, hc *http.Client) (metricsserver.Filter, error) {
	c, err := client.New(cfg, client.Options{HTTPClient: hc})
	if err != nil {
		return nil, fmt.Errorf("metrics authorization client: %w", err)
	}
	return func(log logr.Logger, h http.Handler) (http.Handler, error) {
		a := &Authorizer{Client: c, Log: log}
		return a.Handler(h), nil
	}, nil
}

// Handler serves next only to authorized callers: 401 without a valid
// token, 403 without RBAC, 503 when the API server cannot be asked (never
// served unchecked).
func (a *Authorizer) Handler(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		token, ok := bearerToken(r)
		if !ok {
			http.Error(w, "Unauthorized: a bearer token is required", http.StatusUnauthorized)
			return
		}
		d, user, err := a.Authorize(r.Context(), token, verbOf(r.Method), r.URL.Path)
		switch {
		case err != nil:
			a.Log.Error(err, "cannot authorize request", "path", r.URL.Path)
			http.Error(w, "cannot verify the caller with the API server", http.StatusServiceUnavailable)
		case d == Unauthenticated:
			http.Error(w, "Unauthorized", http.StatusUnauthorized)
		case d == Forbidden:
			http.Error(w, fmt.Sprintf("Forbidden: user %q may not %s %s", user, verbOf(r.Method), r.URL.Path), http.StatusForbidden)
		default:
			next.ServeHTTP(w, r)
		}
	})
}

// Authorize decides whether token may perform verb on the non-resource path,
// and names the user it belongs to.
func (a *Authorizer) Authorize(ctx context.Context, token, verb, path string) (Decision, string, error) {
	key := cacheKey{token: sha256.Sum256([]byte(token)), verb: verb, path: path}
	if c, ok := a.lookup(key); ok {
		return c.decision, c.user, nil
	}
	d, user, err := a.review(ctx, token, verb, path)
	if err != nil {
		return Unauthenticated, "", err
	}
	a.store(key, cached{decision: d, user: user})
	return d, user, nil
}

func (a *Authorizer) review(ctx context.Context, token, verb, path string) (Decision, string, error) {
	tr := &authnv1.TokenReview{Spec: authnv1.TokenReviewSpec{Token: token, Audiences: a.Audiences}}
	if err := a.Client.Create(ctx, tr); err != nil {
		return Unauthenticated, "", fmt.Errorf("TokenReview: %w", err)
	}
	if !tr.Status.Authenticated {
		return Unauthenticated, "", nil
	}
	u := tr.Status.User
	sar := &authzv1.SubjectAccessReview{Spec: authzv1.SubjectAccessReviewSpec{
		User: u.Username, UID: u.UID, Groups: u.Groups, Extra: extra(u.Extra),
		NonResourceAttributes: &authzv1.NonResourceAttributes{Path: path, Verb: verb},
	}}
	if err := a.Client.Create(ctx, sar); err != nil {
		return Unauthenticated, "", fmt.Errorf("SubjectAccessReview: %w", err)
	}
	if !sar.Status.Allowed || sar.Status.Denied {
		return Forbidden, u.Username, nil
	}
	return Allowed, u.Username, nil
}

func extra(in map[string]authnv1.ExtraValue) map[string]authzv1.ExtraValue {
	if len(in) == 0 {
		return nil
	}
	out := make(map[string]authzv1.ExtraValue, len(in))
	for k, v := range in {
		out[k] = authzv1.ExtraValue(v)
	}
	return out
}

func (a *Authorizer) clock() time.Time {
	if a.now != nil {
		return a.now()
	}
	return time.Now()
}

func (a *Authorizer) lookup(k cacheKey) (cached, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	c, ok := a.cache[k]
	if !ok || !a.clock().Before(c.expires) {
		return cached{}, false
	}
	return c, true
}

func (a *Authorizer) store(k cacheKey, c cached) {
	ttl := a.CacheTTL
	if ttl <= 0 {
		ttl = DefaultCacheTTL
	}
	now := a.clock()
	c.expires = now.Add(ttl)
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cache == nil {
		a.cache = map[cacheKey]cached{}
	}
	if len(a.cache) >= maxCacheEntries {
		for key, e := range a.cache {
			if !now.Before(e.expires) {
				delete(a.cache, key)
			}
		}
		if len(a.cache) >= maxCacheEntries {
			clear(a.cache) // a flood of distinct tokens: start over rather than grow
		}
	}
	a.cache[k] = c
}

// bearerToken returns the token of "Authorization: Bearer <token>".
func bearerToken(r *http.Request) (string, bool) {
	scheme, token, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	token = strings.TrimSpace(token)
	if !ok || !strings.EqualFold(scheme, "Bearer") || token == "" {
		return "", false
	}
	return token, true
}

// verbOf is the verb the API server itself uses for a non-resource URL:
// the lower-cased HTTP method ("get" for GET).
func verbOf(method string) string { return strings.ToLower(method) }

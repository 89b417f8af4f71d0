// Package dashboard serves the live service graph of the mesh: a small web
// page (embedded assets, no CDN) that polls /api/graph, which this server
// rebuilds from the proxies' metrics every refresh interval, keeping the
// previous scrape for rates. Where the metrics come from is a Source:
// ambientctl reads the proxies through the API server, tests serve them
// over plain HTTP.
package dashboard

import (
	"context"
	"embed"
	"encoding/json"
	"io/fs"
	"log"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/ambientmesh/ambient/proxylib/meshgraph"
)

//go:embed static
var static embed.FS

// Source supplies the proxies' metrics and the policies that apply.
type Source interface {
	// Scrape reads every proxy once. Targets that fail are named in errs;
	// the snapshot holds the others.
	Scrape(ctx context.Context) (snap *meshgraph.Snapshot, errs []string)
	// Policies returns the mesh root namespace, the AuthorizationPolicies
	// and the destination workloads' labels (nil, nil when unknown).
	Policies(ctx context.Context) (root string, policies []meshgraph.Policy, workloads []meshgraph.Workload, err error)
	// PolicyYAML returns one AuthorizationPolicy as YAML.
	PolicyYAML(ctx context.Context, namespace, name string) ([]byte, error)
}

// Server rebuilds the graph periodically and serves the page and its API.
type Server struct {
	src      Source
	interval time.Duration

	mu    sync.Mutex
	prev  *meshgraph.Snapshot
	graph *meshgraph.Graph
}

// New returns a server polling src every interval.
func New(src Source, interval time.Duration) *Server {
	return &Server{src: src, interval: interval}
}

// Run polls until ctx ends.
func (s *Server) Run(ctx context.Context) {
	t := time.NewTicker(s.interval)
	defer t.Stop()
	for {
		s.Refresh(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Refresh scrapes once and rebuilds the graph.
func (s *Server) Refresh(ctx context.Context) {
	snap, errs := s.src.Scrape(ctx)
	s.mu.Lock()
	prev := s.prev
	s.mu.Unlock()
	g := meshgraph.Build(prev, snap)
	g.Errors = errs
	root, policies, workloads, err := s.src.Policies(ctx)
	if err != nil {
		g.Errors = append(g.Errors, "policies: "+err.Error())
	} else {
		g.LinkPolicies(root, policies, workloads)
	}
	s.mu.Lock()
	s.prev, s.graph = snap, g
	s.mu.Unlock()
}

// Handler serves the page (/), the graph (/api/graph) and policies
// (/policy/<namespace>/<name>).
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	sub, err := fs.Sub(static, "static")
	if err != nil {
		panic(err) // the embedded tree is fixed at build time
	}
	mux.Handle("GET /", http.FileServerFS(sub))
	mux.HandleFunc("GET /api/graph", s.serveGraph)
	mux.HandleFunc("GET /policy/{namespace}/{name}", s.servePolicy)
	return securityHeaders(mux)
}

func (s *Server) serveGraph(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	g := s.graph
	s.mu.Unlock()
	if g == nil {
		http.Error(w, "no scrape yet", http.StatusServiceUnavailable)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	if err := json.NewEncoder(w).Encode(g); err != nil {
		log.Printf("dashboard: writing graph: %v", err)
	}
}

func (s *Server) servePolicy(w http.ResponseWriter, r *http.Request) {
	ns, name := r.PathValue("namespace"), r.PathValue("name")
	body, err := s.src.PolicyYAML(r.Context(), ns, name)
	if err != nil {
		http.Error(w, "AuthorizationPolicy "+ns+"/"+name+": "+err.Error(), http.StatusNotFound)
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	_, _ = w.Write(body)
}

// securityHeaders keeps the page to its own assets (no CDN, no inline
// script) and refuses other sites' pages reading the graph: the server
// listens on localhost, where any page the user opens could reach it.
func securityHeaders(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if host := r.Host; !localHost(host) {
			http.Error(w, "dashboard answers localhost only (DNS rebinding guard)", http.StatusForbidden)
			return
		}
		w.Header().Set("Content-Security-Policy", "default-src 'self'; style-src 'self'; script-src 'self'; img-src 'self' data:")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		w.Header().Set("X-Frame-Options", "DENY")
		h.ServeHTTP(w, r)
	})
}

func localHost(hostport string) bool {
	host := hostport
	if i := strings.LastIndex(hostport, ":"); i >= 0 && !strings.HasSuffix(hostport, "]") {
		host = hostport[:i]
	}
	host = strings.Trim(host, "[]")
	return host == "localhost" || host == "127.0.0.1" || host == "::1"
}

package dashboard

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/ambientmesh/ambient/proxylib/meshgraph"
)

// URLTarget is a proxy whose /metrics is reachable directly.
type URLTarget struct {
	Target meshgraph.Target
	URL    string
}

// URLSource scrapes fixed metrics URLs (a port-forward, or a test's
// proxies); it knows no policies.
type URLSource struct {
	Targets []URLTarget
	Client  *http.Client
}

// Scrape reads every URL.
func (u *URLSource) Scrape(ctx context.Context) (*meshgraph.Snapshot, []string) {
	snap := &meshgraph.Snapshot{At: time.Now()}
	var errs []string
	for _, t := range u.Targets {
		sc, err := u.scrapeOne(ctx, t)
		if err != nil {
			errs = append(errs, err.Error())
			continue
		}
		snap.Scrapes = append(snap.Scrapes, sc)
	}
	return snap, errs
}

func (u *URLSource) scrapeOne(ctx context.Context, t URLTarget) (meshgraph.Scrape, error) {
	c := u.Client
	if c == nil {
		c = &http.Client{Timeout: 10 * time.Second}
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, t.URL, nil)
	if err != nil {
		return meshgraph.Scrape{}, err
	}
	resp, err := c.Do(req)
	if err != nil {
		return meshgraph.Scrape{}, fmt.Errorf("scraping %s: %w", t.URL, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return meshgraph.Scrape{}, fmt.Errorf("scraping %s: %s", t.URL, resp.Status)
	}
	return meshgraph.Parse(t.Target, io.LimitReader(resp.Body, 64<<20))
}

// Policies: none known.
func (u *URLSource) Policies(context.Context) (string, []meshgraph.Policy, []meshgraph.Workload, error) {
	return "", nil, nil, nil
}

// PolicyYAML: none known.
func (u *URLSource) PolicyYAML(context.Context, string, string) ([]byte, error) {
	return nil, errors.New("no cluster connection: policies are not available with --metrics-url")
}

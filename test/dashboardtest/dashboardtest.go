// Package dashboardtest runs the real `ambientctl dashboard` binary and reads
// the service graph it draws in a real headless Chromium: the netns test
// (test/waypoint) and the lab e2e test share it.
package dashboardtest

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/html"

	"github.com/ambientmesh/ambient/test/browser"
)

// Edge is one edge as the page drew it (the SVG <g class="edge ..."> element).
type Edge struct {
	Source, Target, Protocol string
	Via                      []string
	Class                    string // "ok", "err" or "denied", and "plaintext" when not mTLS
	MTLS                     bool
	Label                    string // the rate text drawn on the edge
	Title                    string // the tooltip: identities and policies
}

func (e Edge) String() string {
	return fmt.Sprintf("%s -> %s (%s, via %v, %s, mtls=%v) %q", e.Source, e.Target, e.Protocol, e.Via, e.Class, e.MTLS, e.Label)
}

// Row is one row of the table view.
type Row struct {
	Cells    []string
	Policies []string // hrefs of the policy links
}

// Page is what the page shows.
type Page struct {
	Loaded bool // the page's script rendered a graph (body[data-loaded])
	Status string
	Nodes  []string
	Edges  []Edge
	Rows   []Row
	Errors []string
}

// Find returns the edges from source to target.
func (p *Page) Find(source, target string) []Edge {
	var out []Edge
	for _, e := range p.Edges {
		if e.Source == source && e.Target == target {
			out = append(out, e)
		}
	}
	return out
}

// HTTPEdge returns the HTTP edge from source to target, nil when none.
func (p *Page) HTTPEdge(source, target string) *Edge {
	for _, e := range p.Find(source, target) {
		if e.Protocol == "http" {
			return &e
		}
	}
	return nil
}

// Parse reads the dashboard's DOM as Chromium serialized it.
func Parse(dom string) (*Page, error) {
	doc, err := html.Parse(strings.NewReader(dom))
	if err != nil {
		return nil, err
	}
	p := &Page{}
	var walk func(n *html.Node)
	walk = func(n *html.Node) {
		if n.Type == html.ElementNode {
			a := attrs(n)
			switch {
			case n.Data == "body":
				p.Loaded = a["data-loaded"] == "true"
			case a["id"] == "status":
				p.Status = text(n)
			case n.Data == "g" && a["data-node"] != "":
				p.Nodes = append(p.Nodes, a["data-node"])
			case n.Data == "g" && a["data-edge"] != "":
				e := Edge{Source: a["data-source"], Target: a["data-target"], Protocol: a["data-protocol"],
					Via: strings.Fields(a["data-via"]), Class: strings.TrimSpace(strings.TrimPrefix(a["class"], "edge")), MTLS: a["data-mtls"] == "true"}
				for c := n.FirstChild; c != nil; c = c.NextSibling {
					switch c.Data {
					case "text":
						e.Label = text(c)
					case "title":
						e.Title = text(c)
					}
				}
				p.Edges = append(p.Edges, e)
			case n.Data == "tr" && a["data-edge"] != "":
				var r Row
				for c := n.FirstChild; c != nil; c = c.NextSibling {
					if c.Data == "td" {
						r.Cells = append(r.Cells, text(c))
						for l := c.FirstChild; l != nil; l = l.NextSibling {
							if l.Data == "a" {
								r.Policies = append(r.Policies, attrs(l)["href"])
							}
						}
					}
				}
				p.Rows = append(p.Rows, r)
			case a["id"] == "errors":
				for c := n.FirstChild; c != nil; c = c.NextSibling {
					if c.Data == "li" {
						p.Errors = append(p.Errors, text(c))
					}
				}
			}
		}
		for c := n.FirstChild; c != nil; c = c.NextSibling {
			walk(c)
		}
	}
	walk(doc)
	return p, nil
}

func attrs(n *html.Node) map[string]string {
	m := map[string]string{}
	for _, a := range n.Attr {
		m[a.Key] = a.Val
	}
	return m
}

func text(n *html.Node) string {
	var b strings.Builder
	var walk func(*html.Node)
	walk = func(n *html.Node) {
		if n.Type == html.TextNode {
			b.WriteString(n.Data)
		}
		for c := n.FirstChild; c != nil; c = c.NextSibling {
			walk(c)
		}
	}
	walk(n)
	return strings.TrimSpace(b.String())
}

// BuildAmbientctl builds cmd/ambientctl from the repository at root.
func BuildAmbientctl(t testing.TB, root string) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "ambientctl")
	cmd := exec.Command("go", "build", "-o", bin, "./cmd/ambientctl")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building ambientctl: %v\n%s", err, out)
	}
	return bin
}

var urlLine = regexp.MustCompile(`http://\S+/`)

// Start runs `ambientctl dashboard --listen 127.0.0.1:0 args...` until the
// test ends and returns its URL (from its first line of output).
func Start(t testing.TB, bin string, args ...string) string {
	t.Helper()
	cmd := exec.Command(bin, append([]string{"dashboard", "--listen", "127.0.0.1:0"}, args...)...)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			t.Logf("ambientctl dashboard stderr:\n%s", stderr.String())
		}
	})
	lines := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		if sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
		_, _ = io.Copy(io.Discard, stdout)
	}()
	select {
	case l, ok := <-lines:
		u := urlLine.FindString(l)
		if !ok || u == "" {
			t.Fatalf("ambientctl dashboard printed %q, want its URL; stderr:\n%s", l, stderr.String())
		}
		return u
	case <-time.After(60 * time.Second):
		t.Fatalf("ambientctl dashboard printed no URL in 60s; stderr:\n%s", stderr.String())
	}
	return ""
}

// Load opens url in Chromium until the page has rendered a graph with at
// least one edge that ok accepts (the dashboard needs a scrape or two),
// polling up to timeout, and returns the last page seen.
func Load(t testing.TB, c *browser.Chromium, url string, timeout time.Duration, ok func(*Page) bool) *Page {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		dom, err := c.DOM(context.Background(), url, 8*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		p, err := Parse(dom)
		if err != nil {
			t.Fatal(err)
		}
		if p.Loaded && ok(p) {
			return p
		}
		if time.Now().After(deadline) {
			var edges []string
			for _, e := range p.Edges {
				edges = append(edges, e.String())
			}
			t.Fatalf("the dashboard at %s never showed the expected graph; loaded=%v status=%q errors=%v edges:\n%s",
				url, p.Loaded, p.Status, p.Errors, strings.Join(edges, "\n"))
		}
		time.Sleep(2 * time.Second)
	}
}

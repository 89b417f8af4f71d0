// Package meshgraph builds the service graph of the mesh from the proxies'
// own Prometheus metrics (Istio's standard istio_tcp_* from ztunnel,
// istio_requests_total from waypoints and ingress gateways): nodes are
// workloads (or services when no workload is known), edges carry request and
// connection rates, error and denied counts and the mTLS identities seen.
// Rates come from two scrapes of the same proxies, as Prometheus' rate() does.
package meshgraph

import (
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Metric names the graph reads.
const (
	metricRequests  = "istio_requests_total"
	metricTCPOpened = "istio_tcp_connections_opened_total"
	metricTCPSent   = "istio_tcp_sent_bytes_total"
	metricTCPRecv   = "istio_tcp_received_bytes_total"
)

// deniedFlags are the response_flags (proxyerr reasons) of traffic refused by
// policy or identity rules, as opposed to failures.
var deniedFlags = map[string]bool{
	"authorization_policy_rejection": true,
	"l7_policy_without_waypoint":     true,
	"plaintext_rejected":             true,
	"peer_identity_mismatch":         true,
	"no_peer_identity":               true,
	"waypoint_required":              true,
}

// Target is one scraped proxy.
type Target struct {
	Role      string // "ztunnel", "waypoint" or "gateway"
	Namespace string
	Pod       string
	Workload  string // the proxy's own workload name (waypoints: the deployment)
}

// Scrape is one target's metrics at one time.
type Scrape struct {
	Target   Target
	Families map[string]*dto.MetricFamily
}

// Parse reads the Prometheus text format of a proxy's /metrics.
func Parse(t Target, r io.Reader) (Scrape, error) {
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(r)
	if err != nil {
		return Scrape{}, fmt.Errorf("metrics of %s/%s: %w", t.Namespace, t.Pod, err)
	}
	return Scrape{Target: t, Families: fams}, nil
}

// Snapshot is every target's scrape at one moment.
type Snapshot struct {
	At      time.Time
	Scrapes []Scrape
}

// NodeKind says what a node stands for.
type NodeKind string

const (
	KindWorkload NodeKind = "workload"
	KindService  NodeKind = "service"  // destination known only as a service
	KindWaypoint NodeKind = "waypoint" // a scraped waypoint's workload
	KindGateway  NodeKind = "gateway"
	KindUnknown  NodeKind = "unknown" // plaintext or unknown peers
)

// Node is a workload or service of the graph.
type Node struct {
	ID        string   `json:"id"`
	Kind      NodeKind `json:"kind"`
	Namespace string   `json:"namespace"`
	Name      string   `json:"name"`
}

// Counts are cumulative counters of an edge (since the proxies started) or
// their per-second rate between two snapshots.
type Counts struct {
	Requests    float64 `json:"requests"`    // HTTP/gRPC requests (waypoint, gateway)
	Errors      float64 `json:"errors"`      // requests answered 5xx (or no response); failed connections
	Denied      float64 `json:"denied"`      // requests or connections refused by policy
	Connections float64 `json:"connections"` // TCP connections opened
	BytesSent   float64 `json:"bytesSent"`
	BytesRecv   float64 `json:"bytesReceived"`
}

func (c *Counts) add(o Counts) {
	c.Requests += o.Requests
	c.Errors += o.Errors
	c.Denied += o.Denied
	c.Connections += o.Connections
	c.BytesSent += o.BytesSent
	c.BytesRecv += o.BytesRecv
}

// PolicyRef names an AuthorizationPolicy that applies to an edge's destination.
type PolicyRef struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	Action    string `json:"action"`
}

// Edge is the traffic from one node to another over one protocol.
type Edge struct {
	ID       string `json:"id"`
	Source   string `json:"source"`
	Target   string `json:"target"`
	Protocol string `json:"protocol"` // "http", "grpc" or "tcp"
	// Via names the waypoints (namespace/workload) that reported the edge:
	// the L7 hop between source and target.
	Via []string `json:"via,omitempty"`
	// Service is the destination service (host) the client addressed.
	Service string `json:"service,omitempty"`
	// Principals are the source SPIFFE identities seen on the edge.
	Principals []string `json:"principals"`
	// MTLS is true when every connection of the edge was mutual TLS.
	MTLS        bool        `json:"mtls"`
	Total       Counts      `json:"total"`
	Rate        Counts      `json:"rate"` // per second over the last interval
	ErrorRatio  float64     `json:"errorRatio"`
	DeniedRatio float64     `json:"deniedRatio"`
	Policies    []PolicyRef `json:"policies,omitempty"`
	// ResponseCodes counts requests by code (cumulative).
	ResponseCodes map[string]float64 `json:"responseCodes,omitempty"`
	// destination details for policy matching
	dstNamespace, dstWorkload, dstServiceName string
}

// Graph is the service graph at one moment.
type Graph struct {
	At       time.Time `json:"at"`
	Interval float64   `json:"intervalSeconds"` // seconds the rates span (0: first snapshot, no rates yet)
	Nodes    []Node    `json:"nodes"`
	Edges    []Edge    `json:"edges"`
	Targets  []Target  `json:"targets"`
	Errors   []string  `json:"errors,omitempty"` // targets that could not be scraped
}

// Build computes the graph of cur, with rates against prev (nil for none).
func Build(prev, cur *Snapshot) *Graph {
	g := &Graph{At: cur.At}
	now := edgesOf(cur)
	var before map[string]*Edge
	if prev != nil && cur.At.After(prev.At) {
		before = edgesOf(prev)
		g.Interval = cur.At.Sub(prev.At).Seconds()
	}
	nodes := map[string]Node{}
	for _, s := range cur.Scrapes {
		g.Targets = append(g.Targets, s.Target)
	}
	waypoints := proxyWorkloads(cur)
	for id, e := range now {
		if p, ok := before[id]; ok && g.Interval > 0 {
			e.Rate = rate(p.Total, e.Total, g.Interval)
		} else if g.Interval > 0 {
			e.Rate = rate(Counts{}, e.Total, g.Interval)
		}
		e.ErrorRatio, e.DeniedRatio = ratios(e.Total)
		sort.Strings(e.Principals)
		sort.Strings(e.Via)
		g.Edges = append(g.Edges, *e)
	}
	for i := range g.Edges {
		for _, id := range []string{g.Edges[i].Source, g.Edges[i].Target} {
			if _, ok := nodes[id]; !ok {
				nodes[id] = nodeOf(id, waypoints)
			}
		}
	}
	for _, n := range nodes {
		g.Nodes = append(g.Nodes, n)
	}
	sort.Slice(g.Nodes, func(i, j int) bool { return g.Nodes[i].ID < g.Nodes[j].ID })
	sort.Slice(g.Edges, func(i, j int) bool { return g.Edges[i].ID < g.Edges[j].ID })
	return g
}

// rate is the per-second increase from a to b; a counter that went down
// restarted, so its whole value is the increase (Prometheus' reset rule).
func rate(a, b Counts, secs float64) Counts {
	d := func(x, y float64) float64 {
		if y < x {
			return y / secs
		}
		return (y - x) / secs
	}
	return Counts{
		Requests: d(a.Requests, b.Requests), Errors: d(a.Errors, b.Errors), Denied: d(a.Denied, b.Denied),
		Connections: d(a.Connections, b.Connections), BytesSent: d(a.BytesSent, b.BytesSent), BytesRecv: d(a.BytesRecv, b.BytesRecv),
	}
}

func ratios(c Counts) (errRatio, deniedRatio float64) {
	n := c.Requests
	if n == 0 {
		n = c.Connections
	}
	if n == 0 {
		return 0, 0
	}
	return c.Errors / n, c.Denied / n
}

// proxyWorkloads maps the node IDs of scraped waypoints and gateways to
// their kind, so the graph draws them as proxies.
func proxyWorkloads(s *Snapshot) map[string]NodeKind {
	out := map[string]NodeKind{}
	for _, sc := range s.Scrapes {
		switch sc.Target.Role {
		case "waypoint":
			out[workloadID(sc.Target.Namespace, sc.Target.Workload)] = KindWaypoint
		case "gateway":
			out[workloadID(sc.Target.Namespace, sc.Target.Workload)] = KindGateway
		}
	}
	return out
}

func workloadID(ns, name string) string { return "workload:" + ns + "/" + name }

func nodeOf(id string, proxies map[string]NodeKind) Node {
	kind, rest, _ := strings.Cut(id, ":")
	ns, name, _ := strings.Cut(rest, "/")
	n := Node{ID: id, Kind: NodeKind(kind), Namespace: ns, Name: name}
	if k, ok := proxies[id]; ok {
		n.Kind = k
	}
	if name == "" {
		n.Name = rest
		n.Namespace = ""
	}
	return n
}

// series is one sample of the metrics the graph reads, with its labels.
type series struct {
	labels map[string]string
	value  float64
}

func samples(f *dto.MetricFamily) []series {
	if f == nil {
		return nil
	}
	var out []series
	for _, m := range f.GetMetric() {
		l := make(map[string]string, len(m.GetLabel()))
		for _, p := range m.GetLabel() {
			l[p.GetName()] = p.GetValue()
		}
		v := m.GetCounter().GetValue()
		if m.GetUntyped() != nil {
			v = m.GetUntyped().GetValue()
		}
		out = append(out, series{l, v})
	}
	return out
}

// edgesOf aggregates a snapshot's series into edges. One TCP connection is
// counted by the client's and the server's ztunnel: an edge takes the
// destination reporter's count, and the source reporter's only where no
// destination ztunnel reported (the server is outside the mesh or denied
// before its ztunnel counted).
func edgesOf(s *Snapshot) map[string]*Edge {
	edges := map[string]*Edge{}
	// tcp[key][reporter] accumulates before the reporters are reconciled.
	type tcpAcc struct {
		byReporter map[string]*Counts
	}
	tcp := map[string]*tcpAcc{}
	for _, sc := range s.Scrapes {
		for _, x := range samples(sc.Families[metricRequests]) {
			e := edge(edges, x.labels, protocolOf(x.labels))
			if sc.Target.Role == "waypoint" {
				addVia(e, workloadID(sc.Target.Namespace, sc.Target.Workload))
			}
			c := Counts{Requests: x.value}
			code := x.labels["response_code"]
			if deniedFlags[x.labels["response_flags"]] {
				c.Denied = x.value
			} else if n, err := strconv.Atoi(code); err != nil || n >= 500 || n == 0 {
				c.Errors = x.value
			}
			if e.ResponseCodes == nil {
				e.ResponseCodes = map[string]float64{}
			}
			e.ResponseCodes[code] += x.value
			e.Total.add(c)
		}
		for name, f := range sc.Families {
			if name != metricTCPOpened && name != metricTCPSent && name != metricTCPRecv {
				continue
			}
			for _, x := range samples(f) {
				e := edge(edges, x.labels, "tcp")
				if sc.Target.Role == "waypoint" {
					addVia(e, workloadID(sc.Target.Namespace, sc.Target.Workload))
				}
				var c Counts
				switch name {
				case metricTCPOpened:
					c.Connections = x.value
					if deniedFlags[x.labels["response_flags"]] {
						c.Denied = x.value
					} else if fl := x.labels["response_flags"]; fl != "" && fl != "-" {
						c.Errors = x.value
					}
				case metricTCPSent:
					c.BytesSent = x.value
				case metricTCPRecv:
					c.BytesRecv = x.value
				}
				acc := tcp[e.ID]
				if acc == nil {
					acc = &tcpAcc{byReporter: map[string]*Counts{}}
					tcp[e.ID] = acc
				}
				r := x.labels["reporter"]
				if acc.byReporter[r] == nil {
					acc.byReporter[r] = &Counts{}
				}
				acc.byReporter[r].add(c)
			}
		}
	}
	for id, acc := range tcp {
		c := acc.byReporter["destination"]
		if c == nil {
			c = acc.byReporter["source"]
		}
		if c == nil { // waypoint or gateway reporters
			c = &Counts{}
			for _, v := range acc.byReporter {
				c.add(*v)
			}
		}
		edges[id].Total.add(*c)
	}
	return edges
}

func protocolOf(l map[string]string) string {
	if l["request_protocol"] == "grpc" {
		return "grpc"
	}
	return "http"
}

// edge returns (creating) the edge of a series' source and destination.
func edge(edges map[string]*Edge, l map[string]string, proto string) *Edge {
	src := peerID(l["source_workload_namespace"], l["source_workload"], "")
	dst := peerID(l["destination_workload_namespace"], l["destination_workload"], l["destination_service"])
	id := src + "->" + dst + "|" + proto
	e := edges[id]
	if e == nil {
		e = &Edge{ID: id, Source: src, Target: dst, Protocol: proto, MTLS: true,
			dstNamespace: known(l["destination_workload_namespace"]), dstWorkload: known(l["destination_workload"]),
			dstServiceName: known(l["destination_service_name"])}
		if e.dstNamespace == "" {
			e.dstNamespace = known(l["destination_service_namespace"])
		}
		edges[id] = e
	}
	if svc := known(l["destination_service"]); svc != "" && e.Service == "" {
		e.Service = svc
	}
	if p := known(l["source_principal"]); p != "" && !contains(e.Principals, p) {
		e.Principals = append(e.Principals, p)
	}
	if l["connection_security_policy"] != "mutual_tls" {
		e.MTLS = false
	}
	return e
}

func addVia(e *Edge, id string) {
	if !contains(e.Via, id) {
		e.Via = append(e.Via, id)
	}
}

// peerID names a node: the workload when known, else the service host, else
// "unknown".
func peerID(ns, workload, service string) string {
	if known(workload) != "" {
		return workloadID(known(ns), workload)
	}
	if known(service) != "" {
		return "service:" + service
	}
	return "unknown:unknown"
}

func known(s string) string {
	if s == "unknown" {
		return ""
	}
	return s
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

package observability

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"

	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql/parser"
)

const grafanaDir = "../../config/grafana"

// query is one PromQL expression of a dashboard, where it is (the panel's
// title, or the variable) and the labels the dashboard reads from its
// result: the legend's {{label}}s, or a label_values() variable's label.
type query struct {
	where, expr string
	uses        []string
}

// dashboardQueries walks a dashboard's JSON for every panel target's expr
// (rows nest panels) and every templating variable's label_values() query.
func dashboardQueries(dash map[string]any) []query {
	var out []query
	var walk func(path string, v any)
	walk = func(path string, v any) {
		switch v := v.(type) {
		case map[string]any:
			where := path
			if title, ok := v["title"].(string); ok {
				where = title // the innermost panel's title
			}
			for k, child := range v {
				if s, ok := child.(string); ok && k == "expr" {
					legend, _ := v["legendFormat"].(string)
					out = append(out, query{where: where, expr: s, uses: legendLabels(legend)})
					continue
				}
				walk(where, child)
			}
		case []any:
			for _, child := range v {
				walk(path, child)
			}
		}
	}
	walk("", dash["panels"])
	if tmpl, ok := dash["templating"].(map[string]any); ok {
		list, _ := tmpl["list"].([]any)
		for _, item := range list {
			v, _ := item.(map[string]any)
			if v["type"] != "query" {
				continue
			}
			q := v["definition"]
			if m, ok := v["query"].(map[string]any); ok {
				q = m["query"]
			}
			if s, ok := q.(string); ok {
				expr, label := templateExpr(s)
				out = append(out, query{where: fmt.Sprintf("variable %v", v["name"]), expr: expr, uses: label})
			}
		}
	}
	return out
}

// labelValues is Grafana's label_values(expr, label) variable query.
var labelValues = regexp.MustCompile(`^\s*label_values\((.*),\s*(\w+)\s*\)\s*$`)

// templateExpr is the PromQL inside a variable query and the label it lists.
func templateExpr(q string) (string, []string) {
	if m := labelValues.FindStringSubmatch(q); m != nil {
		return m[1], []string{m[2]}
	}
	return q, nil
}

// legendPlaceholder is a {{label}} of a legend format.
var legendPlaceholder = regexp.MustCompile(`\{\{\s*(\w+)\s*\}\}`)

func legendLabels(legend string) []string {
	var out []string
	for _, m := range legendPlaceholder.FindAllStringSubmatch(legend, -1) {
		out = append(out, m[1])
	}
	return out
}

// promqlParser is Prometheus' parser with its default options (no experimental
// functions: a dashboard must work on a stock server).
var promqlParser = parser.NewParser(parser.Options{})

var (
	grafanaRanges = regexp.MustCompile(`\$\{?__(rate_interval|interval|range)\}?`)
	grafanaVars   = regexp.MustCompile(`\$\{?\w+\}?`)
)

// expand replaces Grafana's variables as Grafana would before sending the
// query: ranges by a duration, dashboard variables by a value (they only
// appear inside label matchers' strings).
func expand(expr string) string {
	return grafanaVars.ReplaceAllString(grafanaRanges.ReplaceAllString(expr, "5m"), "x")
}

// metricNames lists the metric names an expression selects.
func metricNames(e parser.Expr) []string {
	var names []string
	parser.Inspect(e, func(n parser.Node, _ []parser.Node) error {
		vs, ok := n.(*parser.VectorSelector)
		if !ok {
			return nil
		}
		name := vs.Name
		for _, m := range vs.LabelMatchers {
			if m.Name == labels.MetricName && m.Type == labels.MatchEqual {
				name = m.Value
			}
		}
		names = append(names, name)
		return nil
	})
	return names
}

// checkQuery parses a dashboard expression as Grafana sends it and says
// what is wrong with it: a parse error, no metric, a metric the mesh does
// not export, a label no selected series carries (in a matcher, a
// grouping, or among uses, the labels the dashboard reads from the result).
func checkQuery(expr string, uses []string, exported seriesNames) (names []string, problems []string) {
	e, err := promqlParser.ParseExpr(expand(expr))
	if err != nil {
		return nil, []string{"does not parse: " + err.Error()}
	}
	names = metricNames(e)
	if len(names) == 0 {
		problems = append(problems, "selects no metric")
	}
	for _, n := range names {
		if exported[n] == nil {
			problems = append(problems, n+" is not a series the mesh exports")
		}
	}
	c := &labelCheck{exported: exported}
	result := c.labels(e)
	for _, l := range uses {
		if !result[l] {
			c.problem("the result has no label %s (it has %v)", l, sortedKeys(result))
		}
	}
	return names, append(problems, c.problems...)
}

// scrapeLabels are the labels every scraped series gets from Prometheus
// and the config/prometheus monitors.
var scrapeLabels = []string{"job", "instance", "namespace", "pod", "container", "endpoint", "service", "node", "gateway"}

// labelCheck works out the labels an expression's result carries and
// notes every label it names that cannot be there.
type labelCheck struct {
	exported seriesNames
	problems []string
}

func (c *labelCheck) problem(format string, args ...any) {
	c.problems = append(c.problems, fmt.Sprintf(format, args...))
}

func (c *labelCheck) labels(e parser.Expr) labelSet {
	switch e := e.(type) {
	case *parser.VectorSelector:
		return c.selector(e)
	case *parser.MatrixSelector:
		return c.labels(e.VectorSelector)
	case *parser.SubqueryExpr:
		return c.labels(e.Expr)
	case *parser.ParenExpr:
		return c.labels(e.Expr)
	case *parser.UnaryExpr:
		return c.labels(e.Expr)
	case *parser.StepInvariantExpr:
		return c.labels(e.Expr)
	case *parser.Call:
		return c.call(e)
	case *parser.AggregateExpr:
		return c.aggregate(e)
	case *parser.BinaryExpr:
		return c.binary(e)
	}
	return labelSet{} // literals
}

func (c *labelCheck) selector(vs *parser.VectorSelector) labelSet {
	name := vs.Name
	for _, m := range vs.LabelMatchers {
		if m.Name == labels.MetricName && m.Type == labels.MatchEqual {
			name = m.Value
		}
	}
	have := labelSet{}
	for l := range c.exported[name] {
		have[l] = true
	}
	for _, l := range scrapeLabels {
		have[l] = true
	}
	for _, m := range vs.LabelMatchers {
		if m.Name != labels.MetricName && !have[m.Name] {
			c.problem("%s has no label %s", name, m.Name)
		}
	}
	return have
}

func (c *labelCheck) call(call *parser.Call) labelSet {
	var vectors []labelSet
	for _, a := range call.Args {
		l := c.labels(a)
		if t := a.Type(); t == parser.ValueTypeVector || t == parser.ValueTypeMatrix {
			vectors = append(vectors, l)
		}
	}
	if len(vectors) == 0 {
		return labelSet{}
	}
	out := vectors[0]
	if call.Func.Name == "histogram_quantile" {
		if !out["le"] {
			c.problem("histogram_quantile over series without le (keep le in the aggregation)")
		}
		delete(out, "le")
	}
	return out
}

func (c *labelCheck) aggregate(a *parser.AggregateExpr) labelSet {
	in := c.labels(a.Expr)
	if a.Param != nil {
		c.labels(a.Param)
	}
	for _, g := range a.Grouping {
		if !in[g] {
			c.problem("%s by/without %s: the aggregated series have no such label", a.Op, g)
		}
	}
	if a.Without {
		for _, g := range a.Grouping {
			delete(in, g)
		}
		return in
	}
	out := labelSet{}
	for _, g := range a.Grouping {
		out[g] = true
	}
	return out
}

func (c *labelCheck) binary(b *parser.BinaryExpr) labelSet {
	lhs, rhs := c.labels(b.LHS), c.labels(b.RHS)
	if vm := b.VectorMatching; vm != nil && vm.On {
		for _, l := range vm.MatchingLabels {
			if !lhs[l] || !rhs[l] {
				c.problem("on(%s): not a label of both sides", l)
			}
		}
	}
	if b.LHS.Type() == parser.ValueTypeScalar {
		return rhs
	}
	return lhs
}

// TestCheckQuery: the checker refuses what a dashboard must not contain.
func TestCheckQuery(t *testing.T) {
	exported := exportedSeries(t)
	tests := []struct {
		expr string
		uses []string
		ok   bool
	}{
		{`sum by (destination_service_name) (rate(istio_requests_total{reporter="waypoint",destination_service_namespace=~"$namespace"}[$__rate_interval]))`, []string{"destination_service_name"}, true},
		{`histogram_quantile(0.99, sum by (le, pod) (rate(istio_request_duration_milliseconds_bucket[5m])))`, []string{"pod"}, true},
		{`sum(increase(ambient_xds_rejects_total[$__range]))`, nil, true},
		{`sum by (pod) (process_resident_memory_bytes{job="ztunnel"}) / 2^30`, []string{"pod"}, true},
		// bare histogram name; Istio's metric, not ours; unbalanced; no metric
		{`histogram_quantile(0.99, sum by (le) (rate(istio_request_duration_milliseconds[5m])))`, nil, false},
		{`rate(pilot_xds_pushes[5m])`, nil, false},
		{`{__name__="envoy_cluster_upstream_rq_total"}`, nil, false},
		{`sum(rate(istio_requests_total[5m])`, nil, false},
		{`vector(1)`, nil, false},
		// labels the series do not carry: in a matcher, a grouping, lost le, a legend
		{`rate(istio_requests_total{destination_service=~"x",response_status="500"}[5m])`, nil, false},
		{`sum by (source_service) (rate(istio_requests_total[5m]))`, nil, false},
		{`histogram_quantile(0.5, sum by (pod) (rate(istio_request_duration_milliseconds_bucket[5m])))`, nil, false},
		{`sum by (type) (rate(ambient_xds_pushes_total[5m]))`, []string{"role"}, false},
	}
	for _, tc := range tests {
		_, problems := checkQuery(tc.expr, tc.uses, exported)
		if (len(problems) == 0) != tc.ok {
			t.Errorf("%q: problems %v, want ok=%v", tc.expr, problems, tc.ok)
		}
	}
}

func loadDashboards(t *testing.T) map[string]map[string]any {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(grafanaDir, "*.json"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no dashboards in %s (%v)", grafanaDir, err)
	}
	out := map[string]map[string]any{}
	for _, f := range files {
		raw, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var dash map[string]any
		if err := json.Unmarshal(raw, &dash); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		out[filepath.Base(f)] = dash
	}
	return out
}

// TestDashboardQueries: every PromQL expression of every dashboard parses
// with Prometheus' own parser, selects only series the mesh exports, and
// names only labels those series carry (matchers, groupings, legends,
// variables).
func TestDashboardQueries(t *testing.T) {
	exported := exportedSeries(t)
	for file, dash := range loadDashboards(t) {
		t.Run(file, func(t *testing.T) {
			queries := dashboardQueries(dash)
			if len(queries) == 0 {
				t.Fatal("no queries")
			}
			used := map[string]bool{}
			for _, q := range queries {
				names, problems := checkQuery(q.expr, q.uses, exported)
				for _, p := range problems {
					t.Errorf("%s: %q: %s", q.where, q.expr, p)
				}
				for _, n := range names {
					used[n] = true
				}
			}
			t.Logf("%d queries over %d metrics: %s", len(queries), len(used), strings.Join(sortedKeys(used), ", "))
		})
	}
}

// TestDashboardShape: what Grafana needs to import the JSON: a uid and a
// title, panels with unique ids, and targets with a refId on the
// dashboard's data-source variable.
func TestDashboardShape(t *testing.T) {
	uids := map[string]string{}
	for file, dash := range loadDashboards(t) {
		uid, _ := dash["uid"].(string)
		if uid == "" || dash["title"] == "" {
			t.Errorf("%s: uid %q title %v", file, uid, dash["title"])
		}
		if other, dup := uids[uid]; dup {
			t.Errorf("%s and %s share uid %q", file, other, uid)
		}
		uids[uid] = file
		ids := map[float64]bool{}
		panels, _ := dash["panels"].([]any)
		for _, p := range panels {
			panel, _ := p.(map[string]any)
			id, _ := panel["id"].(float64)
			if ids[id] {
				t.Errorf("%s: panel id %v repeated (%v)", file, id, panel["title"])
			}
			ids[id] = true
			if _, ok := panel["gridPos"].(map[string]any); !ok {
				t.Errorf("%s: panel %v has no gridPos", file, panel["title"])
			}
			targets, _ := panel["targets"].([]any)
			for _, tg := range targets {
				target, _ := tg.(map[string]any)
				ds, _ := target["datasource"].(map[string]any)
				if target["refId"] == "" || target["refId"] == nil || ds["uid"] != "${datasource}" {
					t.Errorf("%s: panel %v target %v: refId and the ${datasource} variable are required", file, panel["title"], target)
				}
			}
		}
	}
}

func sortedKeys(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

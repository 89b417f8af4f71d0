package observability

import (
	"regexp"
	"strings"
	"testing"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/ambientmesh/ambient/controllers/discovery"
	"github.com/ambientmesh/ambient/proxylib/boot"
	xds "github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/identity"
	"github.com/ambientmesh/ambient/proxylib/telemetry"
	"github.com/ambientmesh/ambient/proxylib/waypoint"
)

// seriesNames collects the series a set of collectors exports, with their
// label names, as the binaries register them: each collector is registered
// with a real registry and gathered (exact names, types and labels for
// everything that has samples), and described (names and labels of vectors
// that have no child yet, whose type is known from the collector).
type seriesNames map[string]labelSet

// labelSet is a set of label names.
type labelSet map[string]bool

// Register implements prometheus.Registerer.
func (s seriesNames) Register(c prometheus.Collector) error {
	reg := prometheus.NewPedanticRegistry()
	if err := reg.Register(c); err != nil {
		return err
	}
	families, err := reg.Gather()
	if err != nil {
		return err
	}
	for _, f := range families {
		var names []string
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				names = append(names, l.GetName())
			}
		}
		s.add(f.GetName(), f.GetType(), names)
	}
	typ := dto.MetricType_UNTYPED
	switch c.(type) {
	case *prometheus.HistogramVec, prometheus.Histogram:
		typ = dto.MetricType_HISTOGRAM
	case *prometheus.SummaryVec, prometheus.Summary:
		typ = dto.MetricType_SUMMARY
	}
	descs := make(chan *prometheus.Desc)
	go func() { c.Describe(descs); close(descs) }()
	for d := range descs {
		if name, labels, ok := parseDesc(d); ok {
			s.add(name, typ, labels)
		}
	}
	return nil
}

// descForm reads a Desc's name and label names from its String form
// (client_golang has no accessors for them).
var descForm = regexp.MustCompile(`^Desc\{fqName: "([^"]+)", .*constLabels: \{(.*)\}, variableLabels: \{(.*)\}\}$`)

func parseDesc(d *prometheus.Desc) (name string, labels []string, ok bool) {
	m := descForm.FindStringSubmatch(d.String())
	if m == nil {
		return "", nil, false
	}
	for _, pair := range strings.Split(m[2], ",") {
		if n, _, found := strings.Cut(pair, "="); found {
			labels = append(labels, n)
		}
	}
	for _, v := range strings.Split(m[3], ",") {
		if v = strings.TrimSuffix(strings.TrimPrefix(v, "c("), ")"); v != "" {
			labels = append(labels, v)
		}
	}
	return m[1], labels, true
}

// add records the series of a metric family: a histogram's _bucket (with
// le), _sum and _count, a summary's quantiles, _sum and _count.
func (s seriesNames) add(name string, typ dto.MetricType, labels []string) {
	put := func(series string, extra ...string) {
		set := s[series]
		if set == nil {
			set = labelSet{}
			s[series] = set
		}
		for _, l := range append(labels, extra...) {
			set[l] = true
		}
	}
	switch typ {
	case dto.MetricType_HISTOGRAM:
		put(name+"_bucket", "le")
		put(name + "_sum")
		put(name + "_count")
	case dto.MetricType_SUMMARY:
		put(name, "quantile")
		put(name + "_sum")
		put(name + "_count")
	default:
		put(name)
	}
}

// MustRegister implements prometheus.Registerer.
func (s seriesNames) MustRegister(cs ...prometheus.Collector) {
	for _, c := range cs {
		if err := s.Register(c); err != nil {
			panic(err)
		}
	}
}

// Unregister implements prometheus.Registerer.
func (s seriesNames) Unregister(prometheus.Collector) bool { return false }

// noDialer is never dialed: the waypoint is built only for its metrics.
type noDialer struct{ hbone.Dialer }

// exportedSeries is every series name the mesh's binaries export, from
// their own registration code: the proxies' runtime collectors (boot), the
// TCP metrics (telemetry, ztunnel and waypoint), the waypoint's HTTP
// metrics (a real waypoint.New), and the control plane's discovery metrics.
func exportedSeries(t *testing.T) seriesNames {
	t.Helper()
	names := seriesNames{}
	names.MustRegister(boot.RuntimeCollectors()...)
	telemetry.NewMetrics(names)
	names.MustRegister(discovery.Collectors()...)
	wp, err := waypoint.New(waypoint.Config{Name: "waypoint", Namespace: "app",
		Identity: identity.Identity{TrustDomain: "cluster.local", Namespace: "app", ServiceAccount: "waypoint"},
		State:    xds.NewState(xds.AddressType, xds.AuthorizationType, xds.L7ResourceType),
		Dialer:   noDialer{}, Registry: names, Log: logr.Discard()})
	if err != nil {
		t.Fatal(err)
	}
	wp.Close()
	return names
}

// TestExportedSeries guards the collection itself: a few names each source
// must contribute.
func TestExportedSeries(t *testing.T) {
	names := exportedSeries(t)
	for _, want := range []string{
		"process_cpu_seconds_total", "process_resident_memory_bytes", "go_goroutines", // boot
		"istio_tcp_connections_opened_total",                                 // telemetry
		"istio_requests_total", "istio_request_duration_milliseconds_bucket", // waypoint
		"ambient_xds_rejects_total", "ambient_xds_push_latency_seconds_bucket", // discovery
	} {
		if names[want] == nil {
			t.Errorf("%s not among the exported series", want)
		}
	}
	if names["istio_request_duration_milliseconds"] != nil {
		t.Error("a histogram's bare name counted as a series")
	}
	// Labels come with the names, from vectors without children too.
	for series, labels := range map[string][]string{
		"istio_requests_total":                       {"reporter", "destination_service_name", "response_code"},
		"istio_request_duration_milliseconds_bucket": {"le", "destination_service_namespace"},
		"istio_tcp_sent_bytes_total":                 {"connection_security_policy", "destination_workload"},
		"ambient_xds_rejects_total":                  {"type"},
		"ambient_xds_connected_proxies":              {"role"},
	} {
		for _, l := range labels {
			if !names[series][l] {
				t.Errorf("%s lacks label %s: has %v", series, l, names[series])
			}
		}
	}
}

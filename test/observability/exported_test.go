package observability

import (
	"regexp"
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

// seriesNames collects the series names a set of collectors exports, as
// the binaries register them: each collector is registered with a real
// registry and gathered (exact names and types for everything that has
// samples), and described (names of vectors that have no child yet, whose
// type is known from the collector).
type seriesNames map[string]bool

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
		s.add(f.GetName(), f.GetType())
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
		if m := fqName.FindStringSubmatch(d.String()); m != nil {
			s.add(m[1], typ)
		}
	}
	return nil
}

// fqName reads a Desc's name from its String form (client_golang has no
// accessor for it).
var fqName = regexp.MustCompile(`fqName: "([^"]+)"`)

func (s seriesNames) add(name string, typ dto.MetricType) {
	switch typ {
	case dto.MetricType_HISTOGRAM:
		s[name+"_bucket"], s[name+"_sum"], s[name+"_count"] = true, true, true
	case dto.MetricType_SUMMARY:
		s[name], s[name+"_sum"], s[name+"_count"] = true, true, true
	default:
		s[name] = true
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
		if !names[want] {
			t.Errorf("%s not among the exported series", want)
		}
	}
	if names["istio_request_duration_milliseconds"] {
		t.Error("a histogram's bare name counted as a series")
	}
}

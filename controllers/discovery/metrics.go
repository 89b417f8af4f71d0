package discovery

import (
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	crmetrics "sigs.k8s.io/controller-runtime/pkg/metrics"
)

// The control plane's discovery metrics, served with the manager's own on
// its metrics endpoint. type is the short type URL (istio.workload.Address).
var (
	pushLatency = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "ambient_xds_push_latency_seconds",
		Help:    "Time from the first change the model saw to its push into the xDS caches (debounce and build).",
		Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
	})
	pushes = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "ambient_xds_pushes_total",
		Help: "Delta xDS responses sent to proxies.",
	}, []string{"type"})
	rejects = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "ambient_xds_rejects_total",
		Help: "Delta xDS responses proxies refused (NACK).",
	}, []string{"type"})
	connected = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "ambient_xds_connected_proxies",
		Help: "Proxies with an open discovery stream, by role.",
	}, []string{"role"})
)

// Collectors are the discovery metrics (registered with controller-runtime's
// registry; tests and dashboards list what is exported from here).
func Collectors() []prometheus.Collector {
	return []prometheus.Collector{pushLatency, pushes, rejects, connected}
}

func init() {
	crmetrics.Registry.MustRegister(Collectors()...)
}

// shortType is the last segment of a type URL.
func shortType(typeURL string) string {
	return typeURL[strings.LastIndex(typeURL, "/")+1:]
}

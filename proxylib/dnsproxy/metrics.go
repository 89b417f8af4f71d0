package dnsproxy

import (
	"github.com/prometheus/client_golang/prometheus"
)

// Who answered a query (the answered_by label and the access log).
const (
	AnsweredLocal    = "ztunnel"  // from the discovery state
	AnsweredCache    = "cache"    // a cached forwarded answer
	AnsweredUpstream = "upstream" // forwarded to the pod's resolver
)

// Metrics are the DNS proxy's counters, named like Istio's ztunnel
// (istio_dns_*), beside the TCP metrics on :15020.
type Metrics struct {
	// Requests counts queries by client workload, query type, the response
	// code returned to the client, and who answered.
	Requests *prometheus.CounterVec
	// UpstreamRequests counts queries forwarded, by transport (udp, tcp).
	UpstreamRequests *prometheus.CounterVec
	// UpstreamFailures counts forwarded queries that got no answer from an
	// upstream, by transport and reason (timeout, error, no_upstream,
	// overloaded).
	UpstreamFailures *prometheus.CounterVec
	// UpstreamDuration is the time an upstream took to answer.
	UpstreamDuration prometheus.Histogram
}

// NewMetrics creates the metrics and registers them with reg (may be nil).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		Requests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_dns_requests_total",
			Help: "DNS queries received by the DNS proxy."},
			[]string{"source_workload", "source_workload_namespace", "query_type", "response_code", "answered_by"}),
		UpstreamRequests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_dns_upstream_requests_total",
			Help: "DNS queries forwarded to an upstream resolver."}, []string{"protocol"}),
		UpstreamFailures: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_dns_upstream_failures_total",
			Help: "Forwarded DNS queries an upstream resolver did not answer."}, []string{"protocol", "reason"}),
		UpstreamDuration: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "istio_dns_upstream_request_duration_seconds",
			Help: "Time upstream resolvers took to answer.", Buckets: []float64{.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5}}),
	}
	if reg != nil {
		reg.MustRegister(m.Requests, m.UpstreamRequests, m.UpstreamFailures, m.UpstreamDuration)
	}
	return m
}

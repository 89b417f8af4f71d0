package waypoint

import (
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambientmesh/ambient/proxylib/route"
	"github.com/ambientmesh/ambient/proxylib/telemetry"
)

// Reporter is the reporter label of everything the waypoint records;
// ReporterSource that of an ingress gateway (the client side, as Istio's
// gateways report).
const Reporter, ReporterSource = "waypoint", "source"

// ReporterDestination is the reporter of a sidecar's L7 engine on its own
// pod's inbound (as Istio's sidecars report the server side).
const ReporterDestination = "destination"

// httpLabels are Istio's standard request metric labels.
var httpLabels = []string{
	"reporter",
	"source_workload", "source_workload_namespace", "source_principal", "source_app", "source_version", "source_cluster",
	"destination_service", "destination_service_namespace", "destination_service_name",
	"destination_workload", "destination_workload_namespace", "destination_principal", "destination_app", "destination_version", "destination_cluster",
	"request_protocol", "response_code", "grpc_response_status", "response_flags", "connection_security_policy",
}

type httpMetrics struct {
	requests          *prometheus.CounterVec
	duration, reqSize *prometheus.HistogramVec
	respSize          *prometheus.HistogramVec
}

func newHTTPMetrics(reg prometheus.Registerer) *httpMetrics {
	// Istio's default buckets.
	durBuckets := []float64{0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000, 1800000, 3600000}
	sizeBuckets := prometheus.ExponentialBuckets(1, 10, 8)
	m := &httpMetrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_requests_total", Help: "Requests handled."}, httpLabels),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "istio_request_duration_milliseconds", Help: "Request duration.", Buckets: durBuckets}, httpLabels),
		reqSize:  prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "istio_request_bytes", Help: "Request size (headers and body).", Buckets: sizeBuckets}, httpLabels),
		respSize: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "istio_response_bytes", Help: "Response size (headers and body).", Buckets: sizeBuckets}, httpLabels),
	}
	if reg != nil {
		reg.MustRegister(m.requests, m.duration, m.reqSize, m.respSize)
	}
	return m
}

// requestSeries are the four metrics of one label set.
type requestSeries struct {
	requests                    prometheus.Counter
	duration, reqSize, respSize prometheus.Observer
}

// lastSeries remembers a connection's last label set and its series:
// requests on one connection nearly always share every label, and looking
// the series up by 21 label values (hashing and validating each) was a
// tenth of the waypoint's CPU per request. Series are never deleted, so a
// remembered one stays the registered one.
type lastSeries struct {
	mu     sync.Mutex
	values []string
	series requestSeries
}

func (l *lastSeries) of(m *httpMetrics, values []string) requestSeries {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !slices.Equal(l.values, values) {
		l.values = values
		l.series = requestSeries{
			requests: m.requests.WithLabelValues(values...),
			duration: m.duration.WithLabelValues(values...),
			reqSize:  m.reqSize.WithLabelValues(values...),
			respSize: m.respSize.WithLabelValues(values...),
		}
	}
	return l.series
}

func headerSize(h http.Header) int64 {
	var n int64
	for k, vs := range h {
		for _, v := range vs {
			n += int64(len(k) + len(v) + 4)
		}
	}
	return n
}

// record writes the metrics and the access-log line of one request.
func (c *connInfo) record(in *http.Request, o *outcome, start time.Time, reqBytes, respBytes int64, grpcStatus string, trailer http.Header) {
	dur := time.Since(start)
	if grpcStatus == "" && trailer != nil {
		grpcStatus = trailer.Get("Grpc-Status")
	}
	proto := "http"
	switch {
	case route.IsGRPC(in):
		proto = "grpc"
	case in.ProtoMajor == 2:
		proto = "http"
	}
	ep := o.endpoint
	if ep == nil && c.s.cfg.Sidecar && !c.outbound {
		ep = c.dst.workload // a sidecar's inbound: itself, even when denied
	}
	dst := telemetry.PeerOf(ep, nil)
	svc := telemetry.ServiceOf(o.backend)
	if o.backend == nil && c.dst.service != nil {
		svc = telemetry.ServiceOf(c.dst.service)
	}
	if o.backend == nil && c.dst.service == nil && c.s.cfg.Sidecar {
		svc = telemetry.ServiceOf(c.s.inboundService(c.dst.workload, in.Host))
	}
	flags := string(o.flags)
	if flags == "" {
		flags = "-"
	}
	gs := grpcStatus
	if gs == "" {
		gs = "-"
	}
	values := []string{
		c.reporter(),
		c.source.Workload, c.source.Namespace, c.source.Principal, c.source.App, c.source.Version, c.source.Cluster,
		svc.Host, svc.Namespace, svc.Name,
		dst.Workload, dst.Namespace, dst.Principal, dst.App, dst.Version, dst.Cluster,
		proto, statusString(o.status), gs, flags, c.securityPolicy(),
	}
	h := c.series.of(c.s.metrics, values)
	h.requests.Inc()
	h.duration.Observe(float64(dur.Microseconds()) / 1000)
	h.reqSize.Observe(float64(reqBytes + headerSize(in.Header)))
	h.respSize.Observe(float64(respBytes))
	c.s.log.Info("access",
		"src.addr", c.srcIP.String(), "src.identity", c.callerID(),
		"dst.addr", c.dst.target.String(), "dst.service", svc.Host, "dst.workload", dst.Workload, "upstream", o.upstream,
		"route", o.route, "method", in.Method, "path", in.URL.Path, "protocol", proto,
		"status", o.status, "grpc_status", gs, "flags", flags,
		"bytes_received", reqBytes, "bytes_sent", respBytes, "duration_ms", float64(dur.Microseconds())/1000)
}

// Package telemetry records Istio's standard TCP metrics and writes one
// access-log line per connection.
package telemetry

import (
	"strings"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/identity"
)

// Label names, as Istio's standard metrics spell them.
var labelNames = []string{
	"reporter",
	"source_workload", "source_workload_namespace", "source_principal", "source_app", "source_version", "source_cluster",
	"destination_service", "destination_service_namespace", "destination_service_name",
	"destination_workload", "destination_workload_namespace", "destination_principal", "destination_app", "destination_version", "destination_cluster",
	"request_protocol", "response_flags", "connection_security_policy",
}

// Reporter values.
const (
	ReporterSource      = "source"
	ReporterDestination = "destination"
)

// Security policy values.
const (
	MutualTLS = "mutual_tls"
	Unknown   = "unknown"
)

// Peer describes one end of a connection for labels and logs.
type Peer struct {
	Workload  string
	Namespace string
	Principal string // SPIFFE ID without the scheme ("td/ns/x/sa/y"), or "unknown"
	App       string
	Version   string
	Cluster   string
}

// PeerOf describes a workload (nil gives the "unknown" peer) with identity id.
func PeerOf(w *workloadapi.Workload, id *identity.Identity) Peer {
	p := Peer{Workload: Unknown, Namespace: Unknown, Principal: Unknown, App: Unknown, Version: Unknown, Cluster: Unknown}
	if id != nil && !id.IsZero() {
		p.Principal = id.String()
	}
	if w == nil {
		return p
	}
	p.Workload = orUnknown(w.GetWorkloadName())
	p.Namespace = orUnknown(w.GetNamespace())
	p.App = orUnknown(w.GetCanonicalName())
	p.Version = orUnknown(w.GetCanonicalRevision())
	p.Cluster = orUnknown(w.GetClusterId())
	if p.Principal == Unknown && w.GetServiceAccount() != "" {
		p.Principal = identity.Identity{TrustDomain: orDefault(w.GetTrustDomain(), "cluster.local"), Namespace: w.GetNamespace(), ServiceAccount: w.GetServiceAccount()}.String()
	}
	return p
}

// ServiceLabels are the destination_service* labels.
type ServiceLabels struct {
	Host, Namespace, Name string
}

// ServiceOf describes svc (nil gives "unknown").
func ServiceOf(svc *workloadapi.Service) ServiceLabels {
	if svc == nil {
		return ServiceLabels{Unknown, Unknown, Unknown}
	}
	return ServiceLabels{Host: orUnknown(svc.GetHostname()), Namespace: orUnknown(svc.GetNamespace()), Name: orUnknown(svc.GetName())}
}

func orUnknown(s string) string { return orDefault(s, Unknown) }

func orDefault(s, d string) string {
	if strings.TrimSpace(s) == "" {
		return d
	}
	return s
}

// Metrics holds the four TCP counters.
type Metrics struct {
	Opened, Closed, Sent, Received *prometheus.CounterVec
}

// NewMetrics creates the counters and registers them with reg (may be nil).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	mk := func(name, help string) *prometheus.CounterVec {
		return prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: help}, labelNames)
	}
	m := &Metrics{
		Opened:   mk("istio_tcp_connections_opened_total", "TCP connections opened."),
		Closed:   mk("istio_tcp_connections_closed_total", "TCP connections closed."),
		Sent:     mk("istio_tcp_sent_bytes_total", "Bytes sent to the client (response direction) during TCP connections."),
		Received: mk("istio_tcp_received_bytes_total", "Bytes received from the client (request direction) during TCP connections."),
	}
	if reg != nil {
		reg.MustRegister(m.Opened, m.Closed, m.Sent, m.Received)
	}
	return m
}

// Labels are the label values of one connection.
type Labels struct {
	Reporter       string
	Source         Peer
	Destination    Peer
	Service        ServiceLabels
	SecurityPolicy string
	ResponseFlags  string // "-" or a proxyerr reason
}

func (l Labels) values() []string {
	flags := l.ResponseFlags
	if flags == "" {
		flags = "-"
	}
	sec := l.SecurityPolicy
	if sec == "" {
		sec = Unknown
	}
	return []string{
		l.Reporter,
		l.Source.Workload, l.Source.Namespace, l.Source.Principal, l.Source.App, l.Source.Version, l.Source.Cluster,
		l.Service.Host, l.Service.Namespace, l.Service.Name,
		l.Destination.Workload, l.Destination.Namespace, l.Destination.Principal, l.Destination.App, l.Destination.Version, l.Destination.Cluster,
		"tcp", flags, sec,
	}
}

// ConnOpened counts an opened connection.
func (m *Metrics) ConnOpened(l Labels) { m.Opened.WithLabelValues(l.values()...).Inc() }

// ConnClosed counts a closed connection and its bytes: received from the
// client, sent to the client.
func (m *Metrics) ConnClosed(l Labels, received, sent int64) {
	v := l.values()
	m.Closed.WithLabelValues(v...).Inc()
	if received > 0 {
		m.Received.WithLabelValues(v...).Add(float64(received))
	}
	if sent > 0 {
		m.Sent.WithLabelValues(v...).Add(float64(sent))
	}
}

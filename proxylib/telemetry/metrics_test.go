package telemetry

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/identity"
)

func TestPeerOf(t *testing.T) {
	sleep := identity.MustParse("spiffe://cluster.local/ns/default/sa/sleep")
	w := &workloadapi.Workload{Name: "sleep-abc", Namespace: "default", WorkloadName: "sleep", ServiceAccount: "sleep",
		CanonicalName: "sleep", CanonicalRevision: "v1", ClusterId: "Kubernetes"}
	cases := []struct {
		name string
		w    *workloadapi.Workload
		id   *identity.Identity
		want Peer
	}{
		{"unknown", nil, nil, Peer{"unknown", "unknown", "unknown", "unknown", "unknown", "unknown"}},
		{"workload with verified id", w, &sleep, Peer{"sleep", "default", "spiffe://cluster.local/ns/default/sa/sleep", "sleep", "v1", "Kubernetes"}},
		{"workload, id from service account", w, nil, Peer{"sleep", "default", "spiffe://cluster.local/ns/default/sa/sleep", "sleep", "v1", "Kubernetes"}},
		{"identity only", nil, &sleep, Peer{"unknown", "unknown", "spiffe://cluster.local/ns/default/sa/sleep", "unknown", "unknown", "unknown"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := PeerOf(c.w, c.id); got != c.want {
				t.Fatalf("PeerOf = %+v, want %+v", got, c.want)
			}
		})
	}
}

func TestMetricsCountBytesAndConnections(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := NewMetrics(reg)
	l := Labels{Reporter: ReporterDestination, Source: PeerOf(nil, nil), Destination: PeerOf(nil, nil),
		Service:        ServiceOf(&workloadapi.Service{Name: "httpbin", Namespace: "default", Hostname: "httpbin.default.svc.cluster.local"}),
		SecurityPolicy: MutualTLS}
	m.ConnOpened(l)
	m.ConnClosed(l, 100, 2000)
	m.ConnOpened(l)
	m.ConnClosed(l, 5, 0)

	if got := testutil.ToFloat64(m.Received.WithLabelValues(l.values()...)); got != 105 {
		t.Fatalf("received = %v, want 105", got)
	}
	if got := testutil.ToFloat64(m.Sent.WithLabelValues(l.values()...)); got != 2000 {
		t.Fatalf("sent = %v, want 2000", got)
	}
	if got := testutil.ToFloat64(m.Opened.WithLabelValues(l.values()...)); got != 2 {
		t.Fatalf("opened = %v, want 2", got)
	}
	// The exported family carries every Istio label name.
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() != "istio_tcp_connections_closed_total" {
			continue
		}
		got := map[string]string{}
		for _, lp := range f.GetMetric()[0].GetLabel() {
			got[lp.GetName()] = lp.GetValue()
		}
		for _, n := range labelNames {
			if _, ok := got[n]; !ok {
				t.Errorf("label %s missing", n)
			}
		}
		if got["request_protocol"] != "tcp" || got["response_flags"] != "-" || got["destination_service_name"] != "httpbin" {
			t.Errorf("labels = %v", got)
		}
		return
	}
	t.Fatal("closed counter not exported")
}

type testutilT struct{}

var testutil testutilT

func (testutilT) ToFloat64(c prometheus.Counter) float64 {
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		panic(err)
	}
	return m.GetCounter().GetValue()
}

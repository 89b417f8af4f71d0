package waypoint

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

func counterValue(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

// TestLastSeriesFollowsLabelChanges: a connection's remembered series are
// reused only while every label is the same; a request with another label
// (here the response code) lands in its own series.
func TestLastSeriesFollowsLabelChanges(t *testing.T) {
	m := newHTTPMetrics(prometheus.NewRegistry())
	labels := func(code string) []string {
		v := make([]string, len(httpLabels))
		for i := range v {
			v[i] = "x"
		}
		v[17] = code // response_code
		return v
	}
	var l lastSeries
	for _, code := range []string{"200", "200", "503", "200"} {
		l.of(m, labels(code)).requests.Inc()
	}
	if got := counterValue(t, m.requests.WithLabelValues(labels("200")...)); got != 3 {
		t.Errorf("200 series counts %v, want 3", got)
	}
	if got := counterValue(t, m.requests.WithLabelValues(labels("503")...)); got != 1 {
		t.Errorf("503 series counts %v, want 1", got)
	}
}

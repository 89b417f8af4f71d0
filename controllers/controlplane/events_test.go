package controlplane

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	discoverypb "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"
	apisecurity "istio.io/api/security/v1beta1"
	apitype "istio.io/api/type/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	eventsv1 "k8s.io/api/events/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"
	crmetrics "sigs.k8s.io/controller-runtime/pkg/metrics"

	"github.com/ambientmesh/ambient/controllers/discovery"
	xds "github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/kubeevents"
)

// eventsAbout lists the Events regarding the object with uid.
func eventsAbout(t *testing.T, uid types.UID) []eventsv1.Event {
	t.Helper()
	var list eventsv1.EventList
	if err := s.k8s.List(context.Background(), &list); err != nil {
		t.Fatal(err)
	}
	var out []eventsv1.Event
	for _, e := range list.Items {
		if e.Regarding.UID == uid {
			out = append(out, e)
		}
	}
	return out
}

// countReason counts the times reason was recorded (Event objects and
// their series of repeats).
func countReason(evs []eventsv1.Event, reason string) int {
	n := 0
	for _, e := range evs {
		if e.Reason == reason {
			n++
			if e.Series != nil {
				n += int(e.Series.Count) - 1
			}
		}
	}
	return n
}

// waitEvent waits for an Event of typ and reason regarding obj (of kind),
// recorded by the control plane.
func waitEvent(t *testing.T, obj client.Object, kind, typ, reason string) eventsv1.Event {
	t.Helper()
	var found eventsv1.Event
	eventually(t, fmt.Sprintf("%s Event %s on %s %s", typ, reason, kind, obj.GetName()), func() bool {
		for _, e := range eventsAbout(t, obj.GetUID()) {
			if e.Reason == reason && e.Type == typ {
				found = e
				return true
			}
		}
		return false
	})
	if r := found.Regarding; r.Kind != kind || r.Name != obj.GetName() || r.Namespace != obj.GetNamespace() || found.ReportingController != EventSource {
		t.Errorf("Event %s regards %s %s/%s from %q", reason, r.Kind, r.Namespace, r.Name, found.ReportingController)
	}
	return found
}

// TestPolicyTranslationEvents: an ALLOW policy whose L7 rules ztunnel drops
// is reported on the policy, naming the rules and the workloads that now
// deny; policies translated whole are not.
func TestPolicyTranslationEvents(t *testing.T) {
	ctx := context.Background()
	const ns = "ev-pol"
	ensureNamespace(t, ns, map[string]string{ambientLabel: "ambient"})
	createPod(t, podSpec{ns: ns, name: "db-0", node: "node-a", ip: "10.9.0.1", labels: map[string]string{"app": "db"}})
	createPod(t, podSpec{ns: ns, name: "web-0", node: "node-a", ip: "10.9.0.2", labels: map[string]string{"app": "web"}})

	getDB := &apisecurity.Rule{To: []*apisecurity.Rule_To{{Operation: &apisecurity.Operation{Methods: []string{"GET"}, Paths: []string{"/rows"}}}}}
	fromWeb := &apisecurity.Rule{From: []*apisecurity.Rule_From{{Source: &apisecurity.Source{Namespaces: []string{ns}}}}}
	tests := []struct {
		name   string
		spec   *apisecurity.AuthorizationPolicy
		report bool
		want   []string // in the note
	}{
		{"l7-allow", &apisecurity.AuthorizationPolicy{Selector: &apitype.WorkloadSelector{MatchLabels: map[string]string{"app": "db"}},
			Rules: []*apisecurity.Rule{fromWeb, getDB}}, true,
			[]string{"spec.rules[1] (methods, paths) needs L7", "app=db", "without a waypoint, denied always: " + ns + "/db-0"}},
		{"l4-allow", &apisecurity.AuthorizationPolicy{Rules: []*apisecurity.Rule{fromWeb}}, false, nil},
		{"l7-deny", &apisecurity.AuthorizationPolicy{Action: apisecurity.AuthorizationPolicy_DENY, Rules: []*apisecurity.Rule{getDB}}, false, nil},
	}
	var policies []*securityv1.AuthorizationPolicy
	for _, tc := range tests {
		ap := &securityv1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Name: tc.name, Namespace: ns}}
		proto.Merge(&ap.Spec, tc.spec)
		if err := s.k8s.Create(ctx, ap); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = s.k8s.Delete(context.Background(), ap) })
		policies = append(policies, ap)
	}
	var reported *securityv1.AuthorizationPolicy
	for i, tc := range tests {
		if !tc.report {
			continue
		}
		reported = policies[i]
		e := waitEvent(t, policies[i], "AuthorizationPolicy", kubeevents.Warning, discovery.ReasonL7RulesDropped)
		t.Logf("%s: %s", e.Reason, e.Note)
		for _, w := range tc.want {
			if !strings.Contains(e.Note, w) {
				t.Errorf("%s: note %q does not mention %q", tc.name, e.Note, w)
			}
		}
		if strings.Contains(e.Note, "web-0") {
			t.Errorf("%s: note names a pod the policy does not select: %q", tc.name, e.Note)
		}
	}

	// Rebuild the reported policy (a label edit reaches the waypoints'
	// copy); the unchanged translation is not reported again.
	touch := reported.DeepCopy()
	touch.Labels = map[string]string{"touched": "yes"}
	if err := s.k8s.Patch(ctx, touch, client.MergeFrom(reported)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the policy rebuilt", func() bool {
		for _, r := range s.cp.Discovery.Snapshot(xds.L7ResourceType) {
			if strings.Contains(r.Name, reported.Name) && strings.Contains(fmt.Sprint(r.Resource), "touched") {
				return true
			}
		}
		return false
	})
	for i, tc := range tests {
		want := 0
		if tc.report {
			want = 1
		}
		if n := countReason(eventsAbout(t, policies[i].UID), discovery.ReasonL7RulesDropped); n != want {
			t.Errorf("%s: %s recorded %d times, want %d", tc.name, discovery.ReasonL7RulesDropped, n, want)
		}
	}
}

// adsStream is a raw delta ADS stream of a proxy, to send what our client
// never sends on purpose (NACKs).
type adsStream struct {
	t      *testing.T
	stream discoverypb.AggregatedDiscoveryService_DeltaAggregatedResourcesClient
}

func openADS(t *testing.T, tok string) *adsStream {
	t.Helper()
	conn, err := grpc.NewClient(s.xdsAddr, grpc.WithTransportCredentials(credentials.NewTLS(s.clientTLS())))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(func() { cancel(); conn.Close() })
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+tok)
	stream, err := discoverypb.NewAggregatedDiscoveryServiceClient(conn).DeltaAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return &adsStream{t: t, stream: stream}
}

func (a *adsStream) send(req *discoverypb.DeltaDiscoveryRequest) {
	a.t.Helper()
	if err := a.stream.Send(req); err != nil {
		a.t.Fatal(err)
	}
}

func (a *adsStream) recv() *discoverypb.DeltaDiscoveryResponse {
	a.t.Helper()
	resp, err := a.stream.Recv()
	if err != nil {
		a.t.Fatal(err)
	}
	return resp
}

// TestNACKEvents: a proxy refusing a push is reported on its pod once per
// refusal reason, and accepting again is reported too.
func TestNACKEvents(t *testing.T) {
	zt := ztunnel(t, "zt-nack", "node-a", "10.200.0.9")
	ads := openADS(t, token(t, zt, xds.TokenAudience))
	ads.send(&discoverypb.DeltaDiscoveryRequest{TypeUrl: xds.AuthorizationType, ResourceNamesSubscribe: []string{"*"}})
	nonce := ads.recv().GetNonce()
	nack := func(msg string) *discoverypb.DeltaDiscoveryRequest {
		return &discoverypb.DeltaDiscoveryRequest{TypeUrl: xds.AuthorizationType, ResponseNonce: nonce,
			ErrorDetail: &rpcstatus.Status{Code: int32(codes.InvalidArgument), Message: msg}}
	}
	ack := &discoverypb.DeltaDiscoveryRequest{TypeUrl: xds.AuthorizationType, ResponseNonce: nonce}

	steps := []struct {
		req        *discoverypb.DeltaDiscoveryRequest
		typ, event string // "" : no new event
		note       string
	}{
		{ack, "", "", ""},
		{nack("policy x: unknown match type"), kubeevents.Warning, discovery.ReasonConfigRejected, "unknown match type"},
		{nack("policy x: unknown match type"), "", "", ""}, // the same refusal again
		{ack, kubeevents.Normal, discovery.ReasonConfigAccepted, "accepts"},
	}
	for i, st := range steps {
		ads.send(st.req)
		if st.event == "" {
			continue
		}
		e := waitEvent(t, zt, "Pod", st.typ, st.event)
		t.Logf("%s: %s", e.Reason, e.Note)
		if !strings.Contains(e.Note, st.note) || !strings.Contains(e.Note, xds.AuthorizationType) {
			t.Errorf("step %d: note %q, want the type and %q", i, e.Note, st.note)
		}
	}
	evs := eventsAbout(t, zt.UID)
	for _, reason := range []string{discovery.ReasonConfigRejected, discovery.ReasonConfigAccepted} {
		if n := countReason(evs, reason); n != 1 {
			t.Errorf("%s recorded %d times, want once", reason, n)
		}
	}
	// Every NACK is counted, each push too; this stream is connected.
	metrics := []struct {
		name, label, value string
		atLeast            float64
	}{
		{"ambient_xds_rejects_total", "type", "istio.security.Authorization", 2},
		{"ambient_xds_pushes_total", "type", "istio.security.Authorization", 1},
		{"ambient_xds_connected_proxies", "role", xds.RoleZtunnel, 1},
	}
	for _, m := range metrics {
		if got := gatherValue(t, m.name, m.label, m.value); got < m.atLeast {
			t.Errorf("%s{%s=%q} = %v, want at least %v", m.name, m.label, m.value, got, m.atLeast)
		}
	}
}

// gatherValue reads one series of the manager's metrics registry.
func gatherValue(t *testing.T, name, label, value string) float64 {
	t.Helper()
	families, err := crmetrics.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == label && l.GetValue() == value {
					if c := m.GetCounter(); c != nil {
						return c.GetValue()
					}
					return m.GetGauge().GetValue()
				}
			}
		}
	}
	return 0
}

package controllers

import (
	"context"
	"crypto/x509"
	"fmt"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
	"github.com/ambientmesh/ambient/proxylib/ca"
	"github.com/ambientmesh/ambient/proxylib/kubeevents"
)

// wantEvent is an Event expected in the API server.
type wantEvent struct{ typ, reason string }

// eventsAbout lists the Events (events.k8s.io/v1) regarding the object
// with uid, with their reasons.
func eventsAbout(uid types.UID) ([]eventsv1.Event, error) {
	var list eventsv1.EventList
	if err := k8s.List(context.Background(), &list); err != nil {
		return nil, err
	}
	var out []eventsv1.Event
	for _, e := range list.Items {
		if e.Regarding.UID == uid {
			out = append(out, e)
		}
	}
	return out, nil
}

// waitEvent waits for an Event of the wanted type and reason regarding
// obj, recorded by the operator, and returns it.
func waitEvent(t *testing.T, obj client.Object, kind string, want wantEvent) eventsv1.Event {
	t.Helper()
	var found eventsv1.Event
	eventually(t, fmt.Sprintf("%s Event %s on %s %s", want.typ, want.reason, kind, obj.GetName()), func() error {
		evs, err := eventsAbout(obj.GetUID())
		if err != nil {
			return err
		}
		var seen []string
		for _, e := range evs {
			if e.Reason == want.reason && e.Type == want.typ {
				found = e
				return nil
			}
			seen = append(seen, e.Type+"/"+e.Reason)
		}
		return fmt.Errorf("have %v", seen)
	})
	r := found.Regarding
	if r.Kind != kind || r.Name != obj.GetName() || r.Namespace != obj.GetNamespace() || found.ReportingController != EventSource {
		t.Errorf("Event %s regards %s %s/%s from %q, want %s %s/%s from %q", found.Reason, r.Kind, r.Namespace, r.Name,
			found.ReportingController, kind, obj.GetNamespace(), obj.GetName(), EventSource)
	}
	return found
}

// checkOnce fails unless each reason was recorded once on uid (no second
// Event object, no series of repeats).
func checkOnce(t *testing.T, uid types.UID, reasons ...string) {
	t.Helper()
	count := func(evs []eventsv1.Event, reason string) int {
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
	// Events are recorded asynchronously: wait until each has arrived (a
	// reason no step waited for may still be on its way), then count.
	var evs []eventsv1.Event
	eventually(t, fmt.Sprintf("Events %v recorded", reasons), func() error {
		var err error
		if evs, err = eventsAbout(uid); err != nil {
			return err
		}
		for _, reason := range reasons {
			if count(evs, reason) == 0 {
				return fmt.Errorf("no %s yet", reason)
			}
		}
		return nil
	})
	for _, reason := range reasons {
		if n := count(evs, reason); n != 1 {
			t.Errorf("%s recorded %d times, want once", reason, n)
		}
	}
}

// resyncMesh makes the mesh reconcile again (a new namespace needs the
// trust bundle) and waits until it did.
func resyncMesh(t *testing.T, name string) {
	t.Helper()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name + "-resync"}}
	if err := k8s.Create(context.Background(), ns); err != nil {
		t.Fatal(err)
	}
	eventually(t, "trust bundle in "+ns.Name, exists(&corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: ns.Name, Name: RootCertConfigMap}}))
}

// expiringCASecret is a self-signed mesh CA whose intermediate has an hour
// of a 21-hour life left: the operator must rotate it.
func expiringCASecret(t *testing.T, ns string) *corev1.Secret {
	t.Helper()
	now := time.Now()
	rootCert, rootKey, err := ca.NewSelfSignedRoot("cluster.local", 10*365*24*time.Hour, now.Add(-20*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	root := &ca.Authority{Cert: rootCert, Key: rootKey, Roots: []*x509.Certificate{rootCert}, Now: func() time.Time { return now.Add(-20 * time.Hour) }}
	inter, err := ca.NewIntermediate(root, "cluster.local", 21*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	data, err := secretData(root, inter)
	if err != nil {
		t.Fatal(err)
	}
	return &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: CASecretName}, Data: data}
}

// TestMeshEvents: CA issuance, rotation and validity and ztunnel rollouts
// are recorded on the AmbientMesh, once per change.
func TestMeshEvents(t *testing.T) {
	ctx := context.Background()
	type step struct {
		what string
		do   func(t *testing.T, ns string)
		want []wantEvent
	}
	tests := []struct {
		name, ns string
		before   func(t *testing.T, ns string) // before the mesh exists
		mutate   func(*meshv1.AmbientMesh)
		steps    []step
		once     []string
	}{
		{
			name: "ev-selfsigned", ns: "mesh-ev-selfsigned",
			steps: []step{
				{"mesh created", nil, []wantEvent{{kubeevents.Normal, EventCAIssued}, {kubeevents.Normal, EventZtunnelRolloutStarted}}},
				{"ztunnel ready", func(t *testing.T, ns string) { setDaemonSetStatus(t, ns, ZtunnelName, 2, 2) },
					[]wantEvent{{kubeevents.Normal, EventZtunnelRolloutFinished}}},
				{"ztunnel loses a pod", func(t *testing.T, ns string) { setDaemonSetStatus(t, ns, ZtunnelName, 2, 1) },
					[]wantEvent{{kubeevents.Normal, EventZtunnelRolloutStarted}}},
			},
			once: []string{EventCAIssued, EventZtunnelRolloutFinished},
		},
		{
			name: "ev-rotate", ns: "mesh-ev-rotate",
			before: func(t *testing.T, ns string) {
				createNamespace(t, ns)
				if err := k8s.Create(ctx, expiringCASecret(t, ns)); err != nil {
					t.Fatal(err)
				}
			},
			steps: []step{{"mesh created over an expiring intermediate", nil, []wantEvent{{kubeevents.Normal, EventCARotated}}}},
			once:  []string{EventCARotated, EventZtunnelRolloutStarted},
		},
		{
			name: "ev-byo", ns: "mesh-ev-byo",
			mutate: func(m *meshv1.AmbientMesh) {
				m.Spec.TrustDomain = "byo.example"
				m.Spec.CA.Type = meshv1.CAFromSecret
				m.Spec.CA.SecretRef = &corev1.LocalObjectReference{Name: "user-ca"}
			},
			steps: []step{
				{"CA Secret missing", nil, []wantEvent{{kubeevents.Warning, EventCAInvalid}}},
				{"CA Secret created", func(t *testing.T, ns string) {
					s := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "user-ca"}, Data: userCAData(t, "byo.example")}
					if err := k8s.Create(ctx, s); err != nil {
						t.Fatal(err)
					}
				}, []wantEvent{{kubeevents.Normal, EventCAValid}}},
			},
			once: []string{EventCAInvalid, EventCAValid},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if tc.before != nil {
				tc.before(t, tc.ns)
			}
			mesh := newMesh(t, tc.name, tc.ns, tc.mutate)
			for _, s := range tc.steps {
				if s.do != nil {
					s.do(t, tc.ns)
				}
				for _, w := range s.want {
					e := waitEvent(t, mesh, "AmbientMesh", w)
					if e.Note == "" || e.Action == "" {
						t.Errorf("%s: %s has no note or action: %+v", s.what, w.reason, e)
					}
				}
			}
			resyncMesh(t, tc.name)
			checkOnce(t, mesh.UID, tc.once...)
		})
	}
}

// TestWaypointReadinessEvents: a waypoint, declared by a Gateway or a
// WaypointPolicy, records WaypointReady on its declaring object when its
// Deployment becomes ready and WaypointNotReady when it stops being so.
func TestWaypointReadinessEvents(t *testing.T) {
	ctx := context.Background()
	const ns = "wp-events"
	createNamespace(t, ns)
	newMesh(t, "wp-events", "mesh-wp-events", nil)
	tests := []struct {
		kind string
		obj  client.Object
	}{
		{"Gateway", waypointGateway(ns, "gw-waypoint", WaypointGatewayClass, nil)},
		{"WaypointPolicy", &meshv1.WaypointPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "policy-waypoint"}}},
	}
	for _, tc := range tests {
		t.Run(tc.kind, func(t *testing.T) {
			if err := k8s.Create(ctx, tc.obj); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = k8s.Delete(ctx, tc.obj) })
			eventually(t, "waypoint deployment", exists(&appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: tc.obj.GetName()}}))
			steps := []struct {
				ready int32
				want  wantEvent
			}{
				{1, wantEvent{kubeevents.Normal, EventWaypointReady}},
				{0, wantEvent{kubeevents.Warning, EventWaypointNotReady}},
			}
			for _, s := range steps {
				setDeploymentStatus(t, ns, tc.obj.GetName(), s.ready)
				e := waitEvent(t, tc.obj, tc.kind, s.want)
				if !strings.Contains(e.Note, "replicas") {
					t.Errorf("%s note %q does not say how many replicas are ready", e.Reason, e.Note)
				}
			}
			checkOnce(t, tc.obj.GetUID(), EventWaypointReady, EventWaypointNotReady)
		})
	}
}

// TestConditionChange: how condition lists become kubeevents changes.
func TestConditionChange(t *testing.T) {
	cond := func(status metav1.ConditionStatus, reason string) []metav1.Condition {
		return []metav1.Condition{{Type: "X", Status: status, Reason: reason, Message: "m"}}
	}
	ifTrue := &kubeevents.Event{Type: kubeevents.Normal, Reason: "Up"}
	ifFalse := &kubeevents.Event{Type: kubeevents.Warning, Reason: "Down"}
	tests := []struct {
		name          string
		before, after []metav1.Condition
		assume        string
		withReason    bool
		ok            bool
		wantAssume    string
		wantState     string
		wantReason    string
	}{
		{"no condition yet", nil, nil, "", false, false, "", "", ""},
		{"new condition, assumed", nil, cond("True", "A"), "False", false, true, "False", "True", "Up"},
		{"stored condition wins over the assumption", cond("True", "A"), cond("False", "B"), "False", false, true, "True", "False", "Down"},
		{"reason counts when asked", cond("False", "A"), cond("False", "B"), "", true, true, "False/A", "False/B", "Down"},
		{"true ignores the reason", cond("True", "A"), cond("True", "B"), "", true, true, "True", "True", "Up"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ch, ok := conditionChange(tc.before, tc.after, "X", tc.assume, tc.withReason, ifTrue, ifFalse)
			if ok != tc.ok || ch.Assume != tc.wantAssume || ch.State != tc.wantState || ch.Reason != tc.wantReason {
				t.Fatalf("got ok=%v %+v", ok, ch)
			}
			if ok && (ch.Topic != "X" || ch.Note != "m") {
				t.Fatalf("topic %q note %q", ch.Topic, ch.Note)
			}
		})
	}
}

package controllers

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/ambientmesh/ambient/controllers/waypointbind"
)

func serviceParent(ns, name string) gwv1.ParentReference {
	p := gwv1.ParentReference{Group: ptr.To[gwv1.Group](""), Kind: ptr.To[gwv1.Kind]("Service"), Name: gwv1.ObjectName(name)}
	if ns != "" {
		p.Namespace = ptr.To(gwv1.Namespace(ns))
	}
	return p
}

func withPort(p gwv1.ParentReference, port gwv1.PortNumber) gwv1.ParentReference {
	p.Port = &port
	return p
}

func gatewayParent(name string) gwv1.ParentReference {
	return gwv1.ParentReference{Name: gwv1.ObjectName(name)}
}

func backend(ns, name string) gwv1.BackendRef {
	b := gwv1.BackendRef{BackendObjectReference: gwv1.BackendObjectReference{Name: gwv1.ObjectName(name), Port: ptr.To[gwv1.PortNumber](80)}}
	if ns != "" {
		b.Namespace = ptr.To(gwv1.Namespace(ns))
	}
	return b
}

func httpRoute(ns, name string, parents []gwv1.ParentReference, backends ...gwv1.BackendRef) *gwv1.HTTPRoute {
	r := &gwv1.HTTPRoute{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
	r.Spec.ParentRefs = parents
	rule := gwv1.HTTPRouteRule{}
	for _, b := range backends {
		rule.BackendRefs = append(rule.BackendRefs, gwv1.HTTPBackendRef{BackendRef: b})
	}
	r.Spec.Rules = []gwv1.HTTPRouteRule{rule}
	return r
}

func createService(t *testing.T, ns, name string, labels map[string]string) {
	t.Helper()
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: labels},
		Spec:       corev1.ServiceSpec{Selector: map[string]string{"app": name}, Ports: []corev1.ServicePort{{Name: "http", Port: 80}}},
	}
	if err := k8s.Create(context.Background(), svc); err != nil {
		t.Fatal(err)
	}
}

func createLabelledNamespace(t *testing.T, name string, labels map[string]string) {
	t.Helper()
	createNamespace(t, name)
	if len(labels) == 0 {
		return
	}
	if err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		ns := &corev1.Namespace{}
		if err := k8s.Get(context.Background(), client.ObjectKey{Name: name}, ns); err != nil {
			return err
		}
		ns.Labels = mergeLabels(ns.Labels, labels)
		return k8s.Update(context.Background(), ns)
	}); err != nil {
		t.Fatal(err)
	}
}

// wantCond is one expected condition of our entry: "Type=Status/Reason".
type wantCond string

// ourParents returns our entries keyed by parent name.
func ourParents(st gwv1.RouteStatus) map[string]gwv1.RouteParentStatus {
	out := map[string]gwv1.RouteParentStatus{}
	for _, p := range st.Parents {
		if p.ControllerName == WaypointControllerName {
			out[string(p.ParentRef.Name)] = p
		}
	}
	return out
}

// checkParents compares our entries with want (parent name → conditions);
// every condition must be for the route's current generation.
func checkParents(st gwv1.RouteStatus, gen int64, want map[string][]wantCond) error {
	got := ourParents(st)
	if len(got) != len(want) {
		return fmt.Errorf("our parents %v, want %d: %+v", keysOf(got), len(want), st.Parents)
	}
	for name, conds := range want {
		p, ok := got[name]
		if !ok {
			return fmt.Errorf("no entry for parent %s: %+v", name, st.Parents)
		}
		for _, w := range conds {
			typ, rest, _ := strings.Cut(string(w), "=")
			status, reason, _ := strings.Cut(rest, "/")
			c := meta.FindStatusCondition(p.Conditions, typ)
			if c == nil || string(c.Status) != status || c.Reason != reason || c.ObservedGeneration != gen {
				return fmt.Errorf("parent %s: want %s, have %+v", name, w, p.Conditions)
			}
		}
	}
	return nil
}

func keysOf[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

func waitRouteParents(t *testing.T, route client.Object, want map[string][]wantCond) {
	t.Helper()
	eventually(t, fmt.Sprintf("route %s parents %v", route.GetName(), want), func() error {
		if err := k8s.Get(context.Background(), client.ObjectKeyFromObject(route), route); err != nil {
			return err
		}
		return checkParents(*routeStatusOf(route), route.GetGeneration(), want)
	})
}

const (
	acceptedOK    wantCond = "Accepted=True/Accepted"
	resolvedOK    wantCond = "ResolvedRefs=True/ResolvedRefs"
	waypointOK    wantCond = "ResolvedWaypoints=True/ResolvedWaypoints"
	noParent      wantCond = "Accepted=False/NoMatchingParent"
	noWaypoint    wantCond = "ResolvedWaypoints=False/NoWaypoint"
	notListeners  wantCond = "Accepted=False/NotAllowedByListeners"
	backendAbsent wantCond = "ResolvedRefs=False/BackendNotFound"
)

// TestRouteStatus: the seeds' GAMMA route and its failure modes get our
// RouteParentStatus entries, as the waypoint would treat them.
func TestRouteStatus(t *testing.T) {
	ctx := context.Background()
	const app, other, bare = "rs-app", "rs-other", "rs-bare"
	// The seeds: an ambient namespace using a waypoint Gateway.
	createLabelledNamespace(t, app, map[string]string{LabelDataplaneMode: "ambient", waypointbind.UseWaypointLabel: "waypoint"})
	createLabelledNamespace(t, other, nil)
	createLabelledNamespace(t, bare, map[string]string{LabelDataplaneMode: "ambient"})
	t.Cleanup(func() {
		for _, ns := range []string{app, other, bare} {
			_ = k8s.DeleteAllOf(ctx, &gwv1.HTTPRoute{}, client.InNamespace(ns))
			_ = k8s.DeleteAllOf(ctx, &gwv1.GRPCRoute{}, client.InNamespace(ns))
			_ = k8s.DeleteAllOf(ctx, &gwv1.Gateway{}, client.InNamespace(ns))
		}
	})
	if err := k8s.Create(ctx, waypointGateway(app, "waypoint", WaypointGatewayClass, nil)); err != nil {
		t.Fatal(err)
	}
	if err := k8s.Create(ctx, waypointGateway(app, "ingress", "some-ingress", nil)); err != nil {
		t.Fatal(err)
	}
	for _, s := range []struct{ ns, name string }{{app, "echo"}, {app, "echo-v1"}, {other, "remote"}, {bare, "plain"}} {
		createService(t, s.ns, s.name, nil)
	}

	foreignKind := backend("", "thing")
	foreignKind.Group, foreignKind.Kind = ptr.To[gwv1.Group]("example.com"), ptr.To[gwv1.Kind]("Thing")
	cases := []struct {
		name  string
		route *gwv1.HTTPRoute
		want  map[string][]wantCond
	}{
		{"seeds", httpRoute(app, "echo", []gwv1.ParentReference{serviceParent("", "echo")}, backend("", "echo-v1")),
			map[string][]wantCond{"echo": {acceptedOK, resolvedOK, waypointOK}}},
		{"missing parent Service", httpRoute(app, "ghost", []gwv1.ParentReference{serviceParent("", "ghost")}, backend("", "echo-v1")),
			map[string][]wantCond{"ghost": {noParent, resolvedOK, "ResolvedWaypoints=False/NoWaypoint"}}},
		{"missing backend", httpRoute(app, "nobackend", []gwv1.ParentReference{serviceParent("", "echo")}, backend("", "echo-v1"), backend("", "gone")),
			map[string][]wantCond{"echo": {acceptedOK, backendAbsent}}},
		// A mesh route needs no ReferenceGrant for a backend elsewhere
		// (GEP-1294); a missing one is still not found.
		{"cross-namespace backend", httpRoute(app, "crossns", []gwv1.ParentReference{serviceParent("", "echo")}, backend(other, "remote")),
			map[string][]wantCond{"echo": {acceptedOK, resolvedOK}}},
		{"unsupported backend kind", httpRoute(app, "kind", []gwv1.ParentReference{serviceParent("", "echo")}, foreignKind),
			map[string][]wantCond{"echo": {acceptedOK, "ResolvedRefs=False/InvalidKind"}}},
		{"Service without waypoint", httpRoute(bare, "plain", []gwv1.ParentReference{serviceParent("", "plain")}, backend("", "plain")),
			map[string][]wantCond{"plain": {acceptedOK, resolvedOK, noWaypoint}}},
		{"consumer route for a Service elsewhere", httpRoute(bare, "consumer", []gwv1.ParentReference{serviceParent(app, "echo")}, backend("", "plain")),
			map[string][]wantCond{"echo": {acceptedOK, resolvedOK, waypointOK}}},
		{"waypoint Gateway parent", httpRoute(app, "to-waypoint", []gwv1.ParentReference{gatewayParent("waypoint")}, backend("", "echo-v1")),
			map[string][]wantCond{"waypoint": {notListeners, resolvedOK}}},
		{"other Gateways are not ours", httpRoute(app, "ingress", []gwv1.ParentReference{gatewayParent("ingress"), gatewayParent("absent"), serviceParent("", "echo")}, backend("", "echo-v1")),
			map[string][]wantCond{"echo": {acceptedOK}}},
		// A parentRef port scopes the route to that Service port
		// (HTTPRouteParentRefPort); a port the Service lacks matches no parent.
		{"parentRef port of the Service", httpRoute(app, "port80", []gwv1.ParentReference{withPort(serviceParent("", "echo"), 80)}, backend("", "echo-v1")),
			map[string][]wantCond{"echo": {acceptedOK, resolvedOK, waypointOK}}},
		{"parentRef port the Service lacks", httpRoute(app, "port9999", []gwv1.ParentReference{withPort(serviceParent("", "echo"), 9999)}, backend("", "echo-v1")),
			map[string][]wantCond{"echo": {noParent, resolvedOK}}},
		{"cross-namespace backend missing", httpRoute(app, "crossns-gone", []gwv1.ParentReference{serviceParent("", "echo")}, backend(other, "nowhere")),
			map[string][]wantCond{"echo": {acceptedOK, backendAbsent}}},
	}
	for _, tc := range cases {
		if err := k8s.Create(ctx, tc.route); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) { waitRouteParents(t, tc.route, tc.want) })
	}

	// GRPCRoutes get the same.
	gr := &gwv1.GRPCRoute{ObjectMeta: metav1.ObjectMeta{Namespace: app, Name: "grpc"}}
	gr.Spec.ParentRefs = []gwv1.ParentReference{serviceParent("", "echo")}
	gr.Spec.Rules = []gwv1.GRPCRouteRule{{BackendRefs: []gwv1.GRPCBackendRef{{BackendRef: backend("", "gone")}}}}
	if err := k8s.Create(ctx, gr); err != nil {
		t.Fatal(err)
	}
	waitRouteParents(t, gr, map[string][]wantCond{"echo": {acceptedOK, backendAbsent, waypointOK}})

	// What the routes refer to changes: status follows without route edits.
	createService(t, app, "ghost", nil)
	waitRouteParents(t, cases[1].route, map[string][]wantCond{"ghost": {acceptedOK, waypointOK}})
	createService(t, app, "gone", nil)
	waitRouteParents(t, cases[2].route, map[string][]wantCond{"echo": {acceptedOK, resolvedOK}})
	waitRouteParents(t, gr, map[string][]wantCond{"echo": {acceptedOK, resolvedOK}})
	setNamespaceLabel(t, bare, waypointbind.UseWaypointLabel, "waypoint")
	setNamespaceLabel(t, bare, waypointbind.UseWaypointNamespaceLabel, app)
	waitRouteParents(t, cases[5].route, map[string][]wantCond{"plain": {acceptedOK, waypointOK}})
	setNamespaceLabel(t, app, waypointbind.UseWaypointLabel, "none") // opts out of the namespace waypoint too
	waitRouteParents(t, cases[0].route, map[string][]wantCond{"echo": {acceptedOK, noWaypoint}})
	setNamespaceLabel(t, app, waypointbind.UseWaypointLabel, "waypoint")
	waitRouteParents(t, cases[0].route, map[string][]wantCond{"echo": {acceptedOK, waypointOK}})
	if err := k8s.Delete(ctx, &gwv1.Gateway{ObjectMeta: metav1.ObjectMeta{Namespace: app, Name: "waypoint"}}); err != nil {
		t.Fatal(err)
	}
	waitRouteParents(t, cases[0].route, map[string][]wantCond{"echo": {acceptedOK, "ResolvedWaypoints=False/WaypointNotFound"}})
}

// setNamespaceLabel sets (or, with value "", removes) one namespace label.
func setNamespaceLabel(t *testing.T, name, key, value string) {
	t.Helper()
	if err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		ns := &corev1.Namespace{}
		if err := k8s.Get(context.Background(), client.ObjectKey{Name: name}, ns); err != nil {
			return err
		}
		if value == "" {
			delete(ns.Labels, key)
		} else {
			ns.Labels = mergeLabels(ns.Labels, map[string]string{key: value})
		}
		return k8s.Update(context.Background(), ns)
	}); err != nil {
		t.Fatal(err)
	}
}

// TestRouteStatusSharesParents: status.parents is shared with other
// controllers: their entries survive our writes, our entries for removed
// parentRefs go, and a reconcile that changes nothing writes nothing.
func TestRouteStatusSharesParents(t *testing.T) {
	ctx := context.Background()
	const ns = "rs-shared"
	createLabelledNamespace(t, ns, nil)
	t.Cleanup(func() { _ = k8s.DeleteAllOf(ctx, &gwv1.HTTPRoute{}, client.InNamespace(ns)) })
	createService(t, ns, "echo", nil)
	createService(t, ns, "echo-v1", nil)
	route := httpRoute(ns, "echo", []gwv1.ParentReference{serviceParent("", "echo"), serviceParent("", "extra")}, backend("", "echo-v1"))
	if err := k8s.Create(ctx, route); err != nil {
		t.Fatal(err)
	}
	waitRouteParents(t, route, map[string][]wantCond{"echo": {acceptedOK}, "extra": {noParent}})

	// Another controller reports on the same parent.
	theirs := gwv1.RouteParentStatus{
		ParentRef: serviceParent("", "echo"), ControllerName: "example.com/other-mesh",
		Conditions: []metav1.Condition{{Type: "Accepted", Status: metav1.ConditionTrue, Reason: "Accepted", LastTransitionTime: metav1.Now()}},
	}
	if err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		if err := k8s.Get(ctx, client.ObjectKeyFromObject(route), route); err != nil {
			return err
		}
		route.Status.Parents = append([]gwv1.RouteParentStatus{theirs}, route.Status.Parents...)
		return k8s.Status().Update(ctx, route)
	}); err != nil {
		t.Fatal(err)
	}

	// Removing a parentRef removes our entry and only ours.
	if err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		if err := k8s.Get(ctx, client.ObjectKeyFromObject(route), route); err != nil {
			return err
		}
		route.Spec.ParentRefs = route.Spec.ParentRefs[:1]
		return k8s.Update(ctx, route)
	}); err != nil {
		t.Fatal(err)
	}
	waitRouteParents(t, route, map[string][]wantCond{"echo": {acceptedOK}})
	if len(route.Status.Parents) != 2 || route.Status.Parents[0].ControllerName != "example.com/other-mesh" {
		t.Fatalf("other controller's entry not kept in place: %+v", route.Status.Parents)
	}

	// Nothing changed: the reconcile a label edit causes writes nothing. A
	// second route, queued after it, tells when that reconcile is done (one
	// worker, first in first out).
	if err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		if err := k8s.Get(ctx, client.ObjectKeyFromObject(route), route); err != nil {
			return err
		}
		route.Labels = map[string]string{"touched": "yes"}
		return k8s.Update(ctx, route)
	}); err != nil {
		t.Fatal(err)
	}
	rv := route.ResourceVersion
	barrier := httpRoute(ns, "barrier", []gwv1.ParentReference{serviceParent("", "echo")}, backend("", "echo-v1"))
	if err := k8s.Create(ctx, barrier); err != nil {
		t.Fatal(err)
	}
	waitRouteParents(t, barrier, map[string][]wantCond{"echo": {acceptedOK}})
	if err := k8s.Get(ctx, client.ObjectKeyFromObject(route), route); err != nil {
		t.Fatal(err)
	}
	if route.ResourceVersion != rv {
		t.Fatalf("status rewritten without a change: resourceVersion %s → %s: %+v", rv, route.ResourceVersion, route.Status.Parents)
	}
}

func TestMergeParentStatuses(t *testing.T) {
	old := metav1.NewTime(metav1.Now().Add(-time.Hour))
	cond := func(typ string, s metav1.ConditionStatus) metav1.Condition {
		return metav1.Condition{Type: typ, Status: s, Reason: typ, LastTransitionTime: old}
	}
	entry := func(ctrl gwv1.GatewayController, parent string, conds ...metav1.Condition) gwv1.RouteParentStatus {
		return gwv1.RouteParentStatus{ParentRef: serviceParent("", parent), ControllerName: ctrl, Conditions: conds}
	}
	theirs := entry("example.com/other", "a", cond("Accepted", metav1.ConditionTrue))
	cases := []struct {
		name      string
		current   []gwv1.RouteParentStatus
		ours      []gwv1.RouteParentStatus
		want      []string // controller/parent, in order
		keepsTime bool     // our "a" entry keeps its transition time
	}{
		{"first write appends after others", []gwv1.RouteParentStatus{theirs},
			[]gwv1.RouteParentStatus{entry(WaypointControllerName, "a", cond("Accepted", metav1.ConditionTrue))},
			[]string{"example.com/other/a", string(WaypointControllerName) + "/a"}, false},
		{"ours updated in place, unchanged status keeps time",
			[]gwv1.RouteParentStatus{entry(WaypointControllerName, "a", cond("Accepted", metav1.ConditionTrue)), theirs},
			[]gwv1.RouteParentStatus{entry(WaypointControllerName, "a", cond("Accepted", metav1.ConditionTrue))},
			[]string{string(WaypointControllerName) + "/a", "example.com/other/a"}, true},
		{"removed parentRef drops only our entry",
			[]gwv1.RouteParentStatus{theirs, entry(WaypointControllerName, "a"), entry(WaypointControllerName, "b")},
			[]gwv1.RouteParentStatus{entry(WaypointControllerName, "b")},
			[]string{"example.com/other/a", string(WaypointControllerName) + "/b"}, false},
		{"nothing of ours", []gwv1.RouteParentStatus{theirs, entry(WaypointControllerName, "a")}, nil,
			[]string{"example.com/other/a"}, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			for i := range tc.ours {
				for j := range tc.ours[i].Conditions {
					tc.ours[i].Conditions[j].LastTransitionTime = metav1.Now()
				}
			}
			got := mergeParentStatuses(tc.current, tc.ours, "ns")
			var names []string
			for _, p := range got {
				names = append(names, string(p.ControllerName)+"/"+string(p.ParentRef.Name))
			}
			if strings.Join(names, ",") != strings.Join(tc.want, ",") {
				t.Fatalf("got %v, want %v", names, tc.want)
			}
			if tc.keepsTime {
				if c := meta.FindStatusCondition(got[0].Conditions, "Accepted"); !c.LastTransitionTime.Equal(&old) {
					t.Errorf("transition time reset: %v", c.LastTransitionTime)
				}
			}
		})
	}
}

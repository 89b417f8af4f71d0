package waypointbind

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
)

func scope(nsLabels map[string]string, wps ...*Waypoint) Scope {
	ix := Index{}
	for _, w := range wps {
		ix.Add(w)
	}
	return Scope{Namespace: &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "app", Labels: nsLabels}},
		Name: "app", Local: ix["app"], Lookup: ix.Lookup}
}

func wp(name, sa, traffic string) *Waypoint {
	return &Waypoint{Namespace: "app", Name: name, ServiceAccount: sa, TrafficType: traffic}
}

func TestForService(t *testing.T) {
	use := func(name string) map[string]string { return map[string]string{UseWaypointLabel: name} }
	for _, c := range []struct {
		name      string
		nsLabels  map[string]string
		svcLabels map[string]string
		wps       []*Waypoint
		want      string // waypoint name, "" = none
	}{
		{"no waypoint", nil, nil, nil, ""},
		{"namespace waypoint for services", nil, nil, []*Waypoint{wp("ns", "", TrafficService)}, "ns"},
		{"namespace waypoint for workloads only", nil, nil, []*Waypoint{wp("ns", "", TrafficWorkload)}, ""},
		{"first namespace waypoint by name", nil, nil, []*Waypoint{wp("b", "", TrafficAll), wp("a", "", TrafficAll)}, "a"},
		{"service label wins", nil, use("b"), []*Waypoint{wp("a", "", TrafficAll), wp("b", "", TrafficService)}, "b"},
		{"service label none opts out", nil, use("none"), []*Waypoint{wp("a", "", TrafficAll)}, ""},
		{"service label to an undeclared waypoint fails closed", nil, use("ghost"), nil, "ghost"},
		{"namespace label", use("b"), nil, []*Waypoint{wp("a", "", TrafficAll), wp("b", "", TrafficAll)}, "b"},
		{"namespace label to a workload waypoint binds no service", use("w"), nil, []*Waypoint{wp("w", "", TrafficWorkload)}, ""},
		{"namespace label to a waypoint for no traffic", use("n"), nil, []*Waypoint{wp("n", "", TrafficNone)}, ""},
		{"service label to a workload-only waypoint binds nothing (Istio)", nil, use("w"), []*Waypoint{wp("w", "", TrafficWorkload)}, ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "app", Name: "echo", Labels: c.svcLabels}}
			b, ok := ForService(scope(c.nsLabels, c.wps...), svc)
			if got := map[bool]string{true: b.Name}[ok]; got != c.want {
				t.Fatalf("bound to %q (ok=%v), want %q", got, ok, c.want)
			}
		})
	}
	// A waypoint's own Service never gets a waypoint.
	own := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "app", Name: "ns"}}
	if b, ok := ForService(scope(nil, wp("ns", "", TrafficAll)), own); ok {
		t.Fatalf("waypoint's own Service bound to %v", b)
	}
}

func TestForPod(t *testing.T) {
	pod := func(labels map[string]string) *corev1.Pod {
		return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "app", Name: "p", Labels: labels}}
	}
	for _, c := range []struct {
		name string
		pod  *corev1.Pod
		wps  []*Waypoint
		want string
	}{
		{"service-account waypoint wins over the namespace one", pod(nil), []*Waypoint{wp("ns", "", TrafficAll), wp("sa", "echo", TrafficService)}, "sa"},
		{"namespace waypoint for workloads", pod(nil), []*Waypoint{wp("ns", "", TrafficWorkload)}, "ns"},
		{"namespace waypoint for services only", pod(nil), []*Waypoint{wp("ns", "", TrafficService)}, ""},
		{"pod label wins over the service account", pod(map[string]string{UseWaypointLabel: "x"}), []*Waypoint{wp("sa", "echo", TrafficAll), wp("x", "", TrafficAll)}, "x"},
		{"pod label none", pod(map[string]string{UseWaypointLabel: "none"}), []*Waypoint{wp("sa", "echo", TrafficAll)}, ""},
		{"pod label to a service-only waypoint binds nothing (Istio)", pod(map[string]string{UseWaypointLabel: "x"}), []*Waypoint{wp("x", "", TrafficService)}, ""},
		{"pod label to an undeclared waypoint fails closed", pod(map[string]string{UseWaypointLabel: "ghost"}), nil, "ghost"},
	} {
		t.Run(c.name, func(t *testing.T) {
			b, ok := ForPod(scope(nil, c.wps...), c.pod, "echo")
			if got := map[bool]string{true: b.Name}[ok]; got != c.want {
				t.Fatalf("bound to %q (ok=%v), want %q", got, ok, c.want)
			}
		})
	}
}

// TestPolicyWinsOverGateway: whichever is listed first.
func TestPolicyWinsOverGateway(t *testing.T) {
	gw, _ := FromGatewayObject(&gwv1.Gateway{ObjectMeta: metav1.ObjectMeta{Namespace: "app", Name: "w"},
		Spec: gwv1.GatewaySpec{GatewayClassName: GatewayClass}})
	pol, _ := FromPolicy(&meshv1.WaypointPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "app", Name: "w"},
		Spec: meshv1.WaypointPolicySpec{TrafficType: meshv1.TrafficAll}})
	for _, order := range [][]*Waypoint{{gw, pol}, {pol, gw}} {
		ix := Index{}
		for _, w := range order {
			ix.Add(w)
		}
		if got := ix.Lookup("app", "w"); got.FromGateway || got.TrafficType != TrafficAll {
			t.Fatalf("kept %+v, want the WaypointPolicy", got)
		}
	}
	if _, ok := FromGatewayObject(&gwv1.Gateway{Spec: gwv1.GatewaySpec{GatewayClassName: "istio"}}); ok {
		t.Fatal("a Gateway of another class declared a waypoint")
	}
	if gw.TrafficType != TrafficService {
		t.Fatalf("Gateway default traffic %q, want service (Istio's default)", gw.TrafficType)
	}
}

func TestIngressClass(t *testing.T) {
	ours := func(name string) *gwv1.GatewayClass {
		return &gwv1.GatewayClass{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: gwv1.GatewayClassSpec{ControllerName: ControllerName}}
	}
	params := ours("with-params")
	params.Spec.ParametersRef = &gwv1.ParametersReference{Kind: "ConfigMap", Name: "x"}
	foreign := &gwv1.GatewayClass{ObjectMeta: metav1.ObjectMeta{Name: "istio"}, Spec: gwv1.GatewayClassSpec{ControllerName: "istio.io/gateway-controller"}}
	for _, tc := range []struct {
		name string
		gc   *gwv1.GatewayClass
		want bool
	}{
		{IngressGatewayClass, nil, true}, // built-in, being created
		{IngressGatewayClass, ours(IngressGatewayClass), true},
		{IngressGatewayClass, foreign, false},
		{"second", ours("second"), true},
		{"second", nil, false},
		{GatewayClass, ours(GatewayClass), false}, // the waypoint class
		{GatewayClass, nil, false},
		{"with-params", params, false},
	} {
		if got := IngressClass(tc.name, tc.gc); got != tc.want {
			t.Errorf("IngressClass(%s, %+v) = %v, want %v", tc.name, tc.gc, got, tc.want)
		}
	}
	if ParametersProblem(params) == "" || ParametersProblem(ours("x")) != "" {
		t.Errorf("ParametersProblem: %q / %q", ParametersProblem(params), ParametersProblem(ours("x")))
	}
	// A ConfigMap with its namespace is served (its content is checked
	// where it is read); any other kind is not.
	cm := ours("cm")
	cm.Spec.ParametersRef = &gwv1.ParametersReference{Kind: "ConfigMap", Name: "x", Namespace: ptr.To(gwv1.Namespace("ns"))}
	crd := ours("crd")
	crd.Spec.ParametersRef = &gwv1.ParametersReference{Group: "example.com", Kind: "GatewayParams", Name: "x", Namespace: ptr.To(gwv1.Namespace("ns"))}
	if !IngressClass("cm", cm) || ParametersProblem(cm) != "" || IngressClass("crd", crd) || ParametersProblem(crd) == "" {
		t.Errorf("ConfigMap reference %q, CRD reference %q", ParametersProblem(cm), ParametersProblem(crd))
	}
}

func TestIngressUseWaypoint(t *testing.T) {
	l := func(v string) map[string]string { return map[string]string{IngressUseWaypointLabel: v} }
	for _, c := range []struct {
		name    string
		svc, ns map[string]string
		want    bool
	}{
		{"no label anywhere", nil, nil, false},
		{"service true", l("true"), nil, true},
		{"service True (Go boolean)", l("True"), nil, true},
		{"service 1", l("1"), nil, true},
		{"namespace true", nil, l("true"), true},
		{"service false beats namespace true", l("false"), l("true"), false},
		{"service true beats namespace false", l("true"), l("false"), true},
		{"invalid value is false", l("yes"), nil, false},
		{"invalid service value does not fall back to the namespace", l("yes"), l("true"), false},
		{"empty service value is false", l(""), l("true"), false},
		{"other labels only", map[string]string{"app": "x"}, map[string]string{"app": "y"}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got := IngressUseWaypoint(c.svc, c.ns); got != c.want {
				t.Fatalf("IngressUseWaypoint(%v, %v) = %v, want %v", c.svc, c.ns, got, c.want)
			}
		})
	}
}

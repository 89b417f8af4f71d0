package controlplane

import (
	"context"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/ambientmesh/ambient/controllers/waypointbind"
)

// TestIngressClasses: Gateways of every class naming our controllerName are
// ingress gateways to the control plane (their proxies get the L7
// configuration and identity), as class istio's; another controller's
// class, and ours with a parameters kind we cannot serve (only ConfigMaps
// are), are not.
func TestIngressClasses(t *testing.T) {
	ctx := context.Background()
	const ns = "cp-classes"
	ensureNamespace(t, ns, nil)
	classes := []*gwv1.GatewayClass{
		{ObjectMeta: metav1.ObjectMeta{Name: "cp-second"}, Spec: gwv1.GatewayClassSpec{ControllerName: waypointbind.ControllerName}},
		{ObjectMeta: metav1.ObjectMeta{Name: "cp-foreign"}, Spec: gwv1.GatewayClassSpec{ControllerName: "example.com/gateway-controller"}},
		{ObjectMeta: metav1.ObjectMeta{Name: "cp-params"}, Spec: gwv1.GatewayClassSpec{ControllerName: waypointbind.ControllerName,
			ParametersRef: &gwv1.ParametersReference{Group: "example.com", Kind: "GatewayOptions", Name: "options", Namespace: ptrTo(gwv1.Namespace(ns))}}},
	}
	for _, gc := range classes {
		if err := s.k8s.Create(ctx, gc); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = s.k8s.Delete(context.Background(), gc) })
	}
	// The served one last: once it is known, the others were seen too.
	for _, gw := range []struct{ name, class string }{{"foreign", "cp-foreign"}, {"params", "cp-params"}, {"builtin", "istio"}, {"second", "cp-second"}} {
		obj := &gwv1.Gateway{ObjectMeta: metav1.ObjectMeta{Name: gw.name, Namespace: ns},
			Spec: gwv1.GatewaySpec{GatewayClassName: gwv1.ObjectName(gw.class), Listeners: []gwv1.Listener{{Name: "http", Port: 80, Protocol: "HTTP"}}}}
		if err := s.k8s.Create(ctx, obj); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = s.k8s.Delete(context.Background(), obj) })
	}
	eventually(t, "gateway of the second class known", func() bool { return s.cp.Discovery.IsL7Proxy(ns, "second-istio") })
	if !s.cp.Discovery.IsL7Proxy(ns, "builtin-istio") {
		t.Errorf("a Gateway of class istio (no GatewayClass object) is not an ingress gateway")
	}
	time.Sleep(500 * time.Millisecond)
	for _, account := range []string{"foreign-istio", "params-istio"} {
		if s.cp.Discovery.IsL7Proxy(ns, account) {
			t.Errorf("%s is taken for an ingress gateway's proxy", account)
		}
	}
	// The parameters removed, its Gateway is served.
	gc := &gwv1.GatewayClass{}
	if err := s.k8s.Get(ctx, client.ObjectKey{Name: "cp-params"}, gc); err != nil {
		t.Fatal(err)
	}
	gc.Spec.ParametersRef = nil
	if err := s.k8s.Update(ctx, gc); err != nil {
		t.Fatal(err)
	}
	eventually(t, "gateway known once its class is served", func() bool { return s.cp.Discovery.IsL7Proxy(ns, "params-istio") })
}

package waypoint

import (
	"context"
	"net/netip"
	"testing"
	"time"

	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	"sigs.k8s.io/yaml"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/netnsutil"
	"github.com/ambientmesh/ambient/proxylib/waypoint"
	"github.com/ambientmesh/ambient/test/meshtest"
)

// TestIngressUseWaypointLabel: istio.io/ingress-use-waypoint from the
// Service or namespace in a real API server, through the control plane's
// real model, to a real ingress gateway in a network namespace. httpbin's
// Service is bound to the waypoint (mesh clients go through it: 403 on
// /denied); the gateway goes through it only when the Service, or else its
// namespace, says true.
func TestIngressUseWaypointLabel(t *testing.T) {
	lm := newLabelMesh(t)
	m, k := lm.m, lm.k
	gwState := m.NewWaypointState()
	gwPod := m.AddPod(m.Nodes[0], "gateway-1", "gateway", false)
	outside := m.AddPod(m.Nodes[0], "outside-1", "outside", false)
	srv := m.RunWaypoint(gwPod, waypoint.Config{Name: "gateway", Namespace: meshtest.Namespace, Ingress: true, State: gwState,
		Log: m.Logs.Logger("gateway"), RootNamespace: meshtest.RootNamespace})
	// The gateway's HTTP listener, as cmd/waypoint's gateway.Listeners
	// serves it.
	f, err := gwPod.Open()
	if err != nil {
		t.Fatal(err)
	}
	ln, err := netnsutil.ListenTCP(f, ":8080", netnsutil.SocketOptions{})
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go srv.ServeIngress(context.Background(), c, 8080)
		}
	}()
	var gw gwv1.Gateway
	var route gwv1.HTTPRoute
	for obj, y := range map[any]string{&gw: `
metadata: {name: gateway, namespace: default}
spec:
  gatewayClassName: istio
  listeners: [{name: http, port: 8080, protocol: HTTP}]
`, &route: `
metadata: {name: httpbin, namespace: default}
spec:
  parentRefs: [{name: gateway}]
  rules: [{backendRefs: [{name: httpbin, port: 80}]}]
`} {
		if err := yaml.Unmarshal([]byte(y), obj); err != nil {
			t.Fatal(err)
		}
	}
	k.create(t, &gw, &route)
	k.label(t, lm.svc, useWaypoint, "waypoint", useWaypointNamespace, "wp")

	ingress := netip.AddrPortFrom(gwPod.IP, 8080)
	hasResource := func() bool {
		for _, r := range gwState.L7Resources() {
			if r.Kind == discovery.IngressUseWaypointKind && r.Namespace == "default" && r.Name == "httpbin" {
				return true
			}
		}
		return false
	}
	// step waits for the control plane's word to reach the gateway, then
	// checks where the gateway sends.
	step := func(name string, through bool) {
		t.Run(name, func(t *testing.T) {
			for deadline := time.Now().Add(15 * time.Second); hasResource() != through; time.Sleep(20 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatalf("the gateway never learnt ingress-use-waypoint=%v", through)
				}
			}
			want := 200
			if through {
				want = 403
			}
			// The route reaches the gateway with the first push; 404 until then.
			code, body, err := 0, "", error(nil)
			for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
				if code, body, err = do(outside, "GET", ingress, "/denied"); err == nil && code != 404 {
					break
				}
			}
			if err != nil || code != want {
				t.Fatalf("GET %s/denied through the gateway: %d %q %v; want %d (through the waypoint: %v)", ingress, code, body, err, want, through)
			}
			// Mesh clients go through the waypoint all along.
			if code, _, err := do(lm.sleep, "GET", lm.svcVIP, "/denied"); err != nil || code != 403 {
				t.Fatalf("sleep -> httpbin /denied: %d %v; want 403 from the waypoint", code, err)
			}
		})
	}
	step("Service bound to a waypoint, no label: the gateway goes straight to the pod", false)
	k.label(t, lm.svc, "istio.io/ingress-use-waypoint", "true")
	step("Service labelled true: through the waypoint", true)
	k.label(t, lm.svc, "istio.io/ingress-use-waypoint", "false")
	k.label(t, lm.defaultNS, "istio.io/ingress-use-waypoint", "true")
	step("Service false beats namespace true", false)
	k.label(t, lm.svc, "istio.io/ingress-use-waypoint", "")
	step("namespace true: through the waypoint", true)
}

package waypoint

import (
	"net/netip"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/waypoint"
	"github.com/ambientmesh/ambient/test/meshtest"
)

// Istio's labels, as users write them.
const (
	useWaypoint          = "istio.io/use-waypoint"
	useWaypointNamespace = "istio.io/use-waypoint-namespace"
	waypointFor          = "istio.io/waypoint-for"
)

// labelMesh: sleep (node1) and httpbin (node2, Service httpbin) in
// namespace default, in the mesh; the waypoint "waypoint" of namespace wp
// (node2), denying /denied; the same objects in a real API server read by
// the control plane's real model (startK8sModel).
type labelMesh struct {
	m                     *meshtest.Mesh
	k                     *k8sModel
	sleep, httpbin, wpPod *meshtest.Pod
	defaultNS             *corev1.Namespace
	gw                    *gwv1.Gateway
	svc                   *corev1.Service
	httpbinPod            *corev1.Pod
	svcVIP                netip.AddrPort
	svcKey                string
}

func newLabelMesh(t *testing.T) *labelMesh {
	m := newMesh(t, 2)
	m.SyncAll()
	wpState := m.NewWaypointState()
	k := startK8sModel(t, m)

	// The waypoint's netns pod: not captured; its workload comes from the
	// model (namespace wp), so the harness's own one goes.
	wpPod := m.AddPod(m.Nodes[1], "waypoint-1", "waypoint", false)
	m.CP.Remove(discovery.AddressType, wpPod.UID)
	wpPod.Namespace = "wp"
	m.RunWaypoint(wpPod, waypoint.Config{Name: "waypoint", Namespace: "wp", State: wpState, Log: m.Logs.Logger("waypoint"),
		RootNamespace: meshtest.RootNamespace})
	sleep := m.AddPod(m.Nodes[0], "sleep-1", "sleep", true)
	httpbin := m.AddPod(m.Nodes[1], "httpbin-1", "httpbin", true)
	httpbin.ServeHTTP(t, 80)
	m.CP.L7(`
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: waypoint-marks, namespace: wp}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/denied"]}}]}]
`)

	// The same in Kubernetes: namespace default in the mesh, the waypoint
	// Gateway with its Service and pod in wp, httpbin's Service and pods.
	defaultNS := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "default"}}
	k.label(t, defaultNS, "istio.io/dataplane-mode", "ambient")
	gw := &gwv1.Gateway{ObjectMeta: metav1.ObjectMeta{Name: "waypoint", Namespace: "wp"},
		Spec: gwv1.GatewaySpec{GatewayClassName: "istio-waypoint", Listeners: []gwv1.Listener{{Name: "mesh", Port: 15008, Protocol: "HBONE"}}}}
	gwLabel := map[string]string{"gateway.networking.k8s.io/gateway-name": "waypoint"}
	k.create(t, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "wp"}}, gw,
		&corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "waypoint", Namespace: "wp", Labels: gwLabel},
			Spec: corev1.ServiceSpec{Selector: gwLabel, Ports: []corev1.ServicePort{{Name: "mesh", Port: 15008}}}})
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "httpbin", Namespace: "default"},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "httpbin"}, Ports: []corev1.ServicePort{{Port: 80}}}}
	k.create(t, svc)
	k.pod(t, "wp", wpPod, gwLabel)
	k.pod(t, "default", sleep, map[string]string{"app": "sleep"})
	httpbinPod := k.pod(t, "default", httpbin, map[string]string{"app": "httpbin"})
	svcVIP := netip.AddrPortFrom(netip.MustParseAddr(svc.Spec.ClusterIP), 80)
	svcKey := discovery.ServiceKey("default", hostname("httpbin"))

	return &labelMesh{m: m, k: k, sleep: sleep, httpbin: httpbin, wpPod: wpPod, defaultNS: defaultNS, gw: gw, svc: svc,
		httpbinPod: httpbinPod, svcVIP: svcVIP, svcKey: svcKey}
}

// TestWaypointLabels: Istio's waypoint labels from Kubernetes objects to
// packets. The control plane's real model reads them from a real API
// server (envtest); real ztunnels and a real waypoint in network
// namespaces carry the traffic. The waypoint "waypoint" lives in namespace
// wp (so nothing in "default" binds to it without a label) and denies the
// path /denied (an AuthorizationPolicy targeting it), so a request from
// sleep answers 403 exactly when it went through the waypoint and 200 when
// it went straight to httpbin. Each step first waits until the ztunnels
// hold the binding the labels mean, then sends to the Service's VIP and to
// the pod's own address.
func TestWaypointLabels(t *testing.T) {
	lm := newLabelMesh(t)
	m, k, sleep, httpbin := lm.m, lm.k, lm.sleep, lm.httpbin
	defaultNS, gw, svc, httpbinPod, svcVIP, svcKey := lm.defaultNS, lm.gw, lm.svc, lm.httpbinPod, lm.svcVIP, lm.svcKey
	// step waits until the client's ztunnel holds the binding (the
	// Service's and the pod's waypoint set or not), then checks that each
	// destination goes through the waypoint exactly as expected.
	step := func(name string, svcBound, podBound, svcThrough, podThrough bool) {
		t.Run(name, func(t *testing.T) {
			st := m.Nodes[0].State
			deadline := time.Now().Add(15 * time.Second)
			for {
				s, w := st.ServiceByKey(svcKey), st.WorkloadByUID(httpbin.UID)
				if s != nil && w != nil && (s.GetWaypoint() != nil) == svcBound && (w.GetWaypoint() != nil) == podBound &&
					w.GetServices()[svcKey] != nil && w.GetTunnelProtocol() != 0 &&
					st.WorkloadByUID(discovery.PodUID(meshtest.ClusterID, "wp", "waypoint-1")) != nil {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("binding never reached the ztunnel: service %v, pod %v; want service bound %v, pod bound %v", s, w, svcBound, podBound)
				}
				time.Sleep(20 * time.Millisecond)
			}
			for _, c := range []struct {
				what    string
				dst     netip.AddrPort
				through bool
			}{{"Service VIP", svcVIP, svcThrough}, {"pod address", httpbin.Addr(80), podThrough}} {
				code, body, err := do(sleep, "GET", c.dst, "/denied")
				if err != nil {
					t.Fatalf("%s: %v", c.what, err)
				}
				want := 200
				if c.through {
					want = 403
				}
				if code != want {
					t.Errorf("%s %s: %d %q; want %d (through the waypoint: %v)", c.what, c.dst, code, body, want, c.through)
				}
			}
		})
	}

	step("no label: nothing goes through the waypoint", false, false, false, false)
	k.label(t, defaultNS, useWaypoint, "waypoint", useWaypointNamespace, "wp")
	step("namespace label, waypoint-for service (default): the Service", true, false, true, false)
	k.label(t, gw, waypointFor, "workload")
	// Service traffic reaches the pod, whose waypoint it then crosses.
	step("namespace label, waypoint-for workload: the pod", false, true, true, true)
	k.label(t, gw, waypointFor, "all")
	step("namespace label, waypoint-for all: both", true, true, true, true)
	k.label(t, gw, waypointFor, "none")
	step("namespace label, waypoint-for none: neither", false, false, false, false)
	k.label(t, gw, waypointFor, "all")
	k.label(t, svc, useWaypoint, "none")
	step("Service label none opts the Service out of the namespace's", false, true, true, true)
	k.label(t, httpbinPod, useWaypoint, "none")
	step("pod label none opts the pod out too", false, false, false, false)
	k.label(t, defaultNS, useWaypoint, "", useWaypointNamespace, "")
	k.label(t, svc, useWaypoint, "waypoint", useWaypointNamespace, "wp")
	k.label(t, httpbinPod, useWaypoint, "")
	step("Service label alone (use-waypoint-namespace): the Service only", true, false, true, false)
	k.label(t, svc, useWaypoint, "", useWaypointNamespace, "")
	k.label(t, httpbinPod, useWaypoint, "waypoint", useWaypointNamespace, "wp")
	step("pod label alone (use-waypoint-namespace): the pod, also behind its Service", false, true, true, true)
	k.label(t, gw, waypointFor, "service")
	step("pod label, waypoint-for service: the waypoint takes no pod traffic", false, false, false, false)
}

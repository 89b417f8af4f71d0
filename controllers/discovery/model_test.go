package discovery

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/ambientmesh/ambient/controllers/waypointbind"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
)

var testMesh = meshConfig{TrustDomain: "td.example", RootNamespace: "ambient-system", ClusterID: "Kubernetes", DomainSuffix: "cluster.local"}

// view builds a namespace view with the given waypoints (by "ns/name") and
// waypoint services (by "ns/name" -> cluster IP).
func view(nsLabels map[string]string, wps []*waypoint, wpSvcIPs map[string]string, svcs ...*corev1.Service) *namespaceView {
	idx := map[string]map[string]*waypoint{}
	for _, wp := range wps {
		if idx[wp.Namespace] == nil {
			idx[wp.Namespace] = map[string]*waypoint{}
		}
		idx[wp.Namespace][wp.Name] = wp
	}
	v := &namespaceView{
		ns:             &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "app", Labels: nsLabels}},
		services:       svcs,
		waypoints:      idx["app"],
		lookupWaypoint: func(ns, name string) *waypoint { return idx[ns][name] },
		waypointService: func(ns, name string) *corev1.Service {
			if ip, ok := wpSvcIPs[ns+"/"+name]; ok {
				return &corev1.Service{Spec: corev1.ServiceSpec{ClusterIP: ip}}
			}
			return nil
		},
	}
	if v.waypoints == nil {
		v.waypoints = map[string]*waypoint{}
	}
	return v
}

func testPod(name string, mut func(*corev1.Pod)) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "app", Labels: map[string]string{"app": "web"}},
		Spec:       corev1.PodSpec{NodeName: "n1", ServiceAccountName: "web"},
		Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "10.0.0.1",
			Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}},
	}
	if mut != nil {
		mut(p)
	}
	return p
}

// waypointName renders a GatewayAddress as "host:<hostname>", "ip:<ip>" or "".
func waypointName(g *workloadapi.GatewayAddress) string {
	switch {
	case g == nil:
		return ""
	case g.GetHostname() != nil:
		return "host:" + g.GetHostname().GetNamespace() + "/" + g.GetHostname().GetHostname()
	default:
		return "ip:" + string(rune('0'+len(g.GetAddress().GetAddress())))
	}
}

func TestWorkloadWaypointPrecedence(t *testing.T) {
	ambient := map[string]string{"istio.io/dataplane-mode": "ambient"}
	withLabel := func(k, v string) map[string]string {
		m := map[string]string{"istio.io/dataplane-mode": "ambient"}
		m[k] = v
		return m
	}
	nsWP := &waypoint{Namespace: "app", Name: "ns-wp", TrafficType: waypointbind.TrafficAll}
	nsWPService := &waypoint{Namespace: "app", Name: "ns-wp", TrafficType: waypointbind.TrafficService}
	saWP := &waypoint{Namespace: "app", Name: "sa-wp", ServiceAccount: "web", TrafficType: waypointbind.TrafficService}
	otherSA := &waypoint{Namespace: "app", Name: "other-sa", ServiceAccount: "db", TrafficType: waypointbind.TrafficAll}
	labelled := &waypoint{Namespace: "app", Name: "labelled", TrafficType: waypointbind.TrafficAll}
	remote := &waypoint{Namespace: "shared", Name: "remote", TrafficType: waypointbind.TrafficAll}
	tests := []struct {
		name     string
		nsLabels map[string]string
		wps      []*waypoint
		pod      func(*corev1.Pod)
		want     string
	}{
		{"no waypoint", ambient, nil, nil, ""},
		{"namespace waypoint", ambient, []*waypoint{nsWP}, nil, "host:app/ns-wp.app.svc.cluster.local"},
		{"namespace waypoint for services only", ambient, []*waypoint{nsWPService}, nil, ""},
		{"service-account waypoint wins", ambient, []*waypoint{nsWP, saWP}, nil, "host:app/sa-wp.app.svc.cluster.local"},
		{"other service account's waypoint ignored", ambient, []*waypoint{nsWP, otherSA}, nil, "host:app/ns-wp.app.svc.cluster.local"},
		{"pod label beats service-account waypoint", ambient, []*waypoint{saWP, labelled}, func(p *corev1.Pod) { p.Labels["istio.io/use-waypoint"] = "labelled" }, "host:app/labelled.app.svc.cluster.local"},
		{"pod label none opts out", ambient, []*waypoint{nsWP, saWP}, func(p *corev1.Pod) { p.Labels["istio.io/use-waypoint"] = "none" }, ""},
		{"pod label in another namespace", ambient, []*waypoint{remote}, func(p *corev1.Pod) {
			p.Labels["istio.io/use-waypoint"] = "remote"
			p.Labels["istio.io/use-waypoint-namespace"] = "shared"
		}, "host:shared/remote.shared.svc.cluster.local"},
		{"pod label naming an unknown waypoint fails closed", ambient, nil, func(p *corev1.Pod) { p.Labels["istio.io/use-waypoint"] = "future" }, "host:app/future.app.svc.cluster.local"},
		{"namespace label beats namespace waypoint", withLabel("istio.io/use-waypoint", "labelled"), []*waypoint{nsWP, labelled}, nil, "host:app/labelled.app.svc.cluster.local"},
		{"service-account waypoint beats namespace label", withLabel("istio.io/use-waypoint", "labelled"), []*waypoint{labelled, saWP}, nil, "host:app/sa-wp.app.svc.cluster.local"},
		{"namespace label none", withLabel("istio.io/use-waypoint", "none"), []*waypoint{nsWP}, nil, ""},
		{"not captured: no waypoint", nil, []*waypoint{nsWP}, nil, ""},
		{"waypoint pod never gets one", ambient, []*waypoint{nsWP}, func(p *corev1.Pod) { p.Labels[GatewayNameLabel] = "ns-wp" }, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := buildWorkload(testMesh, view(tt.nsLabels, tt.wps, nil), testPod("p", tt.pod))
			if got := waypointName(w.Waypoint); got != tt.want {
				t.Fatalf("waypoint = %q, want %q", got, tt.want)
			}
		})
	}
	// With its Service known, the waypoint is addressed by cluster IP.
	w := buildWorkload(testMesh, view(ambient, []*waypoint{nsWP}, map[string]string{"app/ns-wp": "10.96.0.20"}), testPod("p", nil))
	if got := w.GetWaypoint().GetAddress().GetAddress(); len(got) != 4 || got[3] != 20 || w.Waypoint.HboneMtlsPort != 15008 {
		t.Fatalf("waypoint address = %v", w.Waypoint)
	}
}

func TestServiceWaypoint(t *testing.T) {
	ambient := map[string]string{"istio.io/dataplane-mode": "ambient"}
	svc := func(name string, labels map[string]string) *corev1.Service {
		return &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "app", Labels: labels}, Spec: corev1.ServiceSpec{ClusterIP: "10.96.0.1"}}
	}
	tests := []struct {
		name string
		wps  []*waypoint
		svc  *corev1.Service
		want string
	}{
		{"namespace waypoint for services", []*waypoint{{Namespace: "app", Name: "wp", TrafficType: waypointbind.TrafficService}}, svc("web", nil), "host:app/wp.app.svc.cluster.local"},
		{"namespace waypoint for workloads only", []*waypoint{{Namespace: "app", Name: "wp", TrafficType: waypointbind.TrafficWorkload}}, svc("web", nil), ""},
		{"service-account waypoints do not bind services", []*waypoint{{Namespace: "app", Name: "wp", ServiceAccount: "web", TrafficType: waypointbind.TrafficAll}}, svc("web", nil), ""},
		{"service label", []*waypoint{{Namespace: "app", Name: "wp", TrafficType: waypointbind.TrafficService}, {Namespace: "app", Name: "x", TrafficType: waypointbind.TrafficService}},
			svc("web", map[string]string{"istio.io/use-waypoint": "x"}), "host:app/x.app.svc.cluster.local"},
		{"service label none", []*waypoint{{Namespace: "app", Name: "wp", TrafficType: waypointbind.TrafficAll}}, svc("web", map[string]string{"istio.io/use-waypoint": "none"}), ""},
		{"the waypoint's own service", []*waypoint{{Namespace: "app", Name: "wp", TrafficType: waypointbind.TrafficAll}}, svc("wp", nil), ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out := buildService(testMesh, view(ambient, tt.wps, nil), tt.svc)
			if got := waypointName(out.Waypoint); got != tt.want {
				t.Fatalf("waypoint = %q, want %q", got, tt.want)
			}
		})
	}
}

func TestBuildWorkloadFields(t *testing.T) {
	ambient := map[string]string{"istio.io/dataplane-mode": "ambient"}
	isCtrl := true
	pod := testPod("web-7d9f-abcde", func(p *corev1.Pod) {
		p.Labels["pod-template-hash"] = "7d9f"
		p.Labels["version"] = "v2"
		p.OwnerReferences = []metav1.OwnerReference{{Kind: "ReplicaSet", Name: "web-7d9f", Controller: &isCtrl}}
		p.Status.PodIPs = []corev1.PodIP{{IP: "10.0.0.1"}, {IP: "fd00::1"}}
		p.Spec.Containers = []corev1.Container{{Name: "c", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}}}}
	})
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "app"}, Spec: corev1.ServiceSpec{
		Selector: map[string]string{"app": "web"},
		Ports: []corev1.ServicePort{
			{Port: 80, TargetPort: intstr.FromString("http")},
			{Port: 53, Protocol: corev1.ProtocolUDP},
			{Port: 9000},
		}}}
	w := buildWorkload(testMesh, view(ambient, nil, nil, svc), pod)
	if w.Uid != "Kubernetes//Pod/app/web-7d9f-abcde" || w.TrustDomain != "td.example" || w.ServiceAccount != "web" || w.Node != "n1" {
		t.Fatalf("identity fields: %v", w)
	}
	if len(w.Addresses) != 2 || len(w.Addresses[0]) != 4 || len(w.Addresses[1]) != 16 {
		t.Fatalf("addresses: %v", w.Addresses)
	}
	if w.WorkloadType != workloadapi.WorkloadType_DEPLOYMENT || w.WorkloadName != "web" || w.CanonicalName != "web" || w.CanonicalRevision != "v2" {
		t.Fatalf("telemetry fields: type=%v name=%q canonical=%q/%q", w.WorkloadType, w.WorkloadName, w.CanonicalName, w.CanonicalRevision)
	}
	pl := w.Services["app/web.app.svc.cluster.local"]
	if len(pl.GetPorts()) != 2 || pl.Ports[0].TargetPort != 8080 || pl.Ports[1].TargetPort != 9000 {
		t.Fatalf("ports (UDP skipped, named resolved, default = port): %v", pl)
	}
	if w.Status != workloadapi.WorkloadStatus_HEALTHY || w.TunnelProtocol != workloadapi.TunnelProtocol_HBONE {
		t.Fatalf("status %v tunnel %v", w.Status, w.TunnelProtocol)
	}
	terminating := testPod("t", func(p *corev1.Pod) { p.DeletionTimestamp = ptr.To(metav1.Now()) })
	if w := buildWorkload(testMesh, view(ambient, nil, nil), terminating); w.Status != workloadapi.WorkloadStatus_UNHEALTHY {
		t.Fatal("terminating pod must be unhealthy")
	}
	for _, p := range []*corev1.Pod{
		testPod("no-ip", func(p *corev1.Pod) { p.Status.PodIP = "" }),
		testPod("done", func(p *corev1.Pod) { p.Status.Phase = corev1.PodSucceeded }),
		testPod("failed", func(p *corev1.Pod) { p.Status.Phase = corev1.PodFailed }),
	} {
		if w := buildWorkload(testMesh, view(ambient, nil, nil), p); w != nil {
			t.Errorf("%s: expected no workload", p.Name)
		}
	}
	if s := buildService(testMesh, view(ambient, nil, nil), &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "x", Namespace: "app"}, Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeExternalName}}); s != nil {
		t.Error("ExternalName services are not served")
	}
	headless := buildService(testMesh, view(ambient, nil, nil), &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "h", Namespace: "app"}, Spec: corev1.ServiceSpec{ClusterIP: "None", Ports: []corev1.ServicePort{{Port: 80}}}})
	if len(headless.Addresses) != 0 || headless.Hostname != "h.app.svc.cluster.local" {
		t.Errorf("headless service: %v", headless)
	}
}

// TestBuildServiceDualStack: both cluster IPs of a dual-stack Service are
// published, with the families proxies must respect.
func TestBuildServiceDualStack(t *testing.T) {
	for _, tc := range []struct {
		families []corev1.IPFamily
		ips      []string
		want     workloadapi.IPFamilies
		addrLens []int
	}{
		{[]corev1.IPFamily{corev1.IPv4Protocol, corev1.IPv6Protocol}, []string{"10.96.0.5", "fd00:96::5"}, workloadapi.IPFamilies_DUAL, []int{4, 16}},
		{[]corev1.IPFamily{corev1.IPv6Protocol, corev1.IPv4Protocol}, []string{"fd00:96::5", "10.96.0.5"}, workloadapi.IPFamilies_DUAL, []int{16, 4}},
		{[]corev1.IPFamily{corev1.IPv6Protocol}, []string{"fd00:96::5"}, workloadapi.IPFamilies_IPV6_ONLY, []int{16}},
		{[]corev1.IPFamily{corev1.IPv4Protocol}, []string{"10.96.0.5"}, workloadapi.IPFamilies_IPV4_ONLY, []int{4}},
		{nil, []string{"10.96.0.5"}, workloadapi.IPFamilies_AUTOMATIC, []int{4}},
	} {
		svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "app"}, Spec: corev1.ServiceSpec{
			ClusterIP: tc.ips[0], ClusterIPs: tc.ips, IPFamilies: tc.families, Ports: []corev1.ServicePort{{Port: 80}}}}
		out := buildService(testMesh, view(nil, nil, nil), svc)
		if out.IpFamilies != tc.want || len(out.Addresses) != len(tc.addrLens) {
			t.Fatalf("%v: families %v addresses %v, want %v with %d addresses", tc.families, out.IpFamilies, out.Addresses, tc.want, len(tc.addrLens))
		}
		for i, n := range tc.addrLens {
			if len(out.Addresses[i].Address) != n {
				t.Fatalf("%v: address %d is %d bytes, want %d", tc.families, i, len(out.Addresses[i].Address), n)
			}
		}
	}
}

// TestSidecarPodTunnel: a pod running the mesh's sidecar advertises HBONE
// (ztunnels and other sidecars tunnel to its :15008), never a waypoint;
// look-alikes without the sidecar container, the tunnel label or the
// injection status stay plaintext (sent as to any out-of-mesh pod).
func TestSidecarPodTunnel(t *testing.T) {
	injected := func(p *corev1.Pod) {
		p.Annotations = map[string]string{"sidecar.istio.io/status": `{"containers":["istio-proxy"]}`}
		p.Labels["networking.istio.io/tunnel"] = "http"
		p.Spec.InitContainers = []corev1.Container{{Name: "istio-proxy", RestartPolicy: ptr.To(corev1.ContainerRestartPolicyAlways)}}
	}
	wps := []*waypoint{{Namespace: "app", Name: "wp"}}
	useWaypoint := map[string]string{"istio.io/dataplane-mode": "ambient", "istio.io/use-waypoint": "wp"}
	tests := []struct {
		name   string
		nsl    map[string]string
		mut    func(*corev1.Pod)
		tunnel workloadapi.TunnelProtocol
		native bool
	}{
		{"injected pod", nil, injected, workloadapi.TunnelProtocol_HBONE, true},
		{"injected pod in an ambient namespace with a waypoint", useWaypoint, injected, workloadapi.TunnelProtocol_HBONE, true},
		{"no tunnel label", nil, func(p *corev1.Pod) { injected(p); delete(p.Labels, "networking.istio.io/tunnel") }, workloadapi.TunnelProtocol_NONE, false},
		{"not a native sidecar", nil, func(p *corev1.Pod) { injected(p); p.Spec.InitContainers[0].RestartPolicy = nil }, workloadapi.TunnelProtocol_NONE, false},
		{"no injection status", nil, func(p *corev1.Pod) { injected(p); p.Annotations = nil }, workloadapi.TunnelProtocol_NONE, false},
		{"plain pod", nil, nil, workloadapi.TunnelProtocol_NONE, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := buildWorkload(testMesh, view(tt.nsl, wps, map[string]string{"app/wp": "10.96.0.9"}), testPod("web-1", tt.mut))
			if w.TunnelProtocol != tt.tunnel || w.NativeTunnel != tt.native {
				t.Fatalf("tunnel %v native %v, want %v %v", w.TunnelProtocol, w.NativeTunnel, tt.tunnel, tt.native)
			}
			if w.Waypoint != nil {
				t.Fatalf("waypoint %v: a sidecar pod handles its own traffic", w.Waypoint)
			}
		})
	}
}

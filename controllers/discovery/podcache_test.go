package discovery

import (
	"maps"
	"math/rand"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"
	networkingv1alpha3 "istio.io/api/networking/v1alpha3"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/randfill"

	"github.com/ambientmesh/ambient/controllers/podcache"
	"github.com/ambientmesh/ambient/controllers/waypointbind"
	"github.com/ambientmesh/ambient/proxylib/discovery/selection"
)

// cached is pod as the manager's cache gives it to readers.
func cached(t *testing.T, pod *corev1.Pod) *corev1.Pod {
	t.Helper()
	rec, err := podcache.Compact(pod.DeepCopy())
	if err != nil {
		t.Fatal(err)
	}
	return rec.(*podcache.Pod).Expand()
}

// fullPod is a pod as the API server returns it, with what a Deployment,
// kubectl and the kubelet add.
func fullPod(name string, mut ...func(*corev1.Pod)) *corev1.Pod {
	isCtrl := true
	p := testPod(name, func(p *corev1.Pod) {
		p.Labels["version"] = "v2"
		p.Annotations = map[string]string{"kubectl.kubernetes.io/last-applied-configuration": strings.Repeat("x", 2000), "prometheus.io/scrape": "true"}
		p.OwnerReferences = []metav1.OwnerReference{{Kind: "ReplicaSet", Name: "web-7d9f", Controller: &isCtrl}}
		p.ManagedFields = []metav1.ManagedFieldsEntry{{Manager: "kubelet", Operation: metav1.ManagedFieldsOperationUpdate}}
		p.Status.PodIPs = []corev1.PodIP{{IP: p.Status.PodIP}}
		p.Status.HostIP = "192.168.0.1"
		p.Status.ContainerStatuses = []corev1.ContainerStatus{{Name: "app", Ready: true, Image: "app:1"}}
		p.Status.Conditions = append(p.Status.Conditions, corev1.PodCondition{Type: corev1.PodScheduled, Status: corev1.ConditionTrue, Message: "scheduled", Reason: "x"})
		p.Spec.Volumes = []corev1.Volume{{Name: "token"}}
		p.Spec.Tolerations = []corev1.Toleration{{Key: "node.kubernetes.io/not-ready"}}
		p.Spec.Containers = []corev1.Container{{Name: "app", Image: "app:1", Env: []corev1.EnvVar{{Name: "A", Value: "b"}},
			Ports:          []corev1.ContainerPort{{Name: "http", ContainerPort: 8080, Protocol: corev1.ProtocolTCP}},
			Resources:      corev1.ResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("100m")}},
			ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Port: intstr.FromInt32(8080)}}}}}
	})
	for _, f := range mut {
		f(p)
	}
	return p
}

// readerView is a namespace every pod reader of the model looks into:
// ambient, a Service selecting app=web by named target port, a
// selector-less Service whose EndpointSlice names pods, a ServiceEntry
// selecting app=web with a named port, and a waypoint for service account
// "web".
func readerView(podNames ...string) *namespaceView {
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "app"}, Spec: corev1.ServiceSpec{
		Selector: map[string]string{"app": "web"}, Ports: []corev1.ServicePort{{Port: 80, TargetPort: intstr.FromString("http")}, {Port: 81, TargetPort: intstr.FromString("grpc")}}}}
	manual := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "manual", Namespace: "app"}, Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "tcp", Port: 90}}}}
	v := view(map[string]string{"istio.io/dataplane-mode": "ambient"}, []*waypoint{{Namespace: "app", Name: "wp-web", TrafficType: waypointbind.TrafficAll, ServiceAccount: "web"}},
		map[string]string{"app/wp-web": "10.96.0.9"}, svc, manual)
	es := &discoveryv1.EndpointSlice{Ports: []discoveryv1.EndpointPort{{Name: ptr.To("tcp"), Port: ptr.To[int32](9090)}}}
	for _, n := range podNames {
		es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{TargetRef: &corev1.ObjectReference{Kind: "Pod", Name: n}})
	}
	v.slices = map[string][]*discoveryv1.EndpointSlice{"manual": {es}}
	se := &networkingv1.ServiceEntry{ObjectMeta: metav1.ObjectMeta{Name: "ext", Namespace: "app"}}
	se.Spec.Hosts = []string{"ext.example.com"}
	se.Spec.Ports = []*networkingv1alpha3.ServicePort{{Number: 443, Name: "http", Protocol: "TCP"}}
	se.Spec.WorkloadSelector = &networkingv1alpha3.WorkloadSelector{Labels: map[string]string{"app": "web"}}
	v.serviceEntries = []*networkingv1.ServiceEntry{se}
	return v
}

// podReaders are the model's readers of cached pods, as comparable values.
func podReaders(v *namespaceView, pod *corev1.Pod) map[string]any {
	decision, reason := selection.Decide(testMesh.selection(), v.ns, pod)
	kind, owner := workloadOwner(pod)
	return map[string]any{
		"buildWorkload":        buildWorkload(testMesh, v, pod),
		"Decide":               [2]any{decision, reason},
		"HBONESidecar":         selection.HBONESidecar(pod),
		"CaptureDNS":           [2]bool{selection.CaptureDNS(true, pod), selection.CaptureDNS(false, pod)},
		"isWaypointPod":        isWaypointPod(pod),
		"podReady":             podReady(pod),
		"podAddresses":         podAddresses(pod),
		"workloadOwner":        [2]any{kind, owner},
		"podServiceEntryPorts": podServiceEntryPorts(pod),
		"workloadWaypoint":     workloadWaypoint(testMesh, v, pod, pod.Spec.ServiceAccountName),
	}
}

func sameReads(t *testing.T, v *namespaceView, full, got *corev1.Pod) {
	t.Helper()
	want, have := podReaders(v, full), podReaders(v, got)
	for name, w := range want {
		h := have[name]
		if wm, ok := w.(proto.Message); ok {
			if !proto.Equal(wm, h.(proto.Message)) {
				t.Errorf("%s of the cached pod differs:\n got %v\nwant %v", name, h, w)
			}
			continue
		}
		if !equalValue(w, h) {
			t.Errorf("%s of the cached pod differs: got %v, want %v", name, h, w)
		}
	}
}

func equalValue(a, b any) bool {
	switch a := a.(type) {
	case map[string]uint32:
		return maps.Equal(a, b.(map[string]uint32))
	case [][]byte:
		bb := b.([][]byte)
		if len(a) != len(bb) {
			return false
		}
		for i := range a {
			if string(a[i]) != string(bb[i]) {
				return false
			}
		}
		return true
	}
	return a == b
}

// TestCachedPodKeepsWhatTheModelReads: every reader of cached pods in the
// model (the workload, capture selection, sidecar and waypoint detection,
// readiness, addresses, owner, service and ServiceEntry ports, waypoint
// binding) reads the same from the cache's pod as from the API server's,
// for hand-made pods and for pods with every field filled at random: a
// field a reader uses that the compact record drops fails this test.
func TestCachedPodKeepsWhatTheModelReads(t *testing.T) {
	always := corev1.ContainerRestartPolicyAlways
	cases := []struct {
		name string
		pod  *corev1.Pod
	}{
		{"deployment pod", fullPod("web-7d9f-abcde")},
		{"not ready", fullPod("web-1", func(p *corev1.Pod) { p.Status.Conditions[0].Status = corev1.ConditionFalse })},
		{"terminating", fullPod("web-2", func(p *corev1.Pod) { p.DeletionTimestamp = ptr.To(metav1.Now()) })},
		{"host network", fullPod("web-3", func(p *corev1.Pod) { p.Spec.HostNetwork = true })},
		{"named port in a second container", fullPod("web-5", func(p *corev1.Pod) {
			p.Spec.Containers[0].Ports[0].Name = ""
			p.Spec.Containers = append(p.Spec.Containers, corev1.Container{Name: "side", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 9000}}})
		})},
		{"redirection disabled", fullPod("web-6", func(p *corev1.Pod) { p.Annotations[selection.RedirectionAnnotation] = selection.RedirectionDisabled })},
		{"dns capture off", fullPod("web-7", func(p *corev1.Pod) { p.Annotations[selection.DNSCaptureAnnotation] = "false" })},
		{"finished", fullPod("web-8", func(p *corev1.Pod) { p.Status.Phase = corev1.PodSucceeded })},
		{"dual stack", fullPod("web-9", func(p *corev1.Pod) { p.Status.PodIPs = append(p.Status.PodIPs, corev1.PodIP{IP: "fd00::1"}) })},
		{"waypoint", fullPod("wp-web-1", func(p *corev1.Pod) { p.Labels[GatewayNameLabel] = "wp-web" })},
		{"sidecar", fullPod("web-4", func(p *corev1.Pod) {
			p.Labels[selection.TunnelLabel] = selection.TunnelHTTP
			p.Annotations[selection.SidecarStatusAnnotation] = "{}"
			p.Spec.InitContainers = []corev1.Container{{Name: "init"}, {Name: selection.SidecarContainer, Image: "sidecar", RestartPolicy: &always}}
		})},
		{"sidecar without restart policy", fullPod("web-10", func(p *corev1.Pod) {
			p.Labels[selection.TunnelLabel] = selection.TunnelHTTP
			p.Annotations[selection.SidecarStatusAnnotation] = "{}"
			p.Spec.InitContainers = []corev1.Container{{Name: selection.SidecarContainer}}
		})},
	}
	rng := rand.New(rand.NewSource(1))
	for i := range 300 {
		cases = append(cases, struct {
			name string
			pod  *corev1.Pod
		}{"random", randomPod(rng, int64(i))})
	}
	var names []string
	for _, tc := range cases {
		names = append(names, tc.pod.Name)
	}
	v := readerView(names...)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := cached(t, tc.pod)
			sameReads(t, v, tc.pod, got)
			// Identity and what proxy authentication, the CA's node index
			// and Events read.
			if got.Name != tc.pod.Name || got.Namespace != tc.pod.Namespace || got.UID != tc.pod.UID || got.ResourceVersion != tc.pod.ResourceVersion ||
				!equalTime(got.DeletionTimestamp, tc.pod.DeletionTimestamp) || got.Spec.NodeName != tc.pod.Spec.NodeName ||
				got.Spec.ServiceAccountName != tc.pod.Spec.ServiceAccountName || got.Status.Phase != tc.pod.Status.Phase ||
				!maps.Equal(got.Labels, tc.pod.Labels) || !equalOwners(got.OwnerReferences, tc.pod.OwnerReferences) {
				t.Fatalf("identity, placement or phase lost:\n got %+v\nwant %+v", got.ObjectMeta, tc.pod.ObjectMeta)
			}
		})
	}
	if t.Failed() {
		return
	}
	// What the record drops.
	p := cached(t, fullPod("web"))
	if p.ManagedFields != nil || p.Annotations["kubectl.kubernetes.io/last-applied-configuration"] != "" || p.Spec.Volumes != nil || p.Status.ContainerStatuses != nil ||
		len(p.Spec.Containers) != 1 || p.Spec.Containers[0].Image != "" || p.Spec.Containers[0].Env != nil || p.Spec.Containers[0].ReadinessProbe != nil ||
		p.Annotations["prometheus.io/scrape"] != "" || len(p.Status.Conditions) != 1 || p.Status.HostIP != "" {
		t.Fatalf("unread fields kept: %+v", p)
	}
}

func equalTime(a, b *metav1.Time) bool {
	return (a == nil) == (b == nil) && (a == nil || a.Equal(b))
}

func equalOwners(a, b []metav1.OwnerReference) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i].APIVersion != b[i].APIVersion || a[i].Kind != b[i].Kind || a[i].Name != b[i].Name || a[i].UID != b[i].UID ||
			ptr.Deref(a[i].Controller, false) != ptr.Deref(b[i].Controller, false) {
			return false
		}
	}
	return true
}

// randomPod is a pod with every field filled at random, then given values
// the readers act on (addresses, phase, labels, annotations, ports and
// the sidecar container chosen among meaningful ones) so that they do
// more than return early.
func randomPod(rng *rand.Rand, seed int64) *corev1.Pod {
	p := &corev1.Pod{}
	randfill.NewWithSeed(seed).NilChance(0.2).NumElements(0, 3).MaxDepth(8).Fill(p)
	pick := func(vals ...string) string { return vals[rng.Intn(len(vals))] }
	p.Namespace = "app"
	p.Name = "rnd-" + p.Name
	p.Spec.NodeName = pick("n1", "n2", "")
	p.Spec.ServiceAccountName = pick("web", "", "other")
	p.Status.Phase = corev1.PodPhase(pick(string(corev1.PodRunning), string(corev1.PodPending), string(corev1.PodSucceeded), string(corev1.PodFailed)))
	p.Status.PodIP = pick("10.0.0.1", "", "fd00::2")
	p.Status.PodIPs = nil
	for range rng.Intn(3) {
		p.Status.PodIPs = append(p.Status.PodIPs, corev1.PodIP{IP: pick("10.0.0.1", "10.0.0.2", "fd00::2", "bad")})
	}
	if rng.Intn(2) == 0 {
		p.DeletionTimestamp = nil
	}
	if p.Labels == nil {
		p.Labels = map[string]string{}
	}
	for _, kv := range [][2]string{{"app", "web"}, {"version", "v1"}, {"pod-template-hash", "abc"}, {selection.DataplaneModeLabel, "none"},
		{selection.TunnelLabel, selection.TunnelHTTP}, {GatewayNameLabel, "wp-web"}, {"istio.io/use-waypoint", "wp-web"}, {"service.istio.io/canonical-name", "c"}} {
		if rng.Intn(3) == 0 {
			p.Labels[kv[0]] = kv[1]
		}
	}
	if p.Annotations == nil {
		p.Annotations = map[string]string{}
	}
	for _, kv := range [][2]string{{selection.SidecarStatusAnnotation, "{}"}, {selection.RedirectionAnnotation, pick(selection.RedirectionDisabled, selection.RedirectionEnabled)},
		{selection.DNSCaptureAnnotation, pick("true", "false", "x")}} {
		if rng.Intn(3) == 0 {
			p.Annotations[kv[0]] = kv[1]
		}
	}
	for i := range p.Spec.Containers {
		for j := range p.Spec.Containers[i].Ports {
			p.Spec.Containers[i].Ports[j].Name = pick("http", "grpc", "", "metrics")
		}
	}
	if rng.Intn(2) == 0 {
		rp := corev1.ContainerRestartPolicy(pick(string(corev1.ContainerRestartPolicyAlways), ""))
		c := corev1.Container{Name: selection.SidecarContainer}
		if rp != "" {
			c.RestartPolicy = &rp
		}
		p.Spec.InitContainers = append(p.Spec.InitContainers, c)
	}
	for i := range p.Status.Conditions {
		if rng.Intn(2) == 0 {
			p.Status.Conditions[i].Type = corev1.PodReady
			p.Status.Conditions[i].Status = corev1.ConditionStatus(pick(string(corev1.ConditionTrue), string(corev1.ConditionFalse)))
		}
	}
	isCtrl := rng.Intn(2) == 0
	p.OwnerReferences = append(p.OwnerReferences, metav1.OwnerReference{APIVersion: "apps/v1", Kind: pick("ReplicaSet", "Job", "StatefulSet"), Name: "web-abc", Controller: &isCtrl})
	return p
}

package discovery

import (
	"maps"
	"reflect"
	"strconv"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/ambientmesh/ambient/proxylib/discovery/selection"
)

// fullPod is a pod as the API server returns it, with what a Deployment,
// kubectl and the kubelet add.
func fullPod(name string, mut ...func(*corev1.Pod)) *corev1.Pod {
	isCtrl := true
	p := testPod(name, func(p *corev1.Pod) {
		p.Labels["version"] = "v2"
		p.Annotations = map[string]string{lastApplied: strings.Repeat("x", 2000), "prometheus.io/scrape": "true"}
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

// TestTrimPodKeepsTheModel: the discovery model, capture selection and
// sidecar detection see the same pod after TrimPod, which drops what
// nobody reads.
func TestTrimPodKeepsTheModel(t *testing.T) {
	ambient := map[string]string{"istio.io/dataplane-mode": "ambient"}
	always := corev1.ContainerRestartPolicyAlways
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "app"}, Spec: corev1.ServiceSpec{
		Selector: map[string]string{"app": "web"}, Ports: []corev1.ServicePort{{Port: 80, TargetPort: intstr.FromString("http")}}}}
	tests := []struct {
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
		{"sidecar", fullPod("web-4", func(p *corev1.Pod) {
			p.Labels[selection.TunnelLabel] = selection.TunnelHTTP
			p.Annotations[selection.SidecarStatusAnnotation] = "{}"
			p.Spec.InitContainers = []corev1.Container{{Name: selection.SidecarContainer, Image: "sidecar", RestartPolicy: &always}}
		})},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			want := buildWorkload(testMesh, view(ambient, nil, nil, svc), tc.pod)
			wantSidecar := selection.HBONESidecar(tc.pod)
			trimmed, err := TrimPod(tc.pod.DeepCopy())
			if err != nil {
				t.Fatal(err)
			}
			p := trimmed.(*corev1.Pod)
			if got := buildWorkload(testMesh, view(ambient, nil, nil, svc), p); !proto.Equal(got, want) {
				t.Fatalf("workload changed by trimming:\n got %v\nwant %v", got, want)
			}
			if selection.HBONESidecar(p) != wantSidecar {
				t.Fatal("sidecar detection changed by trimming")
			}
			if p.ManagedFields != nil || p.Annotations[lastApplied] != "" || p.Spec.Volumes != nil || p.Status.ContainerStatuses != nil ||
				len(p.Spec.Containers) != 1 || p.Spec.Containers[0].Image != "" || p.Spec.Containers[0].Env != nil || p.Spec.Containers[0].ReadinessProbe != nil || p.Annotations["prometheus.io/scrape"] != "" || len(p.Status.Conditions) != 1 {
				t.Fatalf("unread fields kept: %+v", p)
			}
			if p.UID != tc.pod.UID || p.Spec.NodeName != tc.pod.Spec.NodeName || p.Spec.ServiceAccountName != tc.pod.Spec.ServiceAccountName ||
				len(p.OwnerReferences) != 1 {
				t.Fatal("identity or placement lost (proxy authentication and the CA's node index read them)")
			}
		})
	}
	if out, err := TrimPod(svc); err != nil || out != any(svc) {
		t.Fatal("non-pods pass through unchanged")
	}
}

// TestTrimPodSharesWhatReplicasHoldAlike: replicas of one Deployment hold
// one label map, one owner reference list and one Ready condition between
// them, with their content unchanged; pods with other labels get their own;
// the tables stay bounded.
func TestTrimPodSharesWhatReplicasHoldAlike(t *testing.T) {
	trim := func(p *corev1.Pod) *corev1.Pod {
		out, err := TrimPod(p)
		if err != nil {
			t.Fatal(err)
		}
		return out.(*corev1.Pod)
	}
	a, b := trim(fullPod("web-7d9f-aaaaa")), trim(fullPod("web-7d9f-bbbbb"))
	other := trim(fullPod("api-1", func(p *corev1.Pod) { p.Labels["app"] = "api" }))
	want := fullPod("x")
	if !maps.Equal(a.Labels, want.Labels) || !maps.Equal(other.Labels, map[string]string{"app": "api", "version": "v2"}) {
		t.Fatalf("labels changed: %v, %v", a.Labels, other.Labels)
	}
	same := func(x, y map[string]string) bool {
		return reflect.ValueOf(x).UnsafePointer() == reflect.ValueOf(y).UnsafePointer()
	}
	if !same(a.Labels, b.Labels) || same(a.Labels, other.Labels) {
		t.Fatal("equal label sets not shared, or different ones shared")
	}
	if &a.OwnerReferences[0] != &b.OwnerReferences[0] || !reflect.DeepEqual(a.OwnerReferences, want.OwnerReferences) {
		t.Fatalf("owner references not shared or changed: %v", a.OwnerReferences)
	}
	if &a.Status.Conditions[0] != &b.Status.Conditions[0] || a.Status.Conditions[0].Status != corev1.ConditionTrue {
		t.Fatalf("Ready condition not shared or changed: %v", a.Status.Conditions)
	}
	if a.Namespace != want.Namespace || a.Spec.NodeName != want.Spec.NodeName || a.Status.PodIPs[0].IP != a.Status.PodIP {
		t.Fatal("interned fields changed")
	}
	for i := range maxShared + 10 {
		trim(testPod("p", func(p *corev1.Pod) { p.Labels["n"] = strconv.Itoa(i) }))
	}
	if n := len(sharedLabels.m); n > maxShared {
		t.Fatalf("label table grew to %d (bound %d)", n, maxShared)
	}
}

package podcache

import (
	"maps"
	"reflect"
	"strconv"
	"testing"
	"unsafe"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func replica(name string, mut ...func(*corev1.Pod)) *corev1.Pod {
	isCtrl := true
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "app", Labels: map[string]string{"app": "web", "version": "v2"},
			OwnerReferences: []metav1.OwnerReference{{Kind: "ReplicaSet", Name: "web-7d9f", Controller: &isCtrl}},
			Annotations:     map[string]string{lastApplied: "{}"}},
		Spec: corev1.PodSpec{NodeName: "n1", ServiceAccountName: "web", Containers: []corev1.Container{
			{Name: "app", Image: "app:1", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080, Protocol: corev1.ProtocolTCP}, {ContainerPort: 9}}},
			{Name: "side", Ports: []corev1.ContainerPort{{Name: "metrics", ContainerPort: 9090, Protocol: corev1.ProtocolTCP}}}}},
		Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "10.0.0.1", PodIPs: []corev1.PodIP{{IP: "10.0.0.1"}},
			Conditions: []corev1.PodCondition{{Type: corev1.PodScheduled, Status: corev1.ConditionTrue}, {Type: corev1.PodReady, Status: corev1.ConditionTrue, Message: "m"}}},
	}
	for _, f := range mut {
		f(p)
	}
	return p
}

func record(t *testing.T, p *corev1.Pod) *Pod {
	t.Helper()
	out, err := Compact(p)
	if err != nil {
		t.Fatal(err)
	}
	return out.(*Pod)
}

// TestCompactSharesWhatReplicasHoldAlike: replicas of one Deployment hold
// one label map, one owner reference list and one named-port list between
// them, with their content unchanged; pods with other labels or ports get
// their own; the tables stay bounded.
func TestCompactSharesWhatReplicasHoldAlike(t *testing.T) {
	a, b := record(t, replica("web-7d9f-aaaaa")), record(t, replica("web-7d9f-bbbbb"))
	other := record(t, replica("api-1", func(p *corev1.Pod) {
		p.Labels["app"] = "api"
		p.Spec.Containers[0].Ports[0].ContainerPort = 8081
	}))
	want := replica("x")
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
	wantPorts := []corev1.ContainerPort{{Name: "http", ContainerPort: 8080, Protocol: corev1.ProtocolTCP}, {Name: "metrics", ContainerPort: 9090, Protocol: corev1.ProtocolTCP}}
	if &a.Ports[0] != &b.Ports[0] || &a.Ports[0] == &other.Ports[0] || !reflect.DeepEqual(a.Ports, wantPorts) || other.Ports[0].ContainerPort != 8081 {
		t.Fatalf("named ports not shared, or changed: %v, %v", a.Ports, other.Ports)
	}
	if a.Namespace != "app" || a.NodeName != "n1" || a.PodIPs[0].IP != a.PodIP || a.Ready != corev1.ConditionTrue ||
		unsafe.StringData(a.NodeName) != unsafe.StringData(b.NodeName) {
		t.Fatal("interned fields changed or not interned")
	}
	// Expanded, replicas share the Ready condition too.
	ea, eb := a.Expand(), b.Expand()
	if &ea.Status.Conditions[0] != &eb.Status.Conditions[0] || ea.Status.Conditions[0].Type != corev1.PodReady {
		t.Fatalf("Ready condition not shared or changed: %v", ea.Status.Conditions)
	}
	for i := range maxShared + 10 {
		record(t, replica("p", func(p *corev1.Pod) { p.Labels["n"] = strconv.Itoa(i) }))
	}
	if n := len(sharedLabels.m); n > maxShared {
		t.Fatalf("label table grew to %d (bound %d)", n, maxShared)
	}
}

// TestCompactPassesOthersThrough: client-go hands the transform records
// again on relist; other kinds are not pods.
func TestCompactPassesOthersThrough(t *testing.T) {
	rec := record(t, replica("a"))
	if out, err := Compact(rec); err != nil || out != any(rec) {
		t.Fatal("a record is not returned unchanged")
	}
	svc := &corev1.Service{}
	if out, err := Compact(svc); err != nil || out != any(svc) {
		t.Fatal("a non-pod is not returned unchanged")
	}
	cp := rec.DeepCopyObject().(*Pod)
	cp.Labels["app"] = "changed"
	cp.Ports[0].Name = "changed"
	if rec.Labels["app"] != "web" || rec.Ports[0].Name != "http" {
		t.Fatal("DeepCopyObject shares with the original")
	}
}

// TestRecordIsSmall guards the point of the package: a record is a
// fraction of the corev1.Pod it replaces in the cache.
func TestRecordIsSmall(t *testing.T) {
	rec, pod := unsafe.Sizeof(Pod{}), unsafe.Sizeof(corev1.Pod{})
	t.Logf("record %d B, corev1.Pod %d B", rec, pod)
	if rec*3 > pod {
		t.Fatalf("record %d B is over a third of a corev1.Pod (%d B)", rec, pod)
	}
}

package discovery

import (
	"maps"
	"slices"
	"strings"
	"sync"
	"unique"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambientmesh/ambient/proxylib/discovery/selection"
)

// lastApplied is kubectl's copy of the whole applied object: often the
// largest annotation, read by nobody here.
const lastApplied = "kubectl.kubernetes.io/last-applied-configuration"

// podAnnotations are the only pod annotations the manager reads from its
// cache (capture selection and sidecar detection).
var podAnnotations = []string{selection.SidecarStatusAnnotation, selection.RedirectionAnnotation, selection.DNSCaptureAnnotation}

// TrimPod is the Pod informer's transform: the manager caches every pod of
// the cluster and reads only identity (name, namespace, uid, labels, owner
// references, service account), placement (node, host network), named
// container ports (services' targetPort by name), the native sidecar
// container, the annotations in podAnnotations, phase, addresses and
// readiness (the discovery model, proxy authentication, the CA's node
// index). The rest is dropped before it enters the cache; a reader of
// anything else must read the API server (as the injector and the
// finalizer do). Nothing in the manager writes a pod back from the cache.
func TrimPod(in any) (any, error) {
	pod, ok := in.(*corev1.Pod)
	if !ok {
		return in, nil
	}
	pod.ManagedFields = nil
	pod.Annotations = keepAnnotations(pod.Annotations)
	pod.Namespace, pod.GenerateName = intern(pod.Namespace), intern(pod.GenerateName)
	pod.Labels = labelSet(pod.Labels)
	pod.OwnerReferences = ownerRefs(pod.OwnerReferences)
	pod.Spec = corev1.PodSpec{
		NodeName:           intern(pod.Spec.NodeName),
		ServiceAccountName: intern(pod.Spec.ServiceAccountName),
		HostNetwork:        pod.Spec.HostNetwork,
		Containers:         namedPorts(pod.Spec.Containers),
		InitContainers:     sidecarContainer(pod.Spec.InitContainers),
	}
	var ready []corev1.PodCondition
	for _, c := range pod.Status.Conditions {
		if c.Type == corev1.PodReady {
			ready = readyCondition[c.Status]
			if ready == nil {
				ready = []corev1.PodCondition{{Type: corev1.PodReady, Status: c.Status}}
			}
		}
	}
	ips := pod.Status.PodIPs
	if len(ips) > 0 && ips[0].IP == pod.Status.PodIP {
		ips[0].IP = pod.Status.PodIP // one copy of the primary address
	}
	pod.Status = corev1.PodStatus{Phase: corev1.PodPhase(intern(string(pod.Status.Phase))), PodIP: pod.Status.PodIP, PodIPs: ips, Conditions: ready}
	return pod, nil
}

// What many pods hold alike is held once: the informer's objects are
// read-only (client-go's contract: the discovery model reads them without
// a copy and never writes, every other reader gets a deep copy), so pods
// may share strings, label maps, owner references and the Ready condition:
// a fifth of the manager's heap per pod (docs/performance.md).

// readyCondition is the Ready condition a trimmed pod keeps, one slice per
// status, shared by every pod.
var readyCondition = map[corev1.ConditionStatus][]corev1.PodCondition{
	corev1.ConditionTrue:    {{Type: corev1.PodReady, Status: corev1.ConditionTrue}},
	corev1.ConditionFalse:   {{Type: corev1.PodReady, Status: corev1.ConditionFalse}},
	corev1.ConditionUnknown: {{Type: corev1.PodReady, Status: corev1.ConditionUnknown}},
}

// intern returns the one copy of s (weakly held: unused strings are
// collected).
func intern(s string) string {
	if s == "" {
		return ""
	}
	return unique.Make(s).Value()
}

// sharedTable holds one copy of each value by key, bounded: when full it
// starts over (later pods share with each other, the pods holding the old
// copies keep them).
type sharedTable[V any] struct {
	mu sync.Mutex
	m  map[string]V
}

// maxShared bounds each table: the distinct label sets and owners of
// the cluster's pods (about one per ReplicaSet).
const maxShared = 1 << 14

// share returns the copy held for key, or holds and returns v().
func (t *sharedTable[V]) share(key string, v func() V) V {
	t.mu.Lock()
	defer t.mu.Unlock()
	if got, ok := t.m[key]; ok {
		return got
	}
	if t.m == nil || len(t.m) >= maxShared {
		t.m = map[string]V{}
	}
	out := v()
	t.m[key] = out
	return out
}

var (
	sharedLabels sharedTable[map[string]string]
	sharedOwners sharedTable[[]metav1.OwnerReference]
)

// labelSet is the shared copy of in (keys and values interned).
func labelSet(in map[string]string) map[string]string {
	if len(in) == 0 {
		return nil
	}
	keys := slices.Sorted(maps.Keys(in))
	var b strings.Builder
	for _, k := range keys {
		b.WriteString(k)
		b.WriteByte(0)
		b.WriteString(in[k])
		b.WriteByte(0)
	}
	return sharedLabels.share(b.String(), func() map[string]string {
		out := make(map[string]string, len(in))
		for k, v := range in {
			out[intern(k)] = intern(v)
		}
		return out
	})
}

// ownerRefs is the shared copy of in.
func ownerRefs(in []metav1.OwnerReference) []metav1.OwnerReference {
	if len(in) == 0 {
		return nil
	}
	var b strings.Builder
	for _, o := range in {
		for _, f := range []string{o.APIVersion, o.Kind, o.Name, string(o.UID), boolString(o.Controller), boolString(o.BlockOwnerDeletion)} {
			b.WriteString(f)
			b.WriteByte(0)
		}
	}
	return sharedOwners.share(b.String(), func() []metav1.OwnerReference { return in })
}

func boolString(b *bool) string {
	switch {
	case b == nil:
		return "-"
	case *b:
		return "t"
	}
	return "f"
}

func keepAnnotations(in map[string]string) map[string]string {
	var out map[string]string
	for _, k := range podAnnotations {
		if v, ok := in[k]; ok {
			if out == nil {
				out = map[string]string{}
			}
			out[k] = v
		}
	}
	return out
}

// namedPorts keeps the named ports of every container, in one container:
// a service's targetPort names a port of any of them.
func namedPorts(cs []corev1.Container) []corev1.Container {
	var ports []corev1.ContainerPort
	for _, c := range cs {
		for _, p := range c.Ports {
			if p.Name != "" {
				ports = append(ports, corev1.ContainerPort{Name: p.Name, ContainerPort: p.ContainerPort, Protocol: p.Protocol})
			}
		}
	}
	if ports == nil {
		return nil
	}
	return []corev1.Container{{Name: "named-ports", Ports: ports}}
}

// sidecarContainer keeps the mesh's native sidecar container, if any.
func sidecarContainer(cs []corev1.Container) []corev1.Container {
	for _, c := range cs {
		if c.Name == selection.SidecarContainer {
			return []corev1.Container{{Name: c.Name, RestartPolicy: c.RestartPolicy}}
		}
	}
	return nil
}

// Package podcache is the manager's cache of pods in compact form. The
// manager caches every pod of the cluster but reads only a few of their
// fields; a cached corev1.Pod costs 1.3 KB however empty its fields, so the
// Pod informer stores a Pod record of those fields instead (Compact, its
// transform), and Cache serves them to every reader of the manager's cache
// as the *corev1.Pod they would have read (Expand): Get, List, field
// indexes and informer event handlers. The API server's watch still sends
// whole pods; this is about what the manager keeps (docs/performance.md).
package podcache

import (
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"unique"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/ambientmesh/ambient/proxylib/discovery/selection"
)

// lastApplied is kubectl's copy of the whole applied object: often the
// largest annotation, read by nobody here.
const lastApplied = "kubectl.kubernetes.io/last-applied-configuration"

// Annotations are the only pod annotations the manager reads from its
// cache (capture selection and sidecar detection).
var Annotations = []string{selection.SidecarStatusAnnotation, selection.RedirectionAnnotation, selection.DNSCaptureAnnotation}

// Pod is what the manager keeps of a pod: identity (name, namespace, uid,
// labels, owner references, service account), placement (node, host
// network), named container ports (a Service's targetPort and a
// ServiceEntry's ports name them), the native sidecar container, the
// annotations in Annotations, phase, addresses and readiness: what the
// discovery model, proxy authentication, the CA's node index and the
// Events on pods read. Anything else must be read from the API server (as
// the injector and the finalizer do).
//
// Records are read-only once cached (client-go's contract for informer
// objects): pods share label maps, owner references, port lists and strings.
type Pod struct {
	// ObjectMeta without managedFields and with only Annotations.
	metav1.ObjectMeta
	NodeName           string
	ServiceAccountName string
	Phase              corev1.PodPhase
	PodIP              string
	PodIPs             []corev1.PodIP
	// Ports are the named ports of every container (name, port, protocol).
	Ports []corev1.ContainerPort
	// Ready is the status of the Ready condition, "" without one.
	Ready       corev1.ConditionStatus
	HostNetwork bool
	// Sidecar: the pod has the mesh's native sidecar init container
	// (selection.SidecarContainer), with SidecarRestartPolicy ("": unset).
	Sidecar              bool
	SidecarRestartPolicy corev1.ContainerRestartPolicy
}

// GetObjectKind: records carry no type information (they are always v1 Pods).
func (p *Pod) GetObjectKind() schema.ObjectKind { return schema.EmptyObjectKind }

// DeepCopyObject copies p and everything it shares.
func (p *Pod) DeepCopyObject() runtime.Object {
	out := *p
	p.ObjectMeta.DeepCopyInto(&out.ObjectMeta)
	out.PodIPs = slices.Clone(p.PodIPs)
	out.Ports = slices.Clone(p.Ports)
	return &out
}

var _ runtime.Object = &Pod{}
var _ metav1.Object = &Pod{}

// Compact is the Pod informer's transform: a *corev1.Pod becomes its Pod
// record; anything else (a record client-go passes again on relist, other
// kinds) is returned unchanged.
func Compact(in any) (any, error) {
	pod, ok := in.(*corev1.Pod)
	if !ok {
		return in, nil
	}
	return compact(pod), nil
}

func compact(pod *corev1.Pod) *Pod {
	out := &Pod{
		ObjectMeta:         pod.ObjectMeta,
		NodeName:           intern(pod.Spec.NodeName),
		ServiceAccountName: intern(pod.Spec.ServiceAccountName),
		HostNetwork:        pod.Spec.HostNetwork,
		Ports:              namedPorts(pod.Spec.Containers),
		Phase:              corev1.PodPhase(intern(string(pod.Status.Phase))),
		PodIP:              pod.Status.PodIP,
		PodIPs:             pod.Status.PodIPs,
	}
	out.ManagedFields = nil
	out.Annotations = keepAnnotations(pod.Annotations)
	out.Namespace, out.GenerateName = intern(pod.Namespace), intern(pod.GenerateName)
	out.Labels = labelSet(pod.Labels)
	out.OwnerReferences = ownerRefs(pod.OwnerReferences)
	if len(out.PodIPs) > 0 && out.PodIPs[0].IP == out.PodIP {
		out.PodIPs[0].IP = out.PodIP // one copy of the primary address
	}
	for _, c := range pod.Status.Conditions {
		if c.Type == corev1.PodReady { // the first, as readers look for it
			out.Ready = corev1.ConditionStatus(intern(string(c.Status)))
			break
		}
	}
	for _, c := range pod.Spec.InitContainers {
		if c.Name == selection.SidecarContainer {
			out.Sidecar = true
			if c.RestartPolicy != nil {
				out.SidecarRestartPolicy = corev1.ContainerRestartPolicy(intern(string(*c.RestartPolicy)))
			}
			break
		}
	}
	return out
}

// Expand is the pod p was made from, as the manager reads it: only the
// fields of Pod, the rest empty. The result shares p's maps and slices
// (read-only, like the cache's objects); DeepCopy it to change it.
func (p *Pod) Expand() *corev1.Pod {
	out := &corev1.Pod{}
	p.expandInto(out)
	return out
}

// podTypeMeta is what the API server's pods say they are.
var podTypeMeta = metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"}

func (p *Pod) expandInto(out *corev1.Pod) {
	*out = corev1.Pod{TypeMeta: podTypeMeta, ObjectMeta: p.ObjectMeta}
	out.Spec = corev1.PodSpec{NodeName: p.NodeName, ServiceAccountName: p.ServiceAccountName, HostNetwork: p.HostNetwork}
	if len(p.Ports) > 0 {
		out.Spec.Containers = []corev1.Container{{Name: PortsContainer, Ports: p.Ports}}
	}
	if p.Sidecar {
		c := corev1.Container{Name: selection.SidecarContainer}
		if p.SidecarRestartPolicy != "" {
			rp := p.SidecarRestartPolicy
			c.RestartPolicy = &rp
		}
		out.Spec.InitContainers = []corev1.Container{c}
	}
	out.Status = corev1.PodStatus{Phase: p.Phase, PodIP: p.PodIP, PodIPs: p.PodIPs}
	if p.Ready != "" {
		out.Status.Conditions = readyCondition[p.Ready]
		if out.Status.Conditions == nil {
			out.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: p.Ready}}
		}
	}
}

// PortsContainer names the one container an expanded pod has: it holds the
// named ports of all of the pod's containers (a Service's targetPort names
// a port of any of them).
const PortsContainer = "named-ports"

// What many pods hold alike is held once: the informer's objects are
// read-only (client-go's contract: the discovery model reads them without
// a copy and never writes, every other reader gets a deep copy), so pods
// share strings, label maps, owner references and port lists, and expanded
// pods the Ready condition.

// readyCondition is the Ready condition of an expanded pod, one slice per
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

// maxShared bounds each table: the distinct label sets, owners and port
// lists of the cluster's pods (about one per ReplicaSet).
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
	sharedPorts  sharedTable[[]corev1.ContainerPort]
)

// key joins fields with NUL, which no label, name or port name contains.
func key(fields ...string) string {
	var b strings.Builder
	for _, f := range fields {
		b.WriteString(f)
		b.WriteByte(0)
	}
	return b.String()
}

// labelSet is the shared copy of in (keys and values interned).
func labelSet(in map[string]string) map[string]string {
	if len(in) == 0 {
		return nil
	}
	var kv []string
	for _, k := range slices.Sorted(maps.Keys(in)) {
		kv = append(kv, k, in[k])
	}
	return sharedLabels.share(key(kv...), func() map[string]string {
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
	var fields []string
	for _, o := range in {
		fields = append(fields, o.APIVersion, o.Kind, o.Name, string(o.UID), boolString(o.Controller), boolString(o.BlockOwnerDeletion))
	}
	return sharedOwners.share(key(fields...), func() []metav1.OwnerReference { return slices.Clip(in) })
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
	for _, k := range Annotations {
		if v, ok := in[k]; ok {
			if out == nil {
				out = map[string]string{}
			}
			out[k] = v
		}
	}
	return out
}

// namedPorts is the shared list of the named ports of every container.
func namedPorts(cs []corev1.Container) []corev1.ContainerPort {
	var fields []string
	for _, c := range cs {
		for _, p := range c.Ports {
			if p.Name != "" {
				fields = append(fields, p.Name, strconv.Itoa(int(p.ContainerPort)), string(p.Protocol))
			}
		}
	}
	if fields == nil {
		return nil
	}
	return sharedPorts.share(key(fields...), func() []corev1.ContainerPort {
		var out []corev1.ContainerPort
		for _, c := range cs {
			for _, p := range c.Ports {
				if p.Name != "" {
					out = append(out, corev1.ContainerPort{Name: intern(p.Name), ContainerPort: p.ContainerPort, Protocol: corev1.Protocol(intern(string(p.Protocol)))})
				}
			}
		}
		return slices.Clip(out)
	})
}

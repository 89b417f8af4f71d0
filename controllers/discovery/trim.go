package discovery

import (
	corev1 "k8s.io/api/core/v1"

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
	pod.Spec = corev1.PodSpec{
		NodeName:           pod.Spec.NodeName,
		ServiceAccountName: pod.Spec.ServiceAccountName,
		HostNetwork:        pod.Spec.HostNetwork,
		Containers:         namedPorts(pod.Spec.Containers),
		InitContainers:     sidecarContainer(pod.Spec.InitContainers),
	}
	var ready []corev1.PodCondition
	for _, c := range pod.Status.Conditions {
		if c.Type == corev1.PodReady {
			ready = []corev1.PodCondition{{Type: c.Type, Status: c.Status}}
		}
	}
	pod.Status = corev1.PodStatus{Phase: pod.Status.Phase, PodIP: pod.Status.PodIP, PodIPs: pod.Status.PodIPs, Conditions: ready}
	return pod, nil
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

package discovery

import (
	corev1 "k8s.io/api/core/v1"
)

// lastApplied is kubectl's copy of the whole applied object: often the
// largest annotation, read by nobody here.
const lastApplied = "kubectl.kubernetes.io/last-applied-configuration"

// TrimPod is the Pod informer's transform: the manager caches every pod of
// the cluster, and reads only identity, placement, ports and readiness
// from them (the discovery model, proxy authentication, the CA's node
// index). Everything else (managedFields, kubectl's last-applied copy,
// volumes, env, images, probes, resources, container statuses, condition
// messages) is dropped before it enters the cache. Nothing in the manager
// writes a pod back from the cache: the injector and the finalizer read the
// API server.
func TrimPod(in any) (any, error) {
	pod, ok := in.(*corev1.Pod)
	if !ok {
		return in, nil
	}
	pod.ManagedFields = nil
	delete(pod.Annotations, lastApplied)
	pod.Spec = corev1.PodSpec{
		NodeName:           pod.Spec.NodeName,
		ServiceAccountName: pod.Spec.ServiceAccountName,
		HostNetwork:        pod.Spec.HostNetwork,
		Containers:         trimContainers(pod.Spec.Containers),
		InitContainers:     trimContainers(pod.Spec.InitContainers),
	}
	conds := make([]corev1.PodCondition, 0, len(pod.Status.Conditions))
	for _, c := range pod.Status.Conditions {
		conds = append(conds, corev1.PodCondition{Type: c.Type, Status: c.Status})
	}
	pod.Status = corev1.PodStatus{Phase: pod.Status.Phase, PodIP: pod.Status.PodIP, PodIPs: pod.Status.PodIPs, Conditions: conds}
	return pod, nil
}

// trimContainers keeps what identifies a container (name, restart policy:
// native sidecars) and its named ports (services' targetPort by name).
func trimContainers(cs []corev1.Container) []corev1.Container {
	if len(cs) == 0 {
		return nil
	}
	out := make([]corev1.Container, len(cs))
	for i, c := range cs {
		out[i] = corev1.Container{Name: c.Name, RestartPolicy: c.RestartPolicy}
		for _, p := range c.Ports {
			out[i].Ports = append(out[i].Ports, corev1.ContainerPort{Name: p.Name, ContainerPort: p.ContainerPort, Protocol: p.Protocol})
		}
	}
	return out
}

// Package selection decides whether a pod is captured by the ambient mesh.
// The control plane (HBONE tunnel protocol in Workload) and the node agent
// (redirection) share it so they never disagree.
package selection

import (
	"slices"
	"strconv"

	corev1 "k8s.io/api/core/v1"
)

// Labels and annotations of the seeds (Istio's spelling).
const (
	DataplaneModeLabel      = "istio.io/dataplane-mode"
	DataplaneModeAmbient    = "ambient"
	DataplaneModeNone       = "none"
	SidecarStatusAnnotation = "sidecar.istio.io/status"
	RedirectionAnnotation   = "ambient.istio.io/redirection"
	RedirectionEnabled      = "enabled"
	RedirectionDisabled     = "disabled"
)

// The mesh's sidecar (cmd/sidecar, injected by the operator): Istio's
// container name and its label for sidecars that accept HBONE.
const (
	SidecarContainer = "istio-proxy"
	TunnelLabel      = "networking.istio.io/tunnel"
	TunnelHTTP       = "http"
)

// HBONESidecar reports whether pod runs the mesh's sidecar, which serves
// HBONE on the pod's own :15008: injected (sidecar.istio.io/status), labelled
// networking.istio.io/tunnel=http, with the native sidecar container.
func HBONESidecar(pod *corev1.Pod) bool {
	if !hasKey(pod.Annotations, SidecarStatusAnnotation) || pod.Labels[TunnelLabel] != TunnelHTTP || pod.Spec.HostNetwork {
		return false
	}
	for _, c := range pod.Spec.InitContainers {
		if c.Name == SidecarContainer && c.RestartPolicy != nil && *c.RestartPolicy == corev1.ContainerRestartPolicyAlways {
			return true
		}
	}
	return false
}

// Config is the mesh-wide part of the decision.
type Config struct {
	// MeshNamespace runs the mesh itself and is never captured.
	MeshNamespace string
	// ExcludedNamespaces (AmbientMesh capture.excludedNamespaces) are never captured.
	ExcludedNamespaces []string
}

// Reason explains a decision (for logs and the debug endpoint).
type Reason string

const (
	Captured                  Reason = "captured"
	ReasonSystemNamespace     Reason = "namespace kube-system is never captured"
	ReasonMeshNamespace       Reason = "mesh namespace is never captured"
	ReasonExcluded            Reason = "namespace is excluded by the mesh configuration"
	ReasonNamespaceNotAmbient Reason = "namespace is not labelled istio.io/dataplane-mode=ambient"
	ReasonPodOptOut           Reason = "pod is labelled istio.io/dataplane-mode=none"
	ReasonSidecar             Reason = "pod has a sidecar (sidecar.istio.io/status)"
	ReasonRedirectionOff      Reason = "pod is annotated ambient.istio.io/redirection=disabled"
	ReasonHostNetwork         Reason = "pod uses the host network"
)

// Decide reports whether pod (in ns) is captured, and why. ns may be nil
// when unknown, which means not captured.
func Decide(cfg Config, ns *corev1.Namespace, pod *corev1.Pod) (bool, Reason) {
	switch {
	case pod.Namespace == "kube-system":
		return false, ReasonSystemNamespace
	case cfg.MeshNamespace != "" && pod.Namespace == cfg.MeshNamespace:
		return false, ReasonMeshNamespace
	case slices.Contains(cfg.ExcludedNamespaces, pod.Namespace):
		return false, ReasonExcluded
	case ns == nil || ns.Labels[DataplaneModeLabel] != DataplaneModeAmbient:
		return false, ReasonNamespaceNotAmbient
	case pod.Labels[DataplaneModeLabel] == DataplaneModeNone:
		return false, ReasonPodOptOut
	case hasKey(pod.Annotations, SidecarStatusAnnotation):
		return false, ReasonSidecar
	case pod.Annotations[RedirectionAnnotation] == RedirectionDisabled:
		return false, ReasonRedirectionOff
	case pod.Spec.HostNetwork:
		return false, ReasonHostNetwork
	}
	return true, Captured
}

func hasKey(m map[string]string, k string) bool {
	_, ok := m[k]
	return ok
}

// DNSCaptureAnnotation overrides the mesh's DNS capture for one pod
// (Istio's ambient.istio.io/dns-capture): a boolean as strconv.ParseBool
// reads it ("true", "false", "1", "0", ...); unset or unparsable leaves the
// mesh's setting, as Istio does.
const DNSCaptureAnnotation = "ambient.istio.io/dns-capture"

// CaptureDNS decides whether a captured pod's DNS goes to ztunnel's DNS
// proxy: the pod's annotation when it is a boolean, else meshDefault.
func CaptureDNS(meshDefault bool, pod *corev1.Pod) bool {
	if v, ok := pod.Annotations[DNSCaptureAnnotation]; ok {
		if b, err := strconv.ParseBool(v); err == nil {
			return b
		}
	}
	return meshDefault
}

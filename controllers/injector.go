package controllers

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
	"github.com/ambientmesh/ambient/proxylib/appprobe"
	"github.com/ambientmesh/ambient/proxylib/discovery/selection"
	"github.com/ambientmesh/ambient/proxylib/redirect"
)

// Sidecar injection (Istio's names, so the seeds' commands work as typed):
// a namespace labelled istio-injection=enabled, or a pod labelled or
// annotated sidecar.istio.io/inject="true", gets the mesh's sidecar; a pod
// labelled or annotated "false" never does.
const (
	InjectionNamespaceLabel = "istio-injection"
	InjectLabel             = "sidecar.istio.io/inject"
	SidecarStatusAnnotation = selection.SidecarStatusAnnotation
	SidecarInitName         = "istio-init"
	SidecarName             = selection.SidecarContainer
	// SidecarInjectorPath is the mutating webhook's path
	// (config/webhook/sidecar_injector.yaml).
	SidecarInjectorPath = "/inject-sidecar"

	excludeOutboundPortsAnnotation    = "traffic.sidecar.istio.io/excludeOutboundPorts"
	excludeInboundPortsAnnotation     = "traffic.sidecar.istio.io/excludeInboundPorts"
	excludeOutboundIPRangesAnnotation = "traffic.sidecar.istio.io/excludeOutboundIPRanges"

	sidecarTokenVolume = "ambient-sidecar-token"
	sidecarRootVolume  = "ambient-sidecar-root-cert"
)

// SidecarInjector is the mutating webhook on pod creation. It either
// returns the whole injection as one patch or refuses the pod: the webhook
// is registered with failurePolicy Fail, so a pod that asked for a sidecar
// never starts without one.
type SidecarInjector struct {
	// Reader is the API server (not the cache): a mesh or namespace label
	// created a moment ago counts.
	Reader   client.Reader
	Defaults Defaults
	Decoder  admission.Decoder
}

// Handle implements admission.Handler.
func (i *SidecarInjector) Handle(ctx context.Context, req admission.Request) admission.Response {
	pod := &corev1.Pod{}
	if err := i.Decoder.Decode(req, pod); err != nil {
		return admission.Errored(http.StatusBadRequest, err)
	}
	if pod.Namespace == "" {
		pod.Namespace = req.Namespace
	}
	ns := &corev1.Namespace{}
	if err := i.Reader.Get(ctx, client.ObjectKey{Name: pod.Namespace}, ns); err != nil {
		return admission.Errored(http.StatusInternalServerError, fmt.Errorf("reading namespace %s: %w", pod.Namespace, err))
	}
	want, why := injectionWanted(ns, pod)
	if !want {
		return admission.Allowed("no sidecar: " + why)
	}
	mesh, err := i.mesh(ctx)
	if err != nil {
		return admission.Errored(http.StatusInternalServerError, err)
	}
	if mesh == nil {
		return admission.Denied(fmt.Sprintf("sidecar injection requested (%s) but no AmbientMesh is installed, so the pod would start without a working sidecar; "+
			"create an AmbientMesh first, or opt the pod out with %s=false", why, InjectLabel))
	}
	if pod.Namespace == mesh.Spec.Namespace || pod.Namespace == "kube-system" {
		// The mesh's own pods (ztunnel, node agent) must start whatever
		// labels their namespace carries.
		return admission.Allowed(fmt.Sprintf("no sidecar: namespace %s never gets sidecars (%s ignored)", pod.Namespace, why))
	}
	// Validated here, so a typo is refused with its reason instead of
	// leaving the pod's init container failing; it parses the same values.
	_, err = redirect.ParseExclusions(pod.Annotations[excludeOutboundPortsAnnotation], pod.Annotations[excludeInboundPortsAnnotation],
		pod.Annotations[excludeOutboundIPRangesAnnotation])
	if err != nil {
		return admission.Denied(fmt.Sprintf("sidecar injection: annotation traffic.sidecar.istio.io/%v", err))
	}
	if err := InjectSidecar(pod, mesh, i.Defaults.SidecarImage); err != nil {
		return admission.Denied("sidecar injection: " + err.Error())
	}
	patched, err := json.Marshal(pod)
	if err != nil {
		return admission.Errored(http.StatusInternalServerError, err)
	}
	// One patch against the request's own object: all of it or nothing.
	return admission.PatchResponseFromRaw(req.Object.Raw, patched)
}

// mesh is the cluster's AmbientMesh (nil if none, or only one being deleted).
func (i *SidecarInjector) mesh(ctx context.Context) (*meshv1.AmbientMesh, error) {
	list := &meshv1.AmbientMeshList{}
	if err := i.Reader.List(ctx, list); err != nil {
		return nil, fmt.Errorf("looking up the AmbientMesh: %w", err)
	}
	for k := range list.Items {
		if list.Items[k].DeletionTimestamp.IsZero() {
			return &list.Items[k], nil
		}
	}
	return nil, nil
}

// injectionWanted applies Istio's precedence: the pod's own "false" (label,
// then annotation) wins, then its "true", then the namespace label; pods
// already injected, on the host network or of a waypoint are left alone.
func injectionWanted(ns *corev1.Namespace, pod *corev1.Pod) (bool, string) {
	switch {
	case hasKey(pod.Annotations, SidecarStatusAnnotation):
		return false, "already injected (" + SidecarStatusAnnotation + ")"
	case pod.Spec.HostNetwork:
		return false, "pod uses the host network"
	case pod.Labels["gateway.networking.k8s.io/gateway-name"] != "" || pod.Labels["mesh.ambient.dev/waypoint"] != "":
		return false, "pod is a waypoint"
	}
	optIn := ""
	for _, src := range []struct {
		what string
		m    map[string]string
	}{{"label", pod.Labels}, {"annotation", pod.Annotations}} {
		v, ok := src.m[InjectLabel]
		switch {
		case ok && strings.EqualFold(v, "false"):
			return false, fmt.Sprintf("pod %s %s=%s", src.what, InjectLabel, v)
		case ok && strings.EqualFold(v, "true") && optIn == "":
			optIn = fmt.Sprintf("pod %s %s=%s", src.what, InjectLabel, v)
		}
	}
	if optIn != "" {
		return true, optIn
	}
	if v := ns.Labels[InjectionNamespaceLabel]; v == "enabled" {
		return true, fmt.Sprintf("namespace %s is labelled %s=enabled", ns.Name, InjectionNamespaceLabel)
	}
	return false, "not requested"
}

func hasKey(m map[string]string, k string) bool {
	_, ok := m[k]
	return ok
}

// sidecarStatus is the sidecar.istio.io/status value: what was injected.
type sidecarStatus struct {
	InitContainers []string `json:"initContainers"`
	Volumes        []string `json:"volumes"`
	Image          string   `json:"image"`
}

// InjectSidecar adds the redirection init container, the native sidecar,
// their volumes, the HBONE tunnel label and the status annotation. The
// app's containers are not touched: no capability is added to them.
func InjectSidecar(pod *corev1.Pod, mesh *meshv1.AmbientMesh, image string) error {
	if image == "" {
		return fmt.Errorf("the operator has no sidecar image configured (--sidecar-image)")
	}
	taken := map[string]bool{}
	for _, c := range append(append([]corev1.Container{}, pod.Spec.InitContainers...), pod.Spec.Containers...) {
		taken[c.Name] = true
	}
	for _, v := range pod.Spec.Volumes {
		taken["volume/"+v.Name] = true
	}
	for _, n := range []string{SidecarInitName, SidecarName, "volume/" + sidecarTokenVolume, "volume/" + sidecarRootVolume} {
		if taken[n] {
			return fmt.Errorf("the pod already has %s, a name the sidecar needs", strings.TrimPrefix(n, "volume/"))
		}
	}
	if pod.Spec.ServiceAccountName == "" {
		// What the ServiceAccount admission plugin sets anyway; the projected
		// token needs it spelled out.
		pod.Spec.ServiceAccountName = "default"
	}
	probers, err := rewriteAppProbes(pod)
	if err != nil {
		return err
	}
	z := mesh.Spec.Ztunnel
	env := append(proxyEnv(mesh, z.Transport, z.LogLevel),
		fieldEnv("POD_UID", "metadata.uid"),
		fieldEnv("SERVICE_ACCOUNT", "spec.serviceAccountName"),
		// No ROOT_NAMESPACE: the sidecar's L7 engine learns the root
		// namespace from the control plane (its Mesh resource).
		fieldEnv("INSTANCE_IP", "status.podIP"))
	if probers != "" {
		env = append(env, corev1.EnvVar{Name: appprobe.EnvVar, Value: probers})
	}
	mounts := []corev1.VolumeMount{
		{Name: sidecarTokenVolume, MountPath: tokenMountDir, ReadOnly: true},
		{Name: sidecarRootVolume, MountPath: rootCertMountDir, ReadOnly: true},
	}
	uid := int64(redirect.SidecarUID)
	ready := &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/healthz/ready", Port: intstr.FromInt32(proxyReadinessPort)}},
		PeriodSeconds: 2, FailureThreshold: 30, TimeoutSeconds: 3}
	startup := ready.DeepCopy()
	startup.PeriodSeconds, startup.FailureThreshold = 1, 600
	proxyC := corev1.Container{
		Name: SidecarName, Image: image, ImagePullPolicy: corev1.PullIfNotPresent,
		// Native sidecar: started before the app's containers (once ready,
		// by the startup probe) and stopped after them.
		RestartPolicy: ptr.To(corev1.ContainerRestartPolicyAlways),
		Env:           env,
		Ports: []corev1.ContainerPort{
			{Name: "hbone", ContainerPort: hbonePort, Protocol: corev1.ProtocolTCP},
			{Name: "http-metrics", ContainerPort: proxyMetricsPort, Protocol: corev1.ProtocolTCP},
		},
		StartupProbe: startup, ReadinessProbe: ready,
		Resources: corev1.ResourceRequirements{Requests: corev1.ResourceList{
			corev1.ResourceCPU: resource.MustParse("10m"), corev1.ResourceMemory: resource.MustParse("32Mi")}},
		SecurityContext: &corev1.SecurityContext{RunAsUser: &uid, RunAsGroup: &uid, RunAsNonRoot: ptr.To(true),
			AllowPrivilegeEscalation: ptr.To(false), ReadOnlyRootFilesystem: ptr.To(true),
			Capabilities: &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}}},
		VolumeMounts: mounts,
	}
	initEnv := []corev1.EnvVar{{Name: "SIDECAR_UID", Value: fmt.Sprint(redirect.SidecarUID)}}
	for _, a := range []struct{ env, annotation string }{
		{"EXCLUDE_OUTBOUND_PORTS", excludeOutboundPortsAnnotation},
		{"EXCLUDE_INBOUND_PORTS", excludeInboundPortsAnnotation},
		{"EXCLUDE_OUTBOUND_IP_RANGES", excludeOutboundIPRangesAnnotation},
	} {
		if v := pod.Annotations[a.annotation]; v != "" {
			initEnv = append(initEnv, corev1.EnvVar{Name: a.env, Value: v})
		}
	}
	initC := corev1.Container{
		Name: SidecarInitName, Image: image, ImagePullPolicy: corev1.PullIfNotPresent,
		Args: []string{"init"}, Env: initEnv,
		Resources: corev1.ResourceRequirements{Requests: corev1.ResourceList{
			corev1.ResourceCPU: resource.MustParse("10m"), corev1.ResourceMemory: resource.MustParse("16Mi")}},
		// The only container with a network capability: it writes the
		// pod's redirection rules and exits before anything else starts.
		SecurityContext: &corev1.SecurityContext{RunAsUser: ptr.To(int64(0)), RunAsNonRoot: ptr.To(false),
			AllowPrivilegeEscalation: ptr.To(false), ReadOnlyRootFilesystem: ptr.To(true),
			Capabilities: &corev1.Capabilities{Add: []corev1.Capability{"NET_ADMIN"}, Drop: []corev1.Capability{"ALL"}}},
	}
	pod.Spec.InitContainers = append([]corev1.Container{initC, proxyC}, pod.Spec.InitContainers...)
	pod.Spec.Volumes = append(pod.Spec.Volumes,
		corev1.Volume{Name: sidecarTokenVolume, VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{
			Sources: []corev1.VolumeProjection{{ServiceAccountToken: &corev1.ServiceAccountTokenProjection{
				Audience: TokenAudience, ExpirationSeconds: ptr.To[int64](tokenExpirySeconds), Path: tokenFile}}}}}},
		corev1.Volume{Name: sidecarRootVolume, VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
			LocalObjectReference: corev1.LocalObjectReference{Name: RootCertConfigMap}}}})
	if pod.Labels == nil {
		pod.Labels = map[string]string{}
	}
	pod.Labels[selection.TunnelLabel] = selection.TunnelHTTP
	if pod.Annotations == nil {
		pod.Annotations = map[string]string{}
	}
	st, _ := json.Marshal(sidecarStatus{InitContainers: []string{SidecarInitName, SidecarName},
		Volumes: []string{sidecarTokenVolume, sidecarRootVolume}, Image: image})
	pod.Annotations[SidecarStatusAnnotation] = string(st)
	// kubectl exec/logs keep meaning the app, as with Istio's injector.
	if _, set := pod.Annotations[DefaultContainerAnnotation]; !set && len(pod.Spec.Containers) > 0 {
		pod.Annotations[DefaultContainerAnnotation] = pod.Spec.Containers[0].Name
	}
	return nil
}

// DefaultContainerAnnotation names the container kubectl picks by default.
const DefaultContainerAnnotation = "kubectl.kubernetes.io/default-container"

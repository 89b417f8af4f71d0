package controllers

import (
	"encoding/json"
	"fmt"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/ambientmesh/ambient/proxylib/appprobe"
)

// RewriteProbesAnnotation opts a pod out of probe rewriting (Istio's name;
// rewriting is on unless it is "false").
const RewriteProbesAnnotation = "sidecar.istio.io/rewriteAppHTTPProbers"

// rewriteAppProbes points the app containers' httpGet, tcpSocket and grpc
// probes at the sidecar's status port and returns the originals for the
// sidecar (appprobe.EnvVar). Under STRICT the sidecar's inbound refuses the
// kubelet's plaintext probes; the status port is outside the redirection,
// and the sidecar probes the app from inside the pod. Exec probes run in
// the container and are left alone, as are probes of the sidecar's own
// ports. Named ports are resolved here, against the container's ports.
func rewriteAppProbes(pod *corev1.Pod) (string, error) {
	if strings.EqualFold(pod.Annotations[RewriteProbesAnnotation], "false") {
		return "", nil
	}
	probers := appprobe.Probers{}
	for i := range pod.Spec.Containers {
		c := &pod.Spec.Containers[i]
		for _, p := range []struct {
			kind  string
			probe *corev1.Probe
		}{{"livez", c.LivenessProbe}, {"readyz", c.ReadinessProbe}, {"startupz", c.StartupProbe}} {
			if p.probe == nil {
				continue
			}
			path := appprobe.Path(c.Name, p.kind)
			orig, err := originalProbe(c, p.probe)
			if err != nil {
				return "", fmt.Errorf("container %s %s probe: %w", c.Name, p.kind, err)
			}
			if orig == nil {
				continue
			}
			probers[path] = orig
			p.probe.ProbeHandler = corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{
				Path: path, Port: intstr.FromInt32(proxyMetricsPort), Scheme: corev1.URISchemeHTTP}}
		}
	}
	if len(probers) == 0 {
		return "", nil
	}
	b, err := json.Marshal(probers)
	return string(b), err
}

// originalProbe is what the sidecar must run for p, or nil when p stays as
// it is (exec, or aimed at the sidecar itself).
func originalProbe(c *corev1.Container, p *corev1.Probe) (*appprobe.Prober, error) {
	h := p.ProbeHandler
	out := &appprobe.Prober{TimeoutSeconds: p.TimeoutSeconds}
	var port int
	var err error
	switch {
	case h.HTTPGet != nil:
		if port, err = containerPort(c, h.HTTPGet.Port); err != nil {
			return nil, err
		}
		g := &appprobe.HTTPGet{Path: h.HTTPGet.Path, Port: port, Host: h.HTTPGet.Host, Scheme: string(h.HTTPGet.Scheme)}
		for _, hd := range h.HTTPGet.HTTPHeaders {
			g.Headers = append(g.Headers, appprobe.Header{Name: hd.Name, Value: hd.Value})
		}
		out.HTTPGet = g
	case h.TCPSocket != nil:
		if port, err = containerPort(c, h.TCPSocket.Port); err != nil {
			return nil, err
		}
		out.TCPSocket = &appprobe.TCPSocket{Host: h.TCPSocket.Host, Port: port}
	case h.GRPC != nil:
		port = int(h.GRPC.Port)
		out.GRPC = &appprobe.GRPC{Port: port, Service: h.GRPC.Service}
	default:
		return nil, nil
	}
	if port == proxyMetricsPort || port == proxyReadinessPort {
		return nil, nil
	}
	// A probe aimed at another host stays with the kubelet, as without a
	// sidecar: the sidecar probes its own pod only, never a plaintext path
	// out of the pod past the mesh.
	if (out.HTTPGet != nil && out.HTTPGet.Host != "") || (out.TCPSocket != nil && out.TCPSocket.Host != "") {
		return nil, nil
	}
	return out, nil
}

// containerPort resolves a probe's port as the kubelet does: a number, or
// the name of one of the container's ports.
func containerPort(c *corev1.Container, p intstr.IntOrString) (int, error) {
	if p.Type == intstr.Int {
		if p.IntVal < 1 || p.IntVal > 65535 {
			return 0, fmt.Errorf("port %d out of range", p.IntVal)
		}
		return int(p.IntVal), nil
	}
	for _, cp := range c.Ports {
		if cp.Name == p.StrVal {
			return int(cp.ContainerPort), nil
		}
	}
	return 0, fmt.Errorf("port %q is not a named port of the container", p.StrVal)
}

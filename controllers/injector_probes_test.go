package controllers

import (
	"context"
	"encoding/json"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/ambientmesh/ambient/proxylib/appprobe"
)

func httpProbe(port intstr.IntOrString) *corev1.Probe {
	return &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/healthz", Port: port, Scheme: corev1.URISchemeHTTPS,
		HTTPHeaders: []corev1.HTTPHeader{{Name: "X-Probe", Value: "1"}}}}, TimeoutSeconds: 4, PeriodSeconds: 7}
}

func tcpProbe(port intstr.IntOrString) *corev1.Probe {
	return &corev1.Probe{ProbeHandler: corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: port}}}
}

func grpcProbe(port int32) *corev1.Probe {
	return &corev1.Probe{ProbeHandler: corev1.ProbeHandler{GRPC: &corev1.GRPCAction{Port: port, Service: ptr.To("svc")}}}
}

func execProbe() *corev1.Probe {
	return &corev1.Probe{ProbeHandler: corev1.ProbeHandler{Exec: &corev1.ExecAction{Command: []string{"true"}}}}
}

// statusProbe is the rewritten probe for container c's kind.
func statusProbe(c, kind string) *corev1.HTTPGetAction {
	return &corev1.HTTPGetAction{Path: appprobe.Path(c, kind), Port: intstr.FromInt32(15020), Scheme: corev1.URISchemeHTTP}
}

// TestSidecarProbeRewrite: the injector (the real webhook behind the real
// API server) points the app's probes at the sidecar's status port and
// hands the originals to the sidecar; exec probes, probes of the sidecar's
// own ports and opted-out pods keep theirs; an unknown named port refuses
// the pod.
func otherHost(p *corev1.Probe) *corev1.Probe {
	p.HTTPGet.Host = "db.example.com"
	return p
}

func otherHostTCP(p *corev1.Probe) *corev1.Probe {
	p.TCPSocket.Host = "10.9.9.9"
	return p
}

func TestSidecarProbeRewrite(t *testing.T) {
	injectionNamespace(t, "inj-probes", map[string]string{InjectionNamespaceLabel: "enabled"})
	newMesh(t, "probes", "probes-mesh", nil)
	eventually(t, "mesh exists", exists(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "probes-mesh"}}))

	app := func(probes ...*corev1.Probe) corev1.Container {
		c := corev1.Container{Name: "app", Image: "app", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}, {Name: "admin", ContainerPort: 9901}}}
		c.LivenessProbe, c.ReadinessProbe, c.StartupProbe = probes[0], probes[1], probes[2]
		return c
	}
	named := httpProbe(intstr.FromString("admin"))
	tests := []struct {
		name        string
		annotations map[string]string
		containers  []corev1.Container
		// want: the probers handed over; rewritten: container/kind pairs
		// now aimed at the status port (every other probe unchanged).
		want      appprobe.Probers
		rewritten []string
		refused   string
	}{
		{name: "http tcp grpc", containers: []corev1.Container{app(httpProbe(intstr.FromInt32(8080)), tcpProbe(intstr.FromInt32(8080)), grpcProbe(9090))},
			want: appprobe.Probers{
				"/app-health/app/livez": {HTTPGet: &appprobe.HTTPGet{Path: "/healthz", Port: 8080, Scheme: "HTTPS",
					Headers: []appprobe.Header{{Name: "X-Probe", Value: "1"}}}, TimeoutSeconds: 4},
				"/app-health/app/readyz":   {TCPSocket: &appprobe.TCPSocket{Port: 8080}, TimeoutSeconds: 1},
				"/app-health/app/startupz": {GRPC: &appprobe.GRPC{Port: 9090, Service: ptr.To("svc")}, TimeoutSeconds: 1},
			}, rewritten: []string{"app/livez", "app/readyz", "app/startupz"}},
		{name: "named ports", containers: []corev1.Container{app(named, tcpProbe(intstr.FromString("http")), nil)},
			want: appprobe.Probers{
				"/app-health/app/livez": {HTTPGet: &appprobe.HTTPGet{Path: "/healthz", Port: 9901, Scheme: "HTTPS",
					Headers: []appprobe.Header{{Name: "X-Probe", Value: "1"}}}, TimeoutSeconds: 4},
				"/app-health/app/readyz": {TCPSocket: &appprobe.TCPSocket{Port: 8080}, TimeoutSeconds: 1},
			}, rewritten: []string{"app/livez", "app/readyz"}},
		{name: "probes of another host stay with the kubelet", containers: []corev1.Container{app(otherHost(httpProbe(intstr.FromInt32(8080))), tcpProbe(intstr.FromInt32(8080)), otherHostTCP(tcpProbe(intstr.FromInt32(8080))))},
			want:      appprobe.Probers{"/app-health/app/readyz": {TCPSocket: &appprobe.TCPSocket{Port: 8080}, TimeoutSeconds: 1}},
			rewritten: []string{"app/readyz"}},
		{name: "exec untouched", containers: []corev1.Container{app(execProbe(), tcpProbe(intstr.FromInt32(8080)), execProbe())},
			want:      appprobe.Probers{"/app-health/app/readyz": {TCPSocket: &appprobe.TCPSocket{Port: 8080}, TimeoutSeconds: 1}},
			rewritten: []string{"app/readyz"}},
		{name: "two containers", containers: []corev1.Container{app(nil, tcpProbe(intstr.FromInt32(8080)), nil),
			{Name: "side", Image: "side", ReadinessProbe: grpcProbe(7070)}},
			want: appprobe.Probers{"/app-health/app/readyz": {TCPSocket: &appprobe.TCPSocket{Port: 8080}, TimeoutSeconds: 1},
				"/app-health/side/readyz": {GRPC: &appprobe.GRPC{Port: 7070, Service: ptr.To("svc")}, TimeoutSeconds: 1}},
			rewritten: []string{"app/readyz", "side/readyz"}},
		{name: "sidecar's own port untouched", containers: []corev1.Container{app(nil, httpProbe(intstr.FromInt32(15021)), nil)}},
		{name: "no probes", containers: []corev1.Container{app(nil, nil, nil)}},
		{name: "opted out", annotations: map[string]string{RewriteProbesAnnotation: "false"},
			containers: []corev1.Container{app(httpProbe(intstr.FromInt32(8080)), tcpProbe(intstr.FromInt32(8080)), grpcProbe(9090))}},
		{name: "opt-out other value rewrites", annotations: map[string]string{RewriteProbesAnnotation: "true"},
			containers: []corev1.Container{app(nil, tcpProbe(intstr.FromInt32(8080)), nil)},
			want:       appprobe.Probers{"/app-health/app/readyz": {TCPSocket: &appprobe.TCPSocket{Port: 8080}, TimeoutSeconds: 1}},
			rewritten:  []string{"app/readyz"}},
		{name: "unknown named port", containers: []corev1.Container{app(nil, tcpProbe(intstr.FromString("grpc")), nil)},
			refused: `container app readyz probe: port "grpc" is not a named port of the container`},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "probes-" + string(rune('a'+i)), Namespace: "inj-probes", Annotations: tt.annotations},
				Spec: corev1.PodSpec{Containers: tt.containers}}
			orig := pod.DeepCopy()
			err := k8s.Create(context.Background(), pod)
			if tt.refused != "" {
				if err == nil || !strings.Contains(err.Error(), tt.refused) {
					t.Fatalf("create: %v, want refused with %q", err, tt.refused)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = k8s.Delete(context.Background(), pod, client.GracePeriodSeconds(0)) })
			if _, ok := pod.Annotations[SidecarStatusAnnotation]; !ok {
				t.Fatal("not injected")
			}
			checkProbers(t, pod, tt.want)
			rewritten := map[string]bool{}
			for _, r := range tt.rewritten {
				rewritten[r] = true
			}
			for ci, c := range pod.Spec.Containers {
				oc := orig.Spec.Containers[ci]
				for _, p := range []struct {
					kind      string
					got, orig *corev1.Probe
				}{{"livez", c.LivenessProbe, oc.LivenessProbe}, {"readyz", c.ReadinessProbe, oc.ReadinessProbe}, {"startupz", c.StartupProbe, oc.StartupProbe}} {
					if p.orig == nil {
						continue
					}
					want := p.orig.ProbeHandler
					if rewritten[c.Name+"/"+p.kind] {
						want = corev1.ProbeHandler{HTTPGet: statusProbe(c.Name, p.kind)}
					}
					if !jsonEqual(p.got.ProbeHandler, want) {
						t.Errorf("%s %s probe: got %s, want %s", c.Name, p.kind, toJSON(p.got.ProbeHandler), toJSON(want))
					}
					// Timing stays the app's.
					if p.got.PeriodSeconds != p.orig.PeriodSeconds && p.orig.PeriodSeconds != 0 {
						t.Errorf("%s %s probe period %d, want %d", c.Name, p.kind, p.got.PeriodSeconds, p.orig.PeriodSeconds)
					}
				}
			}
		})
	}
}

// checkProbers: the sidecar container carries exactly want (none: no var).
func checkProbers(t *testing.T, pod *corev1.Pod, want appprobe.Probers) {
	t.Helper()
	var sidecar *corev1.Container
	for i := range pod.Spec.InitContainers {
		if pod.Spec.InitContainers[i].Name == SidecarName {
			sidecar = &pod.Spec.InitContainers[i]
		}
	}
	if sidecar == nil {
		t.Fatal("no sidecar container")
	}
	var got string
	for _, e := range sidecar.Env {
		if e.Name == appprobe.EnvVar {
			got = e.Value
		}
	}
	if len(want) == 0 {
		if got != "" {
			t.Fatalf("%s=%s, want unset", appprobe.EnvVar, got)
		}
		return
	}
	parsed, err := appprobe.Parse(got)
	if err != nil {
		t.Fatalf("the sidecar would refuse its probers: %v", err)
	}
	if !jsonEqual(parsed, want) {
		t.Fatalf("%s:\n got %s\nwant %s", appprobe.EnvVar, toJSON(parsed), toJSON(want))
	}
}

func toJSON(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

func jsonEqual(a, b any) bool { return toJSON(a) == toJSON(b) }

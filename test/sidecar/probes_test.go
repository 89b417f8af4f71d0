package sidecar

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
	"github.com/ambientmesh/ambient/controllers"
	"github.com/ambientmesh/ambient/proxylib/appprobe"
	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/netnsutil"
	"github.com/ambientmesh/ambient/test/meshtest"
)

// injectedProbes runs the real injector on an httpbin pod spec: the
// kubelet's probes as rewritten, and the sidecar's probers.
func injectedProbes(t *testing.T) (corev1.Container, appprobe.Probers) {
	t.Helper()
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "sc-httpbin-1", Namespace: meshtest.Namespace},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "httpbin", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 80}},
			ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/", Port: intstr.FromString("http")}}},
			LivenessProbe:  &corev1.Probe{ProbeHandler: corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(80)}}},
			// Nothing listens on 81: the rewritten probe must fail too.
			StartupProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(81)}}},
		}}}}
	mesh := &meshv1.AmbientMesh{Spec: meshv1.AmbientMeshSpec{Namespace: "mesh-root", TrustDomain: "cluster.local"}}
	if err := controllers.InjectSidecar(pod, mesh, "sidecar:test"); err != nil {
		t.Fatal(err)
	}
	for _, c := range pod.Spec.InitContainers {
		for _, e := range c.Env {
			if e.Name == appprobe.EnvVar {
				p, err := appprobe.Parse(e.Value)
				if err != nil {
					t.Fatal(err)
				}
				return pod.Spec.Containers[0], p
			}
		}
	}
	t.Fatal("the injector set no probers")
	return corev1.Container{}, nil
}

// serveStatus serves the sidecar's status port inside the pod, as
// cmd/sidecar does (its probe connections are the sidecar user's, which the
// pod's redirection lets pass).
func serveStatus(t *testing.T, sp *meshtest.SidecarPod, probers appprobe.Probers) {
	t.Helper()
	f, err := sp.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ln, err := netnsutil.ListenTCP(f, ":15020", netnsutil.SocketOptions{})
	if err != nil {
		t.Fatal(err)
	}
	h := &appprobe.Handler{Probers: probers, Host: sp.IP.String(), Dial: func(ctx context.Context, _, addr string) (net.Conn, error) {
		ns, err := sp.Open()
		if err != nil {
			return nil, err
		}
		defer ns.Close()
		return netnsutil.DialTCP(ctx, ns, netip.AddrPort{}, netip.MustParseAddrPort(addr), netnsutil.SocketOptions{})
	}}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
}

// kubelet probes from the node's own network namespace, in plaintext.
func kubelet(t *testing.T, n *meshtest.Node) *http.Client {
	return &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			f, err := n.Open()
			if err != nil {
				return nil, err
			}
			defer f.Close()
			return netnsutil.DialTCP(ctx, f, netip.AddrPort{}, netip.MustParseAddrPort(addr), netnsutil.SocketOptions{})
		}}}
}

func probe(c *http.Client, url string) (int, error) {
	resp, err := c.Get(url)
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.StatusCode, nil
}

// TestAppProbesUnderStrict: with PeerAuthentication STRICT in force, the
// kubelet's plaintext probe of the app is refused by the sidecar's inbound,
// while the injector's rewritten probe (the sidecar's status port, the
// sidecar probing the app from inside the pod) passes — and still fails
// when the app does not answer.
func TestAppProbesUnderStrict(t *testing.T) {
	m := meshtest.New(t, 1, meshtest.WithServiceAccounts("sc-httpbin"))
	m.SyncAll()
	sp := m.AddSidecarPod(m.Nodes[0], "sc-httpbin-1", "sc-httpbin")
	sp.ServeHTTP(t, 80)
	app, probers := injectedProbes(t)
	serveStatus(t, sp, probers)
	kc := kubelet(t, m.Nodes[0])
	direct := fmt.Sprintf("http://%s/", sp.Addr(80))

	if code, err := probe(kc, direct); err != nil || code != http.StatusOK {
		t.Fatalf("PERMISSIVE: direct probe got %d, %v; want 200", code, err)
	}
	m.CP.Policy(meshtest.StrictPolicy())
	defer m.CP.Remove(discovery.AuthorizationType, "default/converted_peer_authentication_default")

	// The policy reaches the sidecar asynchronously: wait for the refusal.
	var err error
	for i := 0; i < 100; i++ {
		if _, err = probe(kc, direct); err != nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err == nil {
		t.Fatal("STRICT: the kubelet's plaintext probe of the app still passes")
	}
	m.Logs.WaitFor(t, "(none)->"+sp.Addr(80).String()+" policy=")

	for _, tt := range []struct {
		kind  string
		probe *corev1.Probe
		want  int
	}{
		{"readyz", app.ReadinessProbe, http.StatusOK},
		{"livez", app.LivenessProbe, http.StatusOK},
		{"startupz", app.StartupProbe, http.StatusInternalServerError},
	} {
		t.Run(tt.kind, func(t *testing.T) {
			g := tt.probe.HTTPGet
			if g == nil || g.Port.IntValue() != 15020 || g.Path != appprobe.Path("httpbin", tt.kind) {
				t.Fatalf("probe not rewritten to the status port: %+v", tt.probe.ProbeHandler)
			}
			code, err := probe(kc, fmt.Sprintf("http://%s%s", sp.Addr(uint16(g.Port.IntValue())), g.Path))
			if err != nil || code != tt.want {
				t.Fatalf("rewritten probe got %d, %v; want %d", code, err, tt.want)
			}
		})
	}
}

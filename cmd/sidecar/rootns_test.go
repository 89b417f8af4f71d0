package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/meshapi"
	"github.com/ambientmesh/ambient/proxylib/netnsutil"
	"github.com/ambientmesh/ambient/test/proctest"
)

// TestSidecarWithoutRootNamespace: a pod injected before the injector set
// ROOT_NAMESPACE (or after it stopped) runs the real binary with no root
// namespace in its environment or flags. The sidecar starts, learns the
// root namespace from the control plane's Mesh resource, and applies the
// root namespace's L7 policy to its pod (mesh-wide: GET only).
// Before: it exited with "POD_NAME, POD_NAMESPACE and ROOT_NAMESPACE are
// required" and the pod never became ready.
func TestSidecarWithoutRootNamespace(t *testing.T) {
	if v, ok := os.LookupEnv("ROOT_NAMESPACE"); ok {
		t.Fatalf("the test's environment sets ROOT_NAMESPACE=%q: the sidecar would inherit it", v)
	}
	pod, _, podNS, peerNS, cp := newWebPod(t)
	policy := `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: get-only, namespace: ` + proctest.RootNamespace + `}
spec:
  action: ALLOW
  rules: [{to: [{operation: {methods: ["GET"]}}]}]
`
	js, err := yaml.YAMLToJSON([]byte(policy))
	if err != nil {
		t.Fatal(err)
	}
	cp.Resource(t, discovery.L7ResourceType, discovery.L7Key("security.istio.io", "AuthorizationPolicy", proctest.RootNamespace, "get-only"),
		&meshapi.L7Resource{Group: "security.istio.io", Kind: "AuthorizationPolicy", Namespace: proctest.RootNamespace, Name: "get-only", Json: js})

	proctest.StartSidecar(t, proctest.Sidecar{Exe: proctest.Executable(t), PodNS: podNS, ProbeNS: peerNS, IP: pod.IP, Name: "web",
		Roots: cp.Roots, Env: []string{runMainEnv + "=1"}})
	ln, err := netnsutil.ListenTCP(podNS, "[::]:8080", netnsutil.SocketOptions{})
	if err != nil {
		t.Fatal(err)
	}
	app := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, "app") })}
	go app.Serve(ln)
	t.Cleanup(func() { app.Close() })

	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true, DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
		return netnsutil.DialTCP(ctx, peerNS, netip.AddrPort{}, netip.MustParseAddrPort(addr), netnsutil.SocketOptions{})
	}}}
	url := "http://" + netip.AddrPortFrom(pod.IP, 8080).String() + "/"
	for _, tt := range []struct {
		method string
		want   int
	}{{"GET", 200}, {"POST", 403}} {
		req, _ := http.NewRequest(tt.method, url, strings.NewReader(""))
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("%s: %v", tt.method, err)
		}
		resp.Body.Close()
		if resp.StatusCode != tt.want {
			t.Errorf("%s through the sidecar: %d, want %d (the root namespace's GET-only policy)", tt.method, resp.StatusCode, tt.want)
		}
	}
}

//go:build e2e

package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// TestSidecarL7Policy: an AuthorizationPolicy with L7 rules selecting an
// injected httpbin is enforced by its sidecar request by request (as an
// Istio sidecar does): the allowed principal's GET on an allowed path is
// served, other paths, methods and callers get 403 (before the sidecar's
// L7 engine every request was refused at connect by the policy's lossy L4
// form), and the sidecar reports istio_requests_total with
// reporter="destination".
func TestSidecarL7Policy(t *testing.T) {
	requireMesh(t)
	deployJourney(t)
	enrollAmbient(t, demoNS)
	const clientNS, serverNS = "e2e-client-l7", "e2e-sidecar-l7"
	injectedNamespace(t, clientNS, "sleep")
	injectedNamespace(t, serverNS, "httpbin")
	t.Cleanup(func() { kubectl("delete", "namespace", clientNS, serverNS, "--wait=false") })
	apply(t, serverNS, fmt.Sprintf(`
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: httpbin-l7}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/%s/sa/sleep"]}}]
    to: [{operation: {methods: ["GET"], paths: ["/get", "/headers"]}}]
`, clientNS))
	url := "http://httpbin." + serverNS + ".svc.cluster.local:8000"
	status := func(ns, method, path string) string {
		out, _ := curl(t, ns, "deploy/sleep", "-o", "/dev/null", "-w", "%{http_code}", "-X", method, url+path)
		return strings.TrimSpace(out)
	}
	cases := []struct {
		name, ns, method, path, want string
	}{
		{"sidecar client GET /get", clientNS, "GET", "/get", "200"},
		{"sidecar client GET on a path not allowed", clientNS, "GET", "/status/418", "403"},
		{"sidecar client POST", clientNS, "POST", "/post", "403"},
		{"ambient client (other principal)", demoNS, "GET", "/get", "403"},
	}
	for _, c := range cases {
		eventually(t, 60*time.Second, c.name, func() error {
			if got := status(c.ns, c.method, c.path); got != c.want {
				return fmt.Errorf("%s %s from %s: %s, want %s", c.method, c.path, c.ns, got, c.want)
			}
			return nil
		})
	}
	pod := strings.TrimSpace(mustKubectl(t, "get", "pods", "-n", serverNS, "-l", "app=httpbin", "-o", "jsonpath={.items[0].metadata.name}"))
	eventually(t, 30*time.Second, "istio_requests_total reporter=destination at the server sidecar", func() error {
		m, err := kubectl("get", "--raw", fmt.Sprintf("/api/v1/namespaces/%s/pods/%s:15020/proxy/metrics", serverNS, pod))
		if err != nil {
			return err
		}
		for _, l := range strings.Split(m, "\n") {
			if strings.HasPrefix(l, "istio_requests_total{") && strings.Contains(l, `reporter="destination"`) &&
				strings.Contains(l, `response_code="403"`) && strings.Contains(l, "ns/"+demoNS+"/sa/sleep") {
				return nil
			}
		}
		return fmt.Errorf("no istio_requests_total{reporter=\"destination\",response_code=\"403\"} naming the ambient caller")
	})
	proxyLogs, _ := kubectl("logs", "-n", serverNS, pod, "-c", "istio-proxy", "--tail=300")
	if !strings.Contains(proxyLogs, "RBAC rejected request") {
		t.Errorf("the sidecar's log has no \"RBAC rejected request\" line:\n%s", tail(proxyLogs, 10))
	}
}

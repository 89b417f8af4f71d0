//go:build e2e

package e2e

import (
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ambientmesh/ambient/proxylib/waypoint/waypointtest"
)

// A TLS backend (the lab's httpbin with its own certificate on 8443, and
// its line echo on 9000) in the ambient demo namespace.
const httpbinTLS = `
apiVersion: v1
kind: Service
metadata:
  name: httpbin-tls
  labels: {app: httpbin-tls}
spec:
  ports:
  - {name: tls, port: 8443, targetPort: 8443}
  - {name: tcp-echo, port: 9000, targetPort: 9000}
  selector: {app: httpbin-tls}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: httpbin-tls
spec:
  replicas: 1
  selector:
    matchLabels: {app: httpbin-tls}
  template:
    metadata:
      labels: {app: httpbin-tls}
    spec:
      serviceAccountName: httpbin
      terminationGracePeriodSeconds: 5
      containers:
      - name: httpbin
        image: docker.io/ambient-lab/httpbin:dev
        imagePullPolicy: Never
        args: ["-https", ":8443", "-tls-cert", "/certs/tls.crt", "-tls-key", "/certs/tls.key"]
        ports:
        - {containerPort: 8443}
        - {containerPort: 9000}
        readinessProbe:
          tcpSocket: {port: 8443}
          periodSeconds: 2
        volumeMounts:
        - {name: certs, mountPath: /certs, readOnly: true}
      volumes:
      - name: certs
        secret: {secretName: httpbin-tls-cert}
`

// A Gateway with a TLS passthrough listener and a TCP listener, and the
// routes to the TLS backend.
const l4Gateway = `
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: l4-gateway
  namespace: istio-system
spec:
  gatewayClassName: istio
  listeners:
  - name: passthrough
    port: 443
    protocol: TLS
    tls: {mode: Passthrough}
    allowedRoutes: {namespaces: {from: All}}
  - name: echo
    port: 9000
    protocol: TCP
    allowedRoutes: {namespaces: {from: All}}
`

const l4Routes = `
apiVersion: gateway.networking.k8s.io/v1
kind: TLSRoute
metadata:
  name: httpbin-tls
spec:
  parentRefs: [{name: l4-gateway, namespace: istio-system}]
  hostnames: [httpbin-tls.example.com]
  rules: [{backendRefs: [{name: httpbin-tls, port: 8443}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: TCPRoute
metadata:
  name: httpbin-echo
spec:
  parentRefs: [{name: l4-gateway, namespace: istio-system, sectionName: echo}]
  rules: [{backendRefs: [{name: httpbin-tls, port: 9000}]}]
`

// TestIngressTLSPassthroughAndTCP: from outside the cluster through
// MetalLB's address, a TLS session is passed through by SNI to the
// backend that alone holds the certificate (curl trusts only it), a name
// no TLSRoute has is refused, and a TCP listener relays to the TCPRoute's
// backend; the gateway reaches the backend over HBONE with its own
// identity (ztunnel's logs).
func TestIngressTLSPassthroughAndTCP(t *testing.T) {
	requireMesh(t)
	requireComponents(t, "WAYPOINT_IMAGE", "METALLB")
	deployJourney(t)
	enrollAmbient(t, demoNS)
	if out, err := kubectl("create", "namespace", "istio-system"); err != nil && !strings.Contains(out, "AlreadyExists") {
		t.Fatalf("create namespace istio-system: %v\n%s", err, out)
	}
	dir := t.TempDir()
	waypointtest.WriteSelfSigned(t, dir, "httpbin-tls.example.com")
	crt, key := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	kubectl("delete", "secret", "httpbin-tls-cert", "-n", demoNS, "--ignore-not-found")
	mustKubectl(t, "create", "secret", "tls", "httpbin-tls-cert", "-n", demoNS, "--cert", crt, "--key", key)
	apply(t, demoNS, httpbinTLS)
	apply(t, "", l4Gateway)
	apply(t, demoNS, l4Routes)
	t.Cleanup(func() {
		kubectl("delete", "tlsroute", "httpbin-tls", "-n", demoNS, "--ignore-not-found")
		kubectl("delete", "tcproute", "httpbin-echo", "-n", demoNS, "--ignore-not-found")
		kubectl("delete", "gateway", "l4-gateway", "-n", "istio-system", "--ignore-not-found", "--wait=true", "--timeout=60s")
		kubectl("delete", "deployment,service", "httpbin-tls", "-n", demoNS, "--ignore-not-found")
		kubectl("delete", "secret", "httpbin-tls-cert", "-n", demoNS, "--ignore-not-found")
	})
	waitAvailable(t, demoNS)
	if out, err := kubectl("wait", "-n", "istio-system", "--for=condition=Programmed", "--timeout=180s", "gateway/l4-gateway"); err != nil {
		desc, _ := kubectl("get", "gateway,svc,pods", "-n", "istio-system", "-o", "wide")
		t.Fatalf("gateway not programmed: %v\n%s\n%s", err, out, desc)
	}
	for _, r := range []string{"tlsroute/httpbin-tls", "tcproute/httpbin-echo"} {
		if out, err := kubectl("wait", "-n", demoNS, "--for=jsonpath={.status.parents[0].conditions[?(@.type==\"Accepted\")].status}=True", "--timeout=60s", r); err != nil {
			t.Fatalf("%s not accepted: %v\n%s", r, err, out)
		}
	}
	host := strings.TrimSpace(mustKubectl(t, "-n", "istio-system", "get", "service", "l4-gateway-istio", "-o", "jsonpath={.status.loadBalancer.ingress[0].ip}"))
	if net.ParseIP(host) == nil {
		t.Fatalf("l4-gateway address %q", host)
	}
	outside := func(args ...string) (string, error) {
		out, err := exec.Command("ip", append([]string{"netns", "exec", "alab-out"}, args...)...).CombinedOutput()
		return string(out), err
	}
	eventually(t, 120*time.Second, "TLS passthrough to httpbin-tls from outside", func() error {
		out, err := outside("curl", "-s", "-m", reqTime, "--cacert", crt,
			"--resolve", "httpbin-tls.example.com:443:"+host, "https://httpbin-tls.example.com/")
		if err != nil || !strings.Contains(out, title) || !strings.Contains(out, "httpbin-tls") {
			return fmt.Errorf("curl: %v, %.200q", err, out)
		}
		return nil
	})
	if out, err := outside("curl", "-s", "-k", "-m", reqTime, "--resolve", "other.example.com:443:"+host, "https://other.example.com/"); err == nil {
		t.Errorf("a server name no TLSRoute names was passed through: %.200q", out)
	}
	eventually(t, 60*time.Second, "TCP echo through the gateway", func() error {
		out, err := outside("bash", "-c", "exec 3<>/dev/tcp/"+host+"/9000; echo ping >&3; timeout "+reqTime+" head -n1 <&3")
		if err != nil || !strings.HasPrefix(out, "httpbin-tls") || !strings.Contains(out, " ping") {
			return fmt.Errorf("echo: %v, %q", err, out)
		}
		return nil
	})
	if logs := ztunnelLogs(t); !strings.Contains(logs, "istio-system/sa/l4-gateway-istio") {
		t.Errorf("no ztunnel log line names the gateway's identity")
	}
}

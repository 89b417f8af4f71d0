//go:build e2e

package e2e

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ambientmesh/ambient/proxylib/waypoint/waypointtest"
)

// Only the ingress gateway may call httpbin (its identity is Istio's:
// the gateway's service account <gateway>-istio).
const gatewayOnlyPolicy = `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: httpbin-ingress-only
spec:
  selector:
    matchLabels:
      app: httpbin
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/istio-system/sa/httpbin-gateway-istio"]
`

// outsideCurl is the seeds' `curl "$INGRESS_HOST"` from outside the
// cluster: the host's curl in the lab's outside network namespace (on the
// lab bridge, not a node).
func outsideCurl(t *testing.T, url string) (string, int) {
	t.Helper()
	out, err := exec.Command("ip", "netns", "exec", "alab-out", "curl", "-s", "-g", "-m", reqTime, url).CombinedOutput()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return string(out), ee.ExitCode()
	}
	if err != nil {
		t.Fatalf("curl in the outside namespace: %v", err)
	}
	return string(out), 0
}

// TestNorthSouthIngress: the seeds' Gateway → HTTPRoute → httpbin journey
// from a client outside the cluster through MetalLB's address; the ingress
// path stays up under STRICT mTLS (the gateway is a mesh client over
// HBONE), and a policy admitting only the gateway's identity keeps it
// working while other callers are refused.
func TestNorthSouthIngress(t *testing.T) {
	requireMesh(t)
	requireComponents(t, "WAYPOINT_IMAGE", "METALLB")
	deployJourney(t)
	enrollAmbient(t, demoNS)
	if out, err := kubectl("create", "namespace", "istio-system"); err != nil && !strings.Contains(out, "AlreadyExists") {
		t.Fatalf("create namespace istio-system: %v\n%s", err, out)
	}
	// The seeds' north-south section, verbatim.
	mustKubectl(t, "apply", "-f", filepath.Join(repoRoot, "test/lab/manifests/ingress/gateway.yaml"))
	applyFile(t, demoNS, "test/lab/manifests/ingress/httproute.yaml")
	t.Cleanup(func() {
		kubectl("delete", "httproute", "httpbin", "-n", demoNS, "--ignore-not-found")
		kubectl("delete", "gateway", "httpbin-gateway", "-n", "istio-system", "--ignore-not-found", "--wait=true", "--timeout=60s")
	})
	if out, err := kubectl("wait", "-n", "istio-system", "--for=condition=Programmed", "--timeout=180s", "gateway/httpbin-gateway"); err != nil {
		desc, _ := kubectl("get", "gateway,svc,pods", "-n", "istio-system", "-o", "wide")
		t.Fatalf("gateway not programmed: %v\n%s\n%s", err, out, desc)
	}
	// The seeds' commands: the Service, then its external address.
	svc := mustKubectl(t, "get", "service", "httpbin-gateway-istio", "-n", "istio-system")
	t.Logf("kubectl get service httpbin-gateway-istio -n istio-system\n%s", svc)
	host := strings.TrimSpace(mustKubectl(t, "-n", "istio-system", "get", "service", "httpbin-gateway-istio", "-o", "jsonpath={.status.loadBalancer.ingress[0].ip}"))
	if net.ParseIP(host) == nil || !strings.HasPrefix(host, "10.201.0.") {
		t.Fatalf("INGRESS_HOST=%q, want an address of MetalLB's pool on the lab bridge", host)
	}
	if gwAddr := strings.TrimSpace(mustKubectl(t, "get", "gateway", "httpbin-gateway", "-n", "istio-system", "-o", "jsonpath={.status.addresses[0].value}")); gwAddr != host {
		t.Errorf("Gateway status address %q, Service's %q", gwAddr, host)
	}
	t.Logf("INGRESS_HOST=%s", host)
	expectOutside := func(what string, wantOK bool) {
		eventually(t, 60*time.Second, what, func() error {
			out, code := outsideCurl(t, "http://"+host)
			if ok := code == 0 && strings.Contains(out, title); ok != wantOK {
				return fmt.Errorf("%s: curl exit %d, page %.200q", what, code, out)
			}
			return nil
		})
	}
	expectOutside("curl $INGRESS_HOST from outside", true)
	if os.Getenv("LAB_DUAL_STACK") != "0" {
		checkIngressIPv6(t)
	}

	checkIngressHTTPS(t, host)

	// The gateway reached httpbin over HBONE with its own identity.
	logs := ztunnelLogs(t)
	if !strings.Contains(logs, "istio-system/sa/httpbin-gateway-istio") {
		t.Errorf("no ztunnel log line names the gateway's identity")
	}

	applyFile(t, demoNS, "test/lab/manifests/policy/peerauth-strict.yaml")
	t.Cleanup(func() { kubectl("delete", "peerauthentication", "peerauth", "-n", demoNS, "--ignore-not-found") })
	expectOutside("under STRICT the ingress path is mTLS and keeps working", true)

	apply(t, demoNS, gatewayOnlyPolicy)
	t.Cleanup(func() {
		kubectl("delete", "authorizationpolicy", "httpbin-ingress-only", "-n", demoNS, "--ignore-not-found")
	})
	expectOutside("policy admitting only the gateway: ingress works", true)
	eventually(t, 60*time.Second, "a mesh client that is not the gateway is refused", func() error {
		out, code := curl(t, demoNS, "deploy/sleep", "httpbin:8000")
		if code == 0 && strings.Contains(out, title) {
			return fmt.Errorf("sleep reached httpbin past the gateway-only policy")
		}
		return nil
	})
	recreateNamespace(t, "e2e-client-a")
	applyFile(t, "e2e-client-a", "test/lab/manifests/apps/sleep.yaml")
	waitAvailable(t, "e2e-client-a")
	if out, code := curl(t, "e2e-client-a", "deploy/sleep", "httpbin."+demoNS+".svc.cluster.local:8000"); code == 0 && strings.Contains(out, title) {
		t.Errorf("a plaintext client outside the mesh reached httpbin past STRICT and the gateway-only policy")
	}
}

// checkIngressHTTPS adds an HTTPS listener terminating TLS with a
// certificate from a Secret of the gateway's namespace, and curls it from
// outside by name (SNI), trusting only that certificate.
func checkIngressHTTPS(t *testing.T, host string) {
	t.Helper()
	dir := t.TempDir()
	waypointtest.WriteSelfSigned(t, dir, "httpbin.example.com")
	crt, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	kubectl("delete", "secret", "httpbin-cert", "-n", "istio-system", "--ignore-not-found")
	mustKubectl(t, "create", "secret", "tls", "httpbin-cert", "-n", "istio-system", "--cert", crt, "--key", keyFile)
	t.Cleanup(func() { kubectl("delete", "secret", "httpbin-cert", "-n", "istio-system", "--ignore-not-found") })
	apply(t, "", strings.Replace(readFile(t, "test/lab/manifests/ingress/gateway.yaml"), "        from: All\n", `        from: All
  - name: https
    hostname: httpbin.example.com
    port: 443
    protocol: HTTPS
    tls:
      certificateRefs:
      - name: httpbin-cert
    allowedRoutes:
      namespaces:
        from: All
`, 1))
	eventually(t, 120*time.Second, "https://httpbin.example.com from outside", func() error {
		out, err := exec.Command("ip", "netns", "exec", "alab-out", "curl", "-s", "-m", reqTime, "--cacert", crt,
			"--resolve", "httpbin.example.com:443:"+host, "https://httpbin.example.com/").CombinedOutput()
		if err != nil || !strings.Contains(string(out), title) {
			return fmt.Errorf("curl: %v, %.200q", err, out)
		}
		return nil
	})
}

// checkIngressIPv6: in the dual-stack lab the gateway's Service has an
// address of each family (PreferDualStack, as Istio's), MetalLB announces
// both, and a client outside the cluster reaches httpbin over IPv6 (the
// gateway goes on in the backend Service's family: the seeds' httpbin is
// IPv4-only).
func checkIngressIPv6(t *testing.T) {
	t.Helper()
	var host6 netip.Addr
	eventually(t, 60*time.Second, "an IPv6 load balancer address", func() error {
		ips := mustKubectl(t, "-n", "istio-system", "get", "service", "httpbin-gateway-istio", "-o",
			`jsonpath={range .status.loadBalancer.ingress[*]}{.ip}{"\n"}{end}`)
		for _, f := range strings.Fields(ips) {
			if a, err := netip.ParseAddr(f); err == nil && a.Is6() {
				host6 = a
				return nil
			}
		}
		return fmt.Errorf("load balancer addresses %q, none IPv6", ips)
	})
	if !netip.MustParsePrefix("fd00:201::/64").Contains(host6) {
		t.Fatalf("IPv6 INGRESS_HOST %s, want an address of MetalLB's IPv6 pool on the lab bridge", host6)
	}
	if addrs := mustKubectl(t, "get", "gateway", "httpbin-gateway", "-n", "istio-system", "-o", "jsonpath={.status.addresses[*].value}"); !strings.Contains(" "+addrs+" ", " "+host6.String()+" ") {
		t.Errorf("Gateway status addresses %q do not name the IPv6 address %s", addrs, host6)
	}
	url := "http://" + netip.AddrPortFrom(host6, 80).String()
	eventually(t, 60*time.Second, "curl the IPv6 INGRESS_HOST from outside", func() error {
		if out, code := outsideCurl(t, url); code != 0 || !strings.Contains(out, title) {
			return fmt.Errorf("curl %s: exit %d, page %.200q", url, code, out)
		}
		return nil
	})
}

package waypoint_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	wt "github.com/ambientmesh/ambient/proxylib/waypoint/waypointtest"
)

// The demo Gateway plus a TLS passthrough listener and two TCP listeners.
const l4Gateway = `
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gateway, namespace: istio-ingress}
spec:
  gatewayClassName: istio
  listeners:
  - name: http
    port: 18080
    protocol: HTTP
    allowedRoutes: {namespaces: {from: All}}
  - name: passthrough
    port: 18444
    protocol: TLS
    tls: {mode: Passthrough}
    allowedRoutes: {namespaces: {from: All}}
  - name: tcp
    port: 18500
    protocol: TCP
    allowedRoutes: {namespaces: {from: All}}
  - name: tcp-legacy
    port: 18501
    protocol: TCP
    allowedRoutes: {namespaces: {from: All}}
`

// a.example.com to httpbin (no waypoint), b.example.com to echo (behind
// its Service's waypoint); TCP 18500 to httpbin's echo port, 18501 to the
// workload outside the mesh.
const l4Routes = `
apiVersion: gateway.networking.k8s.io/v1
kind: TLSRoute
metadata: {name: a}
spec:
  parentRefs: [{name: gateway, namespace: istio-ingress}]
  hostnames: [a.example.com]
  rules: [{backendRefs: [{name: httpbin, port: 8443}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: TLSRoute
metadata: {name: b}
spec:
  parentRefs: [{name: gateway, namespace: istio-ingress, sectionName: passthrough}]
  hostnames: [b.example.com]
  rules: [{backendRefs: [{name: echo, port: 8443}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: TCPRoute
metadata: {name: tcp}
spec:
  parentRefs: [{name: gateway, namespace: istio-ingress, sectionName: tcp}]
  rules: [{backendRefs: [{name: httpbin, port: 7070}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: TCPRoute
metadata: {name: tcp-legacy}
spec:
  parentRefs: [{name: gateway, namespace: istio-ingress, sectionName: tcp-legacy}]
  rules: [{backendRefs: [{name: legacy, port: 7070}]}]
`

func newL4Demo(t *testing.T) *ingressDemo {
	d := newIngressDemo(t)
	d.m.ApplyL7(l4Gateway)
	for _, doc := range strings.Split(l4Routes, "\n---\n") {
		d.m.ApplyL7(doc)
	}
	d.gw.WaitReady(d.m)
	return d
}

// dialFrom opens a TCP connection to the gateway's port from addr.
func (d *ingressDemo) dialFrom(t *testing.T, from netip.Addr, port uint16) net.Conn {
	t.Helper()
	dl := net.Dialer{LocalAddr: &net.TCPAddr{IP: from.AsSlice()}, Timeout: 5 * time.Second}
	c, err := dl.Dial("tcp", netip.AddrPortFrom(d.gw.IP, port).String())
	if err != nil {
		t.Fatalf("dial gateway :%d: %v", port, err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	t.Cleanup(func() { c.Close() })
	return c
}

// passthroughGet speaks HTTPS to whatever the gateway relays the TLS
// session to, trusting only the backends' own certificate (the gateway has
// no key for it: a completed handshake proves the session was passed
// through).
func (d *ingressDemo) passthroughGet(t *testing.T, sni string) (wt.Seen, error) {
	t.Helper()
	tr := &http.Transport{DisableKeepAlives: true,
		TLSClientConfig: &tls.Config{RootCAs: d.m.BackendRoots, ServerName: sni},
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			dl := net.Dialer{LocalAddr: &net.TCPAddr{IP: d.outside.AsSlice()}}
			return dl.DialContext(ctx, "tcp", netip.AddrPortFrom(d.gw.IP, 18444).String())
		}}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Get("https://" + sni + "/get")
	if err != nil {
		return wt.Seen{}, err
	}
	defer resp.Body.Close()
	var s wt.Seen
	if err := json.NewDecoder(resp.Body).Decode(&s); err != nil {
		return s, err
	}
	return s, nil
}

// tcpEcho sends a line through the gateway's TCP port and returns what
// came back: the backend's "<pod>:" greeting and the echo ("" when the
// gateway closed the connection).
func (d *ingressDemo) tcpEcho(t *testing.T, from netip.Addr, port uint16) string {
	t.Helper()
	c := d.dialFrom(t, from, port)
	if _, err := io.WriteString(c, "ping\n"); err != nil {
		return ""
	}
	line, _ := bufio.NewReader(c).ReadString('\n')
	return line
}

// TLS passthrough: the ClientHello's server name picks the TLSRoute, the
// session is relayed untouched to the backend (which alone has the
// certificate), over HBONE with the gateway's identity to the pod, or
// through the backend Service's waypoint; a name no route has is refused.
func TestIngressTLSPassthroughBySNI(t *testing.T) {
	d := newL4Demo(t)
	seen, err := d.passthroughGet(t, "a.example.com")
	if err != nil || seen.Pod != "httpbin-0" {
		t.Fatalf("https://a.example.com via passthrough: %q, %v; want httpbin-0", seen.Pod, err)
	}
	if peers := d.httpbin.Peers(); len(peers) == 0 || peers[len(peers)-1] != d.gw.ID {
		t.Fatalf("httpbin's tunnel peers %v, want the gateway's identity %s", peers, d.gw.ID)
	}
	// The backend saw the request the client sent inside TLS: no
	// forwarding headers, which only a terminating gateway adds.
	if xff := seen.Header.Get("X-Forwarded-For"); xff != "" {
		t.Errorf("backend saw X-Forwarded-For %q through passthrough, want the client's request untouched", xff)
	}
	seen, err = d.passthroughGet(t, "b.example.com")
	if err != nil || seen.Pod != "echo-0" {
		t.Fatalf("https://b.example.com via passthrough: %q, %v; want echo-0", seen.Pod, err)
	}
	if peers := d.echo.Peers(); len(peers) == 0 || peers[len(peers)-1] != d.wp.ID {
		t.Fatalf("echo's tunnel peers %v, want its waypoint %s", peers, d.wp.ID)
	}
	before := len(d.httpbin.Peers()) + len(d.echo.Peers())
	if _, err := d.passthroughGet(t, "c.example.com"); err == nil {
		t.Fatal("a server name no TLSRoute names was relayed")
	}
	if after := len(d.httpbin.Peers()) + len(d.echo.Peers()); after != before {
		t.Errorf("an unrouted server name opened %d tunnels", after-before)
	}
	// Plaintext on the passthrough port is not a ClientHello: closed.
	c := d.dialFrom(t, d.outside, 18444)
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n")
	if b, _ := io.ReadAll(c); len(b) != 0 {
		t.Errorf("plaintext on the passthrough port got %q, want the connection closed", b)
	}
}

// TCP listeners relay to their TCPRoute's backend: a mesh pod over HBONE
// with the gateway's identity, a workload outside the mesh in plain TCP.
func TestIngressTCPRoute(t *testing.T) {
	d := newL4Demo(t)
	if got := d.tcpEcho(t, d.outside, 18500); got != "httpbin-0:ping\n" {
		t.Fatalf("TCP :18500 answered %q, want httpbin's echo", got)
	}
	if peers := d.httpbin.Peers(); len(peers) == 0 || peers[len(peers)-1] != d.gw.ID {
		t.Fatalf("httpbin's tunnel peers %v, want the gateway's identity %s", peers, d.gw.ID)
	}
	if got := d.tcpEcho(t, d.outside, 18501); got != "legacy-0:ping\n" {
		t.Fatalf("TCP :18501 answered %q, want legacy's echo", got)
	}
	if peers := d.legacy.Peers(); len(peers) != 0 {
		t.Fatalf("legacy accepted tunnels %v, want plain TCP", peers)
	}
	// Half-close passes through: the client ends its side, the echo ends
	// its own, and the client reads everything up to EOF.
	c := d.dialFrom(t, d.outside, 18500)
	io.WriteString(c, "bye")
	c.(*net.TCPConn).CloseWrite()
	if b, err := io.ReadAll(c); err != nil || string(b) != "httpbin-0:bye" {
		t.Errorf("after half-close read %q, %v; want %q then EOF", b, err, "httpbin-0:bye")
	}
}

// The waypoint of the backend Service applies its policy to the gateway's
// identity on TCP too.
func TestIngressTCPThroughWaypointPolicy(t *testing.T) {
	d := newL4Demo(t)
	d.m.ApplyL7(`
apiVersion: gateway.networking.k8s.io/v1
kind: TCPRoute
metadata: {name: tcp}
spec:
  parentRefs: [{name: gateway, namespace: istio-ingress, sectionName: tcp}]
  rules: [{backendRefs: [{name: echo, port: 7070}]}]
`)
	policy := func(principal string) {
		d.m.ApplyL7(`
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-ingress}
spec:
  targetRefs: [{kind: Service, group: "", name: echo}]
  action: ALLOW
  rules:
  - from: [{source: {principals: ["` + principal + `"]}}]
`)
	}
	policy("cluster.local/ns/istio-ingress/sa/gateway")
	waitFor(t, "echo through its waypoint", func() bool { return d.tcpEcho(t, d.outside, 18500) == "echo-0:ping\n" })
	if peers := d.echo.Peers(); peers[len(peers)-1] != d.wp.ID {
		t.Fatalf("echo's tunnel peers %v, want its waypoint %s", peers, d.wp.ID)
	}
	policy("cluster.local/ns/ambient-demo/sa/sleep")
	waitFor(t, "the waypoint refusing the gateway", func() bool { return d.tcpEcho(t, d.outside, 18500) == "" })
}

// An AuthorizationPolicy on the Gateway applies to its TCP and TLS
// listeners at L4: source addresses decide; rules that need HTTP
// attributes fail closed (an ALLOW rule with paths matches no TCP
// connection; a DENY rule with paths refuses every one), as in Istio.
func TestIngressL4PolicyOnTheGateway(t *testing.T) {
	d := newL4Demo(t)
	apply := func(action, rule string) {
		d.m.ApplyL7(`
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: edge, namespace: istio-ingress}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gateway}]
  action: ` + action + `
  rules:
  - ` + rule + `
`)
	}
	other := netip.MustParseAddr("127.0.0.78")
	apply("ALLOW", `from: [{source: {ipBlocks: ["`+d.outside.String()+`/32"]}}]`)
	waitFor(t, "another source refused", func() bool { return d.tcpEcho(t, other, 18500) == "" })
	if got := d.tcpEcho(t, d.outside, 18500); got != "httpbin-0:ping\n" {
		t.Fatalf("allowed source: %q, want httpbin's echo", got)
	}
	if _, err := d.passthroughGet(t, "a.example.com"); err != nil {
		t.Fatalf("allowed source over TLS passthrough: %v", err)
	}
	apply("ALLOW", `to: [{operation: {paths: ["/get"]}}]`)
	waitFor(t, "an L7-only ALLOW refusing TCP", func() bool { return d.tcpEcho(t, d.outside, 18500) == "" })
	if _, err := d.passthroughGet(t, "a.example.com"); err == nil {
		t.Fatal("an L7-only ALLOW rule admitted a TLS passthrough connection")
	}
	apply("DENY", `to: [{operation: {paths: ["/admin"]}}]`)
	waitFor(t, "an L7-only DENY refusing TCP", func() bool { return d.tcpEcho(t, d.outside, 18500) == "" })
	// HTTP on the same Gateway is judged at L7: /get is not denied.
	if code, _ := d.get(t, "/get", ""); code != 200 {
		t.Errorf("HTTP /get under the DENY /admin policy: %d, want 200", code)
	}
}

func waitFor(t *testing.T, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

//go:build e2e

package e2e

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"
)

// dualStackApps: sleep and httpbin-local on the first worker, httpbin-remote
// on the second; a RequireDualStack Service for each httpbin and an
// IPv6-only Service (reached by name: CoreDNS answers AAAA) for the remote
// one. Pods are captured (the namespace is ambient).
const dualStackApps = `
apiVersion: v1
kind: ServiceAccount
metadata: {name: sleep}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: httpbin}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: sleep}
spec:
  selector: {matchLabels: {app: sleep}}
  template:
    metadata: {labels: {app: sleep}}
    spec:
      serviceAccountName: sleep
      nodeSelector: {ambient.lab/node: w1}
      terminationGracePeriodSeconds: 2
      containers:
      - {name: sleep, image: docker.io/ambient-lab/sleep:dev, imagePullPolicy: Never, command: ["/usr/bin/sleep", "infinity"]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: httpbin-local}
spec:
  selector: {matchLabels: {app: httpbin-local}}
  template:
    metadata: {labels: {app: httpbin-local}}
    spec:
      serviceAccountName: httpbin
      nodeSelector: {ambient.lab/node: w1}
      terminationGracePeriodSeconds: 2
      containers:
      - {name: httpbin, image: docker.io/ambient-lab/httpbin:dev, imagePullPolicy: Never, ports: [{containerPort: 80}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: httpbin-remote}
spec:
  selector: {matchLabels: {app: httpbin-remote}}
  template:
    metadata: {labels: {app: httpbin-remote}}
    spec:
      serviceAccountName: httpbin
      nodeSelector: {ambient.lab/node: w2}
      terminationGracePeriodSeconds: 2
      containers:
      - {name: httpbin, image: docker.io/ambient-lab/httpbin:dev, imagePullPolicy: Never, ports: [{containerPort: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: httpbin-local}
spec:
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  selector: {app: httpbin-local}
  ports: [{name: http, port: 8000, targetPort: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: httpbin-remote}
spec:
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  selector: {app: httpbin-remote}
  ports: [{name: http, port: 8000, targetPort: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: httpbin-v6}
spec:
  ipFamilyPolicy: SingleStack
  ipFamilies: [IPv6]
  selector: {app: httpbin-remote}
  ports: [{name: http, port: 8000, targetPort: 80}]
`

// TestDualStackIPv6: in the dual-stack lab (LAB_DUAL_STACK=1, the
// default), an IPv6 client pod in an ambient namespace reaches IPv6
// servers by their IPv6 cluster IPs on its own node (ztunnel's fast path)
// and on another node (HBONE between the ztunnels, IPv6 both ways), and by
// the name of an IPv6-only Service (AAAA from CoreDNS). The server sees the
// client's IPv6 address. An AuthorizationPolicy denying the client's IPv6
// address refuses it over IPv6 while its IPv4 requests still pass.
func TestDualStackIPv6(t *testing.T) {
	requireMesh(t)
	if os.Getenv("LAB_DUAL_STACK") == "0" {
		t.Skip("the lab is IPv4-only (LAB_DUAL_STACK=0)")
	}
	const ns = "e2e-dualstack"
	recreateNamespace(t, ns, "istio.io/dataplane-mode=ambient")
	t.Cleanup(func() { kubectl("delete", "ns", ns, "--ignore-not-found", "--wait=false") })
	apply(t, ns, dualStackApps)
	waitAvailable(t, ns)
	eventually(t, 60*time.Second, ns+": every pod captured", func() error { return captureOf(t, ns).complete() })

	sleep4, sleep6 := podIPs(t, ns, "app=sleep")
	_, local6 := podIPs(t, ns, "app=httpbin-local")
	_, remote6 := podIPs(t, ns, "app=httpbin-remote")
	_, localVIP6 := clusterIPs(t, ns, "httpbin-local")
	remoteVIP4, remoteVIP6 := clusterIPs(t, ns, "httpbin-remote")
	t.Logf("sleep %s / %s, httpbin-local %s (VIP %s), httpbin-remote %s (VIP %s / %s)", sleep4, sleep6, local6, localVIP6, remote6, remoteVIP4, remoteVIP6)

	// origin asks httpbin's /ip through target, from sleep.
	origin := func(target string) (string, error) {
		out, code := curl(t, ns, "deploy/sleep", "http://"+target+"/ip")
		if code != 0 {
			return "", fmt.Errorf("curl %s: exit %d: %s", target, code, out)
		}
		var r struct{ Origin string }
		if err := json.Unmarshal([]byte(out), &r); err != nil {
			return "", fmt.Errorf("curl %s: %v: %q", target, err, out)
		}
		return r.Origin, nil
	}
	expectOrigin := func(what, target string, want netip.Addr) {
		t.Helper()
		eventually(t, 60*time.Second, what, func() error {
			got, err := origin(target)
			if err != nil {
				return err
			}
			if got != want.String() {
				return fmt.Errorf("httpbin saw the client as %s, want %s", got, want)
			}
			return nil
		})
	}

	t.Run("IPv6 cluster IP, same node and across nodes, through ztunnel", func(t *testing.T) {
		expectOrigin("sleep -> httpbin-local by its IPv6 cluster IP", netip.AddrPortFrom(localVIP6, 8000).String(), sleep6)
		expectOrigin("sleep -> httpbin-remote by its IPv6 cluster IP", netip.AddrPortFrom(remoteVIP6, 8000).String(), sleep6)
		eventually(t, 30*time.Second, "ztunnel logs the IPv6 hops", func() error {
			logs := ztunnelLogs(t)
			for _, want := range []string{
				"proxying to " + netip.AddrPortFrom(local6, 80).String() + " using node local fast path",
				"proxy to " + netip.AddrPortFrom(remote6, 80).String() + " using HBONE via " + netip.AddrPortFrom(remote6, 15008).String(),
				"got CONNECT request to " + netip.AddrPortFrom(remote6, 80).String(),
			} {
				if !strings.Contains(logs, want) {
					return fmt.Errorf("no %q in the ztunnel logs", want)
				}
			}
			return nil
		})
	})

	t.Run("IPv6-only Service by name (AAAA)", func(t *testing.T) {
		expectOrigin("sleep -> httpbin-v6:8000", "httpbin-v6:8000", sleep6)
	})

	t.Run("policy denies the client's IPv6 address, not its IPv4 one", func(t *testing.T) {
		apply(t, ns, fmt.Sprintf(`
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-sleep-v6}
spec:
  selector: {matchLabels: {app: httpbin-remote}}
  action: DENY
  rules:
  - from: [{source: {ipBlocks: ["%s"]}}]
`, sleep6))
		eventually(t, 60*time.Second, "IPv6 request refused", func() error {
			if got, err := origin(netip.AddrPortFrom(remoteVIP6, 8000).String()); err == nil {
				return fmt.Errorf("answered (client seen as %s), want refused", got)
			}
			return nil
		})
		expectOrigin("the same client over IPv4 still allowed", netip.AddrPortFrom(remoteVIP4, 8000).String(), sleep4)
		eventually(t, 30*time.Second, "ztunnel logs the IPv6 denial", func() error {
			if want := "RBAC rejected conn=" + sleep6.String(); !strings.Contains(ztunnelLogs(t), want) {
				return fmt.Errorf("no %q in the ztunnel logs", want)
			}
			return nil
		})
	})
}

// podIPs is the IPv4 and IPv6 address of the pod selected by selector.
func podIPs(t *testing.T, ns, selector string) (v4, v6 netip.Addr) {
	t.Helper()
	out := mustKubectl(t, "get", "pods", "-n", ns, "-l", selector, "-o", `jsonpath={range .items[0].status.podIPs[*]}{.ip}{" "}{end}`)
	return twoFamilies(t, "pod "+selector, out)
}

// clusterIPs is the IPv4 and IPv6 cluster IP of Service name.
func clusterIPs(t *testing.T, ns, name string) (v4, v6 netip.Addr) {
	t.Helper()
	out := mustKubectl(t, "get", "svc", "-n", ns, name, "-o", `jsonpath={range .spec.clusterIPs[*]}{@}{" "}{end}`)
	return twoFamilies(t, "service "+name, out)
}

func twoFamilies(t *testing.T, what, list string) (v4, v6 netip.Addr) {
	t.Helper()
	for _, f := range strings.Fields(list) {
		a, err := netip.ParseAddr(f)
		switch {
		case err != nil:
			t.Fatalf("%s: address %q: %v", what, f, err)
		case a.Is4():
			v4 = a
		default:
			v6 = a
		}
	}
	if !v4.IsValid() || !v6.IsValid() {
		t.Fatalf("%s has addresses %q, want one IPv4 and one IPv6 (is the lab dual-stack?)", what, list)
	}
	return v4, v6
}

//go:build e2e

package e2e

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

const dnsNS = "e2e-dns"

// dnsApps: a Service, a ServiceEntry whose host gets an auto-allocated
// VIP, and two clients on w1: one whose DNS is captured (Istio's pod
// annotation; the mesh setting stays off) and one whose is not.
const dnsApps = `
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {selector: {app: web}, ports: [{name: http, port: 80}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api}
spec:
  hosts: [api.dns.example]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 10.201.0.251}]
---
apiVersion: v1
kind: Pod
metadata:
  name: dns-client
  labels: {app: dns-client}
  annotations: {ambient.istio.io/dns-capture: "true"}
spec:
  nodeSelector: {ambient.lab/node: w1}
  terminationGracePeriodSeconds: 1
  containers: [{name: c, image: docker.io/ambient-lab/sleep:dev, imagePullPolicy: Never, command: [/usr/bin/sleep, infinity]}]
---
apiVersion: v1
kind: Pod
metadata: {name: dns-plain, labels: {app: dns-plain}}
spec:
  nodeSelector: {ambient.lab/node: w1}
  terminationGracePeriodSeconds: 1
  containers: [{name: c, image: docker.io/ambient-lab/sleep:dev, imagePullPolicy: Never, command: [/usr/bin/sleep, infinity]}]
`

// digOnce runs the sleep image's stub resolver in pod and returns its
// line "<queried name> <RCODE> <addresses|->" split in three.
func digOnce(ns, pod string, args ...string) (name, rcode, addrs string, err error) {
	out, err := kubectl(append([]string{"exec", "-n", ns, pod, "--", "dig"}, args...)...)
	f := strings.Fields(strings.TrimSpace(out))
	if err != nil || len(f) != 3 {
		return "", "", "", fmt.Errorf("dig %v in %s: %v: %q", args, pod, err, out)
	}
	return f[0], f[1], f[2], nil
}

func dig(t *testing.T, ns, pod string, args ...string) (name, rcode, addrs string) {
	t.Helper()
	name, rcode, addrs, err := digOnce(ns, pod, args...)
	if err != nil {
		t.Fatal(err)
	}
	return name, rcode, addrs
}

// dnsMetric sums a counter of a ztunnel pod's /metrics over the series
// whose labels pass keep, keyed by key(labels).
func dnsMetric(t *testing.T, ztunnelPod, metric string, keep func(label func(string) string) bool, key func(label func(string) string) string) map[string]float64 {
	t.Helper()
	m := mustKubectl(t, "get", "--raw", fmt.Sprintf("/api/v1/namespaces/%s/pods/%s:15020/proxy/metrics", meshNS, ztunnelPod))
	out := map[string]float64{}
	for _, l := range strings.Split(m, "\n") {
		if !strings.HasPrefix(l, metric+"{") {
			continue
		}
		label := func(k string) string {
			if m := regexp.MustCompile(`[{,]` + k + `="([^"]*)"`).FindStringSubmatch(l); m != nil {
				return m[1]
			}
			return ""
		}
		if !keep(label) {
			continue
		}
		v, err := strconv.ParseFloat(l[strings.LastIndexByte(l, ' ')+1:], 64)
		if err != nil {
			t.Fatalf("metric line %q: %v", l, err)
		}
		out[key(label)] += v
	}
	return out
}

// dnsAnswers sums istio_dns_requests_total of a ztunnel pod by
// answered_by and response_code, for queries from namespace ns.
func dnsAnswers(t *testing.T, ztunnelPod, ns string) map[string]float64 {
	return dnsMetric(t, ztunnelPod, "istio_dns_requests_total",
		func(label func(string) string) bool { return label("source_workload_namespace") == ns },
		func(label func(string) string) string { return label("answered_by") + " " + label("response_code") })
}

// dnsUpstreamTCP is how many queries a ztunnel pod forwarded over TCP.
func dnsUpstreamTCP(t *testing.T, ztunnelPod string) float64 {
	return dnsMetric(t, ztunnelPod, "istio_dns_upstream_requests_total",
		func(label func(string) string) bool { return label("protocol") == "tcp" },
		func(func(string) string) string { return "" })[""]
}

// TestDNSProxy: a pod whose DNS is captured (annotation) gets its
// answers from ztunnel's DNS proxy: a Service in every search-domain form,
// a ServiceEntry host with its auto-allocated VIPs (A and AAAA, UDP and
// TCP), which the cluster's DNS server does not know; names ztunnel does
// not own are forwarded to the pod's resolver (the lab's CoreDNS) and its
// answer is passed through, NXDOMAIN and SERVFAIL unchanged, and an answer
// too large for UDP is fetched over TCP (ztunnel from CoreDNS, the pod
// from ztunnel). ztunnel's
// istio_dns_requests_total on the pod's node counts each kind. A pod
// without the annotation asks CoreDNS itself.
func TestDNSProxy(t *testing.T) {
	requireMesh(t)
	recreateNamespace(t, dnsNS, "istio.io/dataplane-mode=ambient")
	apply(t, dnsNS, dnsApps)
	mustKubectl(t, "wait", "-n", dnsNS, "--for=condition=ready", "pod", "--all", "--timeout=90s")
	enrollAmbient(t, dnsNS)
	webIP := strings.TrimSpace(mustKubectl(t, "get", "svc", "-n", dnsNS, "web", "-o", "jsonpath={.spec.clusterIP}"))
	var vip4, vip6 string
	eventually(t, 30*time.Second, "ServiceEntry VIPs allocated", func() error {
		out := mustKubectl(t, "get", "serviceentry", "-n", dnsNS, "api", "-o", `jsonpath={range .status.addresses[*]}{.value}{"\n"}{end}`)
		for _, a := range strings.Fields(out) {
			if strings.Contains(a, ":") {
				vip6 = a
			} else {
				vip4 = a
			}
		}
		if vip4 == "" || vip6 == "" {
			return fmt.Errorf("status addresses %q", out)
		}
		return nil
	})
	node := strings.TrimSpace(mustKubectl(t, "get", "pod", "-n", dnsNS, "dns-client", "-o", "jsonpath={.spec.nodeName}"))
	zt, _ := ztunnelOn(t, node)
	before := dnsAnswers(t, zt, dnsNS)

	// ztunnel learns the pod's capture and the ServiceEntry a moment after
	// the pod is captured: wait for the first local answer.
	eventually(t, 30*time.Second, "the ServiceEntry host answered with its VIP", func() error {
		_, rcode, addrs, err := digOnce(dnsNS, "dns-client", "api.dns.example")
		if err == nil && (rcode != "NOERROR" || addrs != vip4) {
			err = fmt.Errorf("api.dns.example: %s %s, want NOERROR %s", rcode, addrs, vip4)
		}
		return err
	})
	cases := []struct {
		what, want string // want: "RCODE addresses"
		args       []string
	}{
		{"Service by short name", "NOERROR " + webIP, []string{"web"}},
		{"Service as name.ns", "NOERROR " + webIP, []string{"web." + dnsNS}},
		{"Service as name.ns.svc", "NOERROR " + webIP, []string{"web." + dnsNS + ".svc"}},
		{"Service by FQDN", "NOERROR " + webIP, []string{"web." + dnsNS + ".svc.cluster.local."}},
		{"ServiceEntry host, AAAA", "NOERROR " + vip6, []string{"-type", "AAAA", "api.dns.example."}},
		{"ServiceEntry host over TCP", "NOERROR " + vip4, []string{"-tcp", "api.dns.example."}},
		{"name only CoreDNS knows, forwarded", "NOERROR 10.201.0.250", []string{"outside.lab.example."}},
		{"name only CoreDNS knows, forwarded over TCP", "NOERROR 10.201.0.250", []string{"-tcp", "outside.lab.example."}},
	}
	// An answer too large for UDP (CoreDNS truncates it): ztunnel asks
	// again over TCP, and truncates it for the pod's UDP query, which the
	// pod's resolver asks again over TCP.
	tcpBefore := dnsUpstreamTCP(t, zt)
	if _, rcode, addrs := dig(t, dnsNS, "dns-client", "big.lab.example."); rcode != "NOERROR" || len(strings.Split(addrs, ",")) != 40 {
		t.Errorf("big.lab.example (40 addresses, more than a UDP answer holds): %s %d addresses (%s)", rcode, len(strings.Split(addrs, ",")), addrs)
	}
	if d := dnsUpstreamTCP(t, zt) - tcpBefore; d < 1 {
		t.Errorf("ztunnel did not ask CoreDNS again over TCP for the truncated answer (istio_dns_upstream_requests_total{protocol=\"tcp\"} +%v)", d)
	}
	// Failures are passed through as CoreDNS gives them to a pod that asks
	// it directly (dns-plain): NXDOMAIN for a name in the cluster domain,
	// its answer (SERVFAIL: no plugin owns the name) for an unknown name
	// elsewhere.
	failures := map[string]string{"nope." + dnsNS + ".svc.cluster.local.": "NXDOMAIN", "unknown.lab.example.": ""}
	for name, want := range failures {
		_, rcode, _ := dig(t, dnsNS, "dns-plain", name)
		if rcode == "NOERROR" || want != "" && rcode != want {
			t.Fatalf("CoreDNS answered %s with %s, want a failure (%s)", name, rcode, want)
		}
		failures[name] = rcode
		cases = append(cases, struct {
			what, want string
			args       []string
		}{"failure passed through", rcode + " -", []string{name}})
	}
	for _, c := range cases {
		if _, rcode, addrs := dig(t, dnsNS, "dns-client", c.args...); rcode+" "+addrs != c.want {
			t.Errorf("%s (dig %s): %s %s, want %s", c.what, strings.Join(c.args, " "), rcode, addrs, c.want)
		}
	}
	// Without capture the pod asks CoreDNS, which has no ServiceEntries.
	if _, rcode, addrs := dig(t, dnsNS, "dns-plain", "api.dns.example."); rcode == "NOERROR" && addrs != "-" {
		t.Errorf("uncaptured pod resolved api.dns.example to %s: its DNS went to ztunnel", addrs)
	}

	after := dnsAnswers(t, zt, dnsNS)
	delta := func(k string) float64 { return after[k] - before[k] }
	t.Logf("istio_dns_requests_total on %s from %s, before %v, after %v", zt, dnsNS, before, after)
	// Local answers: the four Service forms, the ServiceEntry's AAAA and
	// TCP queries, and at least one of the wait's.
	if d := delta("ztunnel NOERROR"); d < 7 {
		t.Errorf("ztunnel answered %v queries itself (NOERROR), want >= 7", d)
	}
	if d := delta("upstream NOERROR") + delta("cache NOERROR"); d < 2 {
		t.Errorf("%v forwarded NOERROR answers (upstream or cache), want >= 2", d)
	}
	for _, rcode := range failures {
		if d := delta("upstream "+rcode) + delta("cache "+rcode); d < 1 {
			t.Errorf("%v forwarded %s answers, want >= 1", d, rcode)
		}
	}
	// ambientctl shows the capture and the pod's resolver on that ztunnel.
	out, err := exec.Command(filepath.Join(repoRoot, "bin/ambientctl"), "--kubeconfig", kubeconfig, "proxy-config", "dns", zt+"."+meshNS).CombinedOutput()
	if err != nil || !regexp.MustCompile(`(?m)^`+dnsNS+`\s+dns-client\s+true\s+10\.96\.0\.10(:53)?\s*$`).Match(out) {
		t.Errorf("ambientctl proxy-config dns: no captured dns-client with upstream 10.96.0.10 (%v):\n%s", err, out)
	}
	kubectl("delete", "ns", dnsNS, "--wait=false")
}

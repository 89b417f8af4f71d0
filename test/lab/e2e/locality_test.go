//go:build e2e

package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// TestTrafficDistributionPreferClose: the two workers in zones lab-a (w1)
// and lab-b (w2), one server on each, a Service with trafficDistribution
// PreferClose. The client on w1 is answered only by the server on w1 while
// it is ready, by the one on w2 once it is gone, and by w1's again when a
// server is back there. The zone labels are removed afterwards.
func TestTrafficDistributionPreferClose(t *testing.T) {
	requireMesh(t)
	const ns = "e2e-locality"
	zones := map[string]string{"w1": "lab-a", "w2": "lab-b"}
	for w, zone := range zones {
		node := strings.TrimSpace(mustKubectl(t, "get", "nodes", "-l", "ambient.lab/node="+w, "-o", "jsonpath={.items[0].metadata.name}"))
		if node == "" {
			t.Fatalf("no node labelled ambient.lab/node=%s", w)
		}
		mustKubectl(t, "label", "node", node, "--overwrite", "topology.kubernetes.io/region=lab", "topology.kubernetes.io/zone="+zone)
		t.Cleanup(func() {
			kubectl("label", "node", node, "topology.kubernetes.io/region-", "topology.kubernetes.io/zone-")
		})
	}
	t.Cleanup(func() { kubectl("delete", "ns", ns, "--ignore-not-found", "--wait=false") })
	deployPlacement(t, ns, "istio.io/dataplane-mode=ambient")
	apply(t, ns, `
apiVersion: v1
kind: Service
metadata: {name: server}
spec:
  selector: {app: server}
  ports: [{name: http, port: 80, targetPort: 80}]
  trafficDistribution: PreferClose
`)
	eventually(t, 60*time.Second, ns+": every pod captured", func() error { return captureOf(t, ns).complete() })
	// answeredOnlyBy: eight requests from client-w1, every one answered by pod.
	answeredOnlyBy := func(pod string) func() error {
		return func() error {
			got := map[string]int{}
			for range 8 {
				out, code := curl(t, ns, "client-w1", "http://server/hostname")
				switch {
				case code != 0:
					got[fmt.Sprintf("curl exit %d", code)]++
				case strings.Contains(out, "server-w1"):
					got["server-w1"]++
				case strings.Contains(out, "server-w2"):
					got["server-w2"]++
				default:
					got["other"]++
				}
			}
			if got[pod] != 8 {
				return fmt.Errorf("answers %v, want all 8 from %s", got, pod)
			}
			return nil
		}
	}
	eventually(t, 60*time.Second, "client-w1 -> server: the server in its zone only", answeredOnlyBy("server-w1"))
	mustKubectl(t, "delete", "pod", "-n", ns, "server-w1", "--wait=true", "--timeout=60s")
	eventually(t, 60*time.Second, "server-w1 gone: fail over to the other zone", answeredOnlyBy("server-w2"))
	apply(t, ns, placement)
	mustKubectl(t, "wait", "-n", ns, "--for=condition=ready", "pod", "server-w1", "--timeout=90s")
	eventually(t, 60*time.Second, "server-w1 back: close again", answeredOnlyBy("server-w1"))
}

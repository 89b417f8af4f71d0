package lb

import (
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
)

// wl is a workload on node in region/zone/subzone ("" parts: unset).
func wl(name, node, region, zone, subzone string) *workloadapi.Workload {
	return &workloadapi.Workload{Name: name, Node: node, ClusterId: "Kubernetes",
		Locality: &workloadapi.Locality{Region: region, Zone: zone, Subzone: subzone}}
}

// What the control plane sends (controllers/discovery).
var (
	preferZone = &workloadapi.LoadBalancing{Mode: workloadapi.LoadBalancing_FAILOVER, RoutingPreference: []workloadapi.LoadBalancing_Scope{
		workloadapi.LoadBalancing_NETWORK, workloadapi.LoadBalancing_REGION, workloadapi.LoadBalancing_ZONE}}
	preferNode = &workloadapi.LoadBalancing{Mode: workloadapi.LoadBalancing_FAILOVER, RoutingPreference: []workloadapi.LoadBalancing_Scope{
		workloadapi.LoadBalancing_NETWORK, workloadapi.LoadBalancing_REGION, workloadapi.LoadBalancing_ZONE,
		workloadapi.LoadBalancing_SUBZONE, workloadapi.LoadBalancing_NODE}}
	localOnly = &workloadapi.LoadBalancing{Mode: workloadapi.LoadBalancing_STRICT, RoutingPreference: []workloadapi.LoadBalancing_Scope{
		workloadapi.LoadBalancing_NODE}}
)

func names(tiers [][]*workloadapi.Workload) string {
	var out []string
	for _, t := range tiers {
		var n []string
		for _, w := range t {
			n = append(n, w.Name)
		}
		slices.Sort(n)
		out = append(out, strings.Join(n, ","))
	}
	return strings.Join(out, " | ")
}

func TestTiers(t *testing.T) {
	client := wl("client", "n1", "r1", "z1", "s1")
	sameNode := wl("same-node", "n1", "r1", "z1", "s1")
	sameZone := wl("same-zone", "n2", "r1", "z1", "s2")
	sameRegion := wl("same-region", "n3", "r1", "z2", "")
	farAway := wl("far", "n4", "r2", "z9", "")
	all := []*workloadapi.Workload{farAway, sameRegion, sameZone, sameNode}
	id := func(w *workloadapi.Workload) *workloadapi.Workload { return w }
	for _, c := range []struct {
		name string
		lb   *workloadapi.LoadBalancing
		src  *workloadapi.Workload
		eps  []*workloadapi.Workload
		want string // tiers, closest first
	}{
		{"no preference: one tier", nil, client, all, "far,same-node,same-region,same-zone"},
		{"mode without scopes: one tier", &workloadapi.LoadBalancing{Mode: workloadapi.LoadBalancing_FAILOVER}, client, all, "far,same-node,same-region,same-zone"},
		{"PreferSameZone: zone (node and subzone do not count), region, the rest", preferZone, client, all, "same-node,same-zone | same-region | far"},
		{"PreferSameNode: node, zone, region, the rest", preferNode, client, all, "same-node | same-zone | same-region | far"},
		{"PreferSameZone, the zone's endpoints gone: fail over to the region", preferZone, client, []*workloadapi.Workload{farAway, sameRegion}, "same-region | far"},
		{"PreferSameZone, only far endpoints: used", preferZone, client, []*workloadapi.Workload{farAway}, "far"},
		{"a later scope counts only after the earlier ones", preferZone, client,
			[]*workloadapi.Workload{wl("same-zone-name-other-region", "n5", "r2", "z1", ""), sameRegion}, "same-region | same-zone-name-other-region"},
		{"internalTrafficPolicy Local: this node only", localOnly, client, all, "same-node"},
		{"internalTrafficPolicy Local, none on this node: nothing", localOnly, client, []*workloadapi.Workload{sameZone, farAway}, ""},
		{"unknown client: one tier", preferZone, nil, all, "far,same-node,same-region,same-zone"},
		{"unknown client, strict: nothing", localOnly, nil, all, ""},
		{"no locality labels anywhere: all equally close", preferZone, wl("c", "n1", "", "", ""),
			[]*workloadapi.Workload{wl("a", "n2", "", "", ""), wl("b", "n3", "", "", "")}, "a,b"},
		{"no endpoints", preferZone, client, nil, ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got := names(Tiers(c.lb, c.src, c.eps, id)); got != c.want {
				t.Fatalf("Tiers = %q, want %q", got, c.want)
			}
			closest := names([][]*workloadapi.Workload{Closest(c.lb, c.src, c.eps, id)})
			if want, _, _ := strings.Cut(c.want, " | "); closest != want {
				t.Fatalf("Closest = %q, want %q", closest, want)
			}
		})
	}
}

// PickTiered keeps to the closest tier while one of its endpoints is not
// ejected, fails over when all are, and comes back when they recover.
func TestPickTieredFailsOverOnEjection(t *testing.T) {
	clk := &fakeClock{t: time.Unix(0, 0)}
	b := New(RoundRobin, Outlier{Consecutive: 1, BaseEjection: 10 * time.Second, MaxEjectionPercent: 100}, clk.now)
	tiers := [][]string{{"near-a", "near-b"}, {"far"}}
	pick := func() string {
		k, done, ok := b.PickTiered(tiers)
		if !ok {
			t.Fatal("no pick")
		}
		done(Success)
		return k
	}
	seen := map[string]int{}
	for range 10 {
		seen[pick()]++
	}
	if seen["far"] != 0 || seen["near-a"] == 0 || seen["near-b"] == 0 {
		t.Fatalf("picks %v, want only the near tier, both of it", seen)
	}
	fail := func(key string) {
		for range 10 {
			k, done, _ := b.PickTiered(tiers)
			if k == key {
				done(ConnectFailure)
				return
			}
			done(Success)
		}
		t.Fatalf("never picked %s", key)
	}
	fail("near-a")
	if got := pick() + " " + pick(); got != "near-b near-b" {
		t.Fatalf("one near endpoint ejected: picks %s, want the other near one", got)
	}
	fail("near-b")
	if got := pick(); got != "far" {
		t.Fatalf("every near endpoint ejected: picked %s, want far", got)
	}
	clk.add(11 * time.Second)
	if got := pick(); got == "far" {
		t.Fatal("near endpoints back from ejection: still picked far")
	}
	// Every endpoint of every tier ejected: the closest tier, not nothing.
	b2 := New(RoundRobin, Outlier{Consecutive: 1, MaxEjectionPercent: 100}, clk.now)
	for _, k := range []string{"near-a", "near-b", "far"} {
		_, done, _ := b2.PickTiered([][]string{{k}})
		done(ConnectFailure)
	}
	if k, _, ok := b2.PickTiered(tiers); !ok || k == "far" {
		t.Fatalf("all ejected: picked %q (%v), want a near endpoint", k, ok)
	}
	if _, _, ok := b.PickTiered([][]string{nil, {}}); ok {
		t.Fatal("picked from empty tiers")
	}
}

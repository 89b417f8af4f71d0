package serviceentry

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"

	networkingv1alpha3 "istio.io/api/networking/v1alpha3"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func se(name string, age int, hosts []string, status ...string) *networkingv1.ServiceEntry {
	s := &networkingv1.ServiceEntry{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "ns",
		CreationTimestamp: metav1.NewTime(t0.Add(time.Duration(age) * time.Minute))}}
	s.Spec.Hosts = hosts
	s.Spec.Resolution = networkingv1alpha3.ServiceEntry_DNS
	for i := 0; i+1 < len(status); i += 2 {
		s.Status.Addresses = append(s.Status.Addresses, &networkingv1alpha3.ServiceEntryAddress{Host: status[i], Value: status[i+1]})
	}
	return s
}

func flat(as []*networkingv1alpha3.ServiceEntryAddress) []string {
	var out []string
	for _, a := range as {
		out = append(out, a.Host, a.Value)
	}
	return out
}

func key(name string) types.NamespacedName { return types.NamespacedName{Namespace: "ns", Name: name} }

func TestPlan(t *testing.T) {
	none := se("none", 5, []string{"n.example"}, "n.example", "240.240.0.9")
	none.Spec.Resolution = networkingv1alpha3.ServiceEntry_NONE
	fixed := se("fixed", 6, []string{"f.example"})
	fixed.Spec.Addresses = []string{"240.240.0.1"} // a user's address inside the range is never handed out
	optout := se("optout", 7, []string{"o.example"})
	optout.Labels = map[string]string{AutoallocateLabel: "False"}

	cases := []struct {
		name string
		in   []*networkingv1.ServiceEntry
		want map[string][]string // changed entries only
	}{
		{
			name: "fresh entries get one address of each family per host, wildcards none",
			in:   []*networkingv1.ServiceEntry{se("a", 0, []string{"a.example", "*.wild.example", "b.example"})},
			want: map[string][]string{"a": {"a.example", "240.240.0.1", "a.example", "2001:2::1", "b.example", "240.240.0.2", "b.example", "2001:2::2"}},
		},
		{
			name: "recorded addresses are kept (stable across restarts): nothing to write",
			in:   []*networkingv1.ServiceEntry{se("a", 0, []string{"a.example"}, "a.example", "240.240.3.3", "a.example", "2001:2::33")},
			want: map[string][]string{},
		},
		{
			name: "a duplicate stays with the oldest, the younger is moved above the highest in use",
			in: []*networkingv1.ServiceEntry{
				se("young", 2, []string{"y.example"}, "y.example", "240.240.0.5", "y.example", "2001:2::9"),
				se("old", 1, []string{"o.example"}, "o.example", "240.240.0.5", "o.example", "2001:2::5"),
			},
			want: map[string][]string{"young": {"y.example", "240.240.0.6", "y.example", "2001:2::9"}},
		},
		{
			name: "new host added, removed host dropped, existing kept",
			in:   []*networkingv1.ServiceEntry{se("a", 0, []string{"c.example"}, "a.example", "240.240.0.1", "a.example", "2001:2::1")},
			want: map[string][]string{"a": {"c.example", "240.240.0.2", "c.example", "2001:2::2"}},
		},
		{
			name: "NONE, spec addresses and opt-out get none (a stale status is cleared); spec addresses are reserved",
			in:   []*networkingv1.ServiceEntry{none, fixed, optout, se("z", 9, []string{"z.example"})},
			// none's 240.240.0.9 is being released: held, so z gets .10.
			want: map[string][]string{"none": nil, "z": {"z.example", "240.240.0.10", "z.example", "2001:2::1"}},
		},
		{
			name: "addresses outside the ranges are not kept",
			in:   []*networkingv1.ServiceEntry{se("a", 0, []string{"a.example"}, "a.example", "10.0.0.1")},
			want: map[string][]string{"a": {"a.example", "240.240.0.1", "a.example", "2001:2::1"}},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Plan(tc.in, nil)
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != len(tc.want) {
				t.Fatalf("changed %v, want %v", got, tc.want)
			}
			for name, want := range tc.want {
				g, ok := got[key(name)]
				if !ok || !slices.Equal(flat(g), want) {
					t.Fatalf("%s: %v, want %v", name, flat(g), want)
				}
			}
		})
	}
}

// TestPlanCollisionFreeAndStable: many entries planned from scratch get
// distinct addresses, and planning again from the written statuses (a
// restart) changes nothing; deleting one and adding another does not reuse
// the freed address or move anyone.
func TestPlanCollisionFreeAndStable(t *testing.T) {
	var ses []*networkingv1.ServiceEntry
	for i := 0; i < 300; i++ {
		ses = append(ses, se("e"+string(rune('a'+i%26))+string(rune('a'+i/26)), i, []string{"h1.example", "h2.example"}))
	}
	apply := func(plan map[types.NamespacedName][]*networkingv1alpha3.ServiceEntryAddress) {
		for _, s := range ses {
			if a, ok := plan[types.NamespacedName{Namespace: s.Namespace, Name: s.Name}]; ok {
				s.Status.Addresses = a
			}
		}
	}
	var cursor Cursor
	plan, err := Plan(ses, &cursor)
	if err != nil {
		t.Fatal(err)
	}
	apply(plan)
	seen := map[string]string{}
	for _, s := range ses {
		if len(s.Status.Addresses) != 4 {
			t.Fatalf("%s has %d addresses", s.Name, len(s.Status.Addresses))
		}
		for _, a := range s.Status.Addresses {
			ip := netip.MustParseAddr(a.Value)
			if !IPv4Range.Contains(ip) && !IPv6Range.Contains(ip) {
				t.Fatalf("%s outside the ranges", ip)
			}
			if prev, dup := seen[a.Value]; dup {
				t.Fatalf("%s given to %s and %s/%s", a.Value, prev, s.Name, a.Host)
			}
			seen[a.Value] = s.Name + "/" + a.Host
		}
	}
	if again, err := Plan(ses, nil); err != nil || len(again) != 0 {
		t.Fatalf("replanning from the statuses changed %d entries (err %v)", len(again), err)
	}
	// The newest entry holds the highest addresses: only the cursor keeps
	// them from being handed out again at once.
	freed := ses[len(ses)-1].Status.Addresses[0].Value
	ses = append(ses[:len(ses)-1], se("late", 1000, []string{"late.example"}))
	plan, err = Plan(ses, &cursor)
	if err != nil {
		t.Fatal(err)
	}
	if len(plan) != 1 {
		t.Fatalf("after a delete and an add %d entries change, want only the new one", len(plan))
	}
	for _, a := range plan[key("late")] {
		if a.Value == freed || seen[a.Value] != "" {
			t.Fatalf("new entry got %s, already used or just freed", a.Value)
		}
	}
}

func TestPoolExhausted(t *testing.T) {
	p := newPool(netip.MustParsePrefix("240.240.0.0/30"), map[netip.Addr]bool{})
	for i := 0; i < 3; i++ {
		if _, err := p.next(); err != nil {
			t.Fatalf("address %d: %v", i, err)
		}
	}
	if ip, err := p.next(); err == nil {
		t.Fatalf("a /30 gave a fourth address %s", ip)
	}
}

// TestOverlayWritten: while the cache still shows the version an
// allocation replaced, the next plan sees the allocation (a new entry does
// not get the same address); once the cache shows a newer version, the
// cache wins and the write is forgotten.
func TestOverlayWritten(t *testing.T) {
	a := &Allocator{}
	first := se("first", 0, []string{"f.example"})
	first.ResourceVersion = "5"
	plan, err := Plan([]*networkingv1.ServiceEntry{first}, &a.cursor)
	if err != nil {
		t.Fatal(err)
	}
	a.written = map[types.NamespacedName]writtenStatus{key("first"): {replaced: "5", addresses: plan[key("first")]}}
	// A second entry arrives; the cache still has first at version 5 without
	// status. A fresh cursor stands for any state that forgot the write.
	second := se("second", 1, []string{"s.example"})
	items := []*networkingv1.ServiceEntry{first, second}
	a.overlayWritten(items)
	if len(first.Status.Addresses) != 0 {
		t.Fatal("overlay modified the cached object")
	}
	plan2, err := Plan(items, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, rewrites := plan2[key("first")]; rewrites {
		t.Fatalf("first replanned: %v", flat(plan2[key("first")]))
	}
	for _, a2 := range plan2[key("second")] {
		for _, a1 := range plan[key("first")] {
			if a1.Value == a2.Value {
				t.Fatalf("%s handed out twice while the cache lagged", a1.Value)
			}
		}
	}
	// The cache catches up (newer version): the write is forgotten.
	caught := first.DeepCopy()
	caught.ResourceVersion = "6"
	a.overlayWritten([]*networkingv1.ServiceEntry{caught})
	if len(a.written) != 0 {
		t.Fatalf("write still overlaid after the cache caught up: %v", a.written)
	}
}

// BenchmarkPlan: planning 5000 entries of two hosts each, from scratch
// (first start with existing ServiceEntries) and in steady state (every
// event replans everything).
func BenchmarkPlan(b *testing.B) {
	var ses []*networkingv1.ServiceEntry
	for i := 0; i < 5000; i++ {
		ses = append(ses, se(fmt.Sprintf("e%d", i), i, []string{"h1.example", "h2.example"}))
	}
	b.Run("fresh", func(b *testing.B) {
		for range b.N {
			if _, err := Plan(ses, nil); err != nil {
				b.Fatal(err)
			}
		}
	})
	plan, _ := Plan(ses, nil)
	for _, s := range ses {
		s.Status.Addresses = plan[types.NamespacedName{Namespace: s.Namespace, Name: s.Name}]
	}
	b.Run("steady", func(b *testing.B) {
		for range b.N {
			if p, err := Plan(ses, nil); err != nil || len(p) != 0 {
				b.Fatal(len(p), err)
			}
		}
	})
}

// TestOwned: the addresses discovery serves are the ones Plan keeps; a
// copy of an older entry's address (or of a spec address, or outside the
// ranges, or a second one of a family) belongs to no one else.
func TestOwned(t *testing.T) {
	fixed := se("fixed", 0, []string{"f.example"})
	fixed.Spec.Addresses = []string{"240.240.0.50"}
	optout := se("optout", 1, []string{"o.example"}, "o.example", "240.240.0.60")
	optout.Labels = map[string]string{AutoallocateLabel: "false"}
	older := se("older", 2, []string{"a.example"}, "a.example", "240.240.0.1", "a.example", "2001:2::1")
	copier := se("copier", 3, []string{"b.example", "c.example"},
		"b.example", "240.240.0.1", // older's
		"b.example", "2001:2::2",
		"c.example", "240.240.0.50", // a spec address
		"c.example", "10.0.0.1", // outside the range
		"c.example", "240.240.0.3",
		"c.example", "240.240.0.4", // a second IPv4 address for one host
		"gone.example", "240.240.0.5", // not a host of the entry
	)
	reuse := se("reuse", 4, []string{"r.example"}, "r.example", "240.240.0.60") // the opted-out entry's is free
	got := Owned([]*networkingv1.ServiceEntry{reuse, copier, optout, older, fixed})
	want := map[types.NamespacedName]map[string][]netip.Addr{
		key("older"):  {"a.example": {netip.MustParseAddr("240.240.0.1"), netip.MustParseAddr("2001:2::1")}},
		key("copier"): {"b.example": {netip.MustParseAddr("2001:2::2")}, "c.example": {netip.MustParseAddr("240.240.0.3")}},
		key("reuse"):  {"r.example": {netip.MustParseAddr("240.240.0.60")}},
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("Owned:\n got %v\nwant %v", got, want)
	}
	// Plan agrees: the copier is moved off exactly what it does not own.
	plan, err := Plan([]*networkingv1.ServiceEntry{reuse, copier, optout, older, fixed}, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range plan[key("copier")] {
		if ip := netip.MustParseAddr(a.Value); slices.Contains([]string{"240.240.0.1", "240.240.0.50", "10.0.0.1"}, a.Value) ||
			a.Host == "c.example" && ip.Is4() && a.Value != "240.240.0.3" || a.Host == "b.example" && ip.Is6() && a.Value != "2001:2::2" {
			t.Errorf("Plan gives copier %s %s, which Owned does not (or another entry does)", a.Host, a.Value)
		}
	}
}

package serviceentry

import (
	"fmt"
	"net/netip"
	"sort"

	networkingv1alpha3 "istio.io/api/networking/v1alpha3"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	"k8s.io/apimachinery/pkg/types"
)

// Plan computes the VIP allocation of every ServiceEntry, as Istio's
// allocator does, and returns the status.addresses of the entries whose
// allocation must change (an empty slice clears it):
//
//   - an address already recorded in a status is kept, so VIPs are stable
//     across operator restarts and leader changes (the status is the
//     record, nothing is kept in memory);
//   - an address held twice (two writers raced, or a user copied a
//     status) stays with the oldest entry; the others get new ones;
//   - addresses named in any spec.addresses are never handed out;
//   - each allocatable host without one gets one IPv4 address from
//     IPv4Range and one IPv6 address from IPv6Range: the first free one
//     above the highest in use and above the last one handed out (cursor,
//     kept by the caller between plans), wrapping around, so a VIP just
//     released is not handed to another host at once (clients may still
//     have it cached); a released address is also held for the plan that
//     releases it;
//   - entries that do not allocate (ShouldAutoAllocate), wildcard and
//     removed hosts lose their addresses.
//
// err reports an exhausted range; the entries it could serve are planned.
func Plan(ses []*networkingv1.ServiceEntry, cursor *Cursor) (map[types.NamespacedName][]*networkingv1alpha3.ServiceEntryAddress, error) {
	if cursor == nil {
		cursor = &Cursor{}
	}
	ordered := byAge(ses)
	used := map[netip.Addr]bool{}
	v4, v6 := newPool(IPv4Range, used), newPool(IPv6Range, used)
	v4.cursor, v6.cursor = cursor.V4, cursor.V6
	defer func() { cursor.V4, cursor.V6 = v4.cursor, v6.cursor }()
	pool := func(ip netip.Addr) *addrPool {
		if ip.Is4() {
			return v4
		}
		return v6
	}
	kept := owned(ordered, used)
	// Addresses being released (removed hosts, entries that stopped
	// allocating) are held for this plan.
	for _, se := range ordered {
		for _, a := range se.Status.GetAddresses() {
			if ip, err := netip.ParseAddr(a.GetValue()); err == nil && pool(ip.Unmap()).prefix.Contains(ip.Unmap()) {
				used[ip.Unmap()] = true
			}
		}
	}
	out := map[types.NamespacedName][]*networkingv1alpha3.ServiceEntryAddress{}
	var errs []error
	for _, se := range ordered {
		var want []*networkingv1alpha3.ServiceEntryAddress
		if ShouldAutoAllocate(se) {
			for _, h := range AllocatableHosts(se) {
				addrs := kept[se][h]
				for _, p := range []*addrPool{v4, v6} {
					if hasFamily(addrs, p.prefix.Addr().Is4()) {
						continue
					}
					ip, err := p.next()
					if err != nil {
						errs = append(errs, fmt.Errorf("%s/%s host %s: %w", se.Namespace, se.Name, h, err))
						continue
					}
					addrs = append(addrs, ip)
				}
				sort.Slice(addrs, func(i, j int) bool { return addrs[i].Is4() && !addrs[j].Is4() })
				for _, ip := range addrs {
					want = append(want, &networkingv1alpha3.ServiceEntryAddress{Host: h, Value: ip.String()})
				}
			}
		}
		if !sameAddresses(se.Status.GetAddresses(), want) {
			out[types.NamespacedName{Namespace: se.Namespace, Name: se.Name}] = want
		}
	}
	if len(errs) > 0 {
		return out, fmt.Errorf("allocating ServiceEntry VIPs: %v", errs)
	}
	return out, nil
}

// Owned are the recorded (status) addresses each entry holds by Plan's
// rules, by entry and host: in range, auto-allocating, one per family and
// host, not named in any spec.addresses, and held by no older entry. An
// address a newer entry copied from an older one (two writers raced, or
// someone wrote the status) is not the newer entry's: discovery serves
// only these, so a copy never takes another entry's VIP, not even until
// the allocator moves the copy.
func Owned(ses []*networkingv1.ServiceEntry) map[types.NamespacedName]map[string][]netip.Addr {
	ordered := byAge(ses)
	out := map[types.NamespacedName]map[string][]netip.Addr{}
	for se, hosts := range owned(ordered, map[netip.Addr]bool{}) {
		if len(hosts) > 0 {
			out[types.NamespacedName{Namespace: se.Namespace, Name: se.Name}] = hosts
		}
	}
	return out
}

// byAge orders entries oldest first (creation time, then namespace and
// name): the order in which recorded addresses are honoured.
func byAge(ses []*networkingv1.ServiceEntry) []*networkingv1.ServiceEntry {
	ordered := append([]*networkingv1.ServiceEntry(nil), ses...)
	sort.SliceStable(ordered, func(i, j int) bool {
		a, b := ordered[i], ordered[j]
		if !a.CreationTimestamp.Equal(&b.CreationTimestamp) {
			return a.CreationTimestamp.Before(&b.CreationTimestamp)
		}
		if a.Namespace != b.Namespace {
			return a.Namespace < b.Namespace
		}
		return a.Name < b.Name
	})
	return ordered
}

// owned marks every spec address and then every kept recorded address in
// used, and returns the kept ones by entry and host (ordered: byAge).
func owned(ordered []*networkingv1.ServiceEntry, used map[netip.Addr]bool) map[*networkingv1.ServiceEntry]map[string][]netip.Addr {
	for _, se := range ordered {
		for _, a := range se.Spec.Addresses {
			if ip, ok := HostAddress(a); ok {
				used[ip] = true
			}
		}
	}
	kept := map[*networkingv1.ServiceEntry]map[string][]netip.Addr{}
	for _, se := range ordered {
		kept[se] = map[string][]netip.Addr{}
		if !ShouldAutoAllocate(se) {
			continue
		}
		recorded := StatusAddresses(se)
		for _, h := range AllocatableHosts(se) {
			for _, ip := range recorded[h] {
				if !IPv4Range.Contains(ip) && !IPv6Range.Contains(ip) || used[ip] || hasFamily(kept[se][h], ip.Is4()) {
					continue
				}
				used[ip] = true
				kept[se][h] = append(kept[se][h], ip)
			}
		}
	}
	return kept
}

func hasFamily(addrs []netip.Addr, v4 bool) bool {
	for _, a := range addrs {
		if a.Is4() == v4 {
			return true
		}
	}
	return false
}

func sameAddresses(a, b []*networkingv1alpha3.ServiceEntryAddress) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i].GetHost() != b[i].GetHost() || a[i].GetValue() != b[i].GetValue() {
			return false
		}
	}
	return true
}

// Cursor is where the next allocation of each family starts looking; the
// allocator keeps it between plans (a restart starts above the highest
// address in use).
type Cursor struct{ V4, V6 netip.Addr }

// addrPool hands out the free addresses of a range (its network address
// excluded).
type addrPool struct {
	prefix  netip.Prefix
	used    map[netip.Addr]bool
	cursor  netip.Addr // where the next search starts
	started bool       // cursor placed for this plan
}

// newPool: used may be shared between the pools of both families.
func newPool(p netip.Prefix, used map[netip.Addr]bool) *addrPool {
	return &addrPool{prefix: p.Masked(), used: used}
}

// next takes the first free address above the highest one in use,
// wrapping to the start of the range.
func (p *addrPool) next() (netip.Addr, error) {
	first := p.prefix.Addr().Next()
	if !p.started {
		// Once per plan: above the highest in use, or the caller's cursor
		// when that is higher; afterwards the cursor moves on.
		p.started = true
		high := first
		for ip := range p.used {
			if p.prefix.Contains(ip) && high.Less(ip.Next()) {
				high = ip.Next()
			}
		}
		if !p.cursor.IsValid() || !p.prefix.Contains(p.cursor) || p.cursor.Less(high) {
			p.cursor = high
		}
	}
	start := p.cursor
	if !start.IsValid() || !p.prefix.Contains(start) {
		start = first
	}
	for ip, wrapped := start, false; ; ip = ip.Next() {
		if !ip.IsValid() || !p.prefix.Contains(ip) {
			if wrapped {
				return netip.Addr{}, fmt.Errorf("%s is exhausted", p.prefix)
			}
			wrapped, ip = true, first
		}
		if !p.used[ip] {
			p.used[ip], p.cursor = true, ip.Next()
			return ip, nil
		}
		if wrapped && ip == start {
			return netip.Addr{}, fmt.Errorf("%s is exhausted", p.prefix)
		}
	}
}

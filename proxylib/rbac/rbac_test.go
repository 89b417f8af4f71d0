package rbac

import (
	"net/netip"
	"testing"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi/security"
	"github.com/ambientmesh/ambient/proxylib/identity"
)

func exact(s string) *security.StringMatch {
	return &security.StringMatch{MatchType: &security.StringMatch_Exact{Exact: s}}
}
func prefix(s string) *security.StringMatch {
	return &security.StringMatch{MatchType: &security.StringMatch_Prefix{Prefix: s}}
}
func suffix(s string) *security.StringMatch {
	return &security.StringMatch{MatchType: &security.StringMatch_Suffix{Suffix: s}}
}
func presence() *security.StringMatch {
	return &security.StringMatch{MatchType: &security.StringMatch_Presence{Presence: &emptypb.Empty{}}}
}
func cidr(s string) *security.Address {
	p := netip.MustParsePrefix(s)
	return &security.Address{Address: p.Addr().AsSlice(), Length: uint32(p.Bits())}
}

// policy builds a policy with one group of one rule holding the given matches.
func policy(name string, action security.Action, ms ...*security.Match) *security.Authorization {
	return &security.Authorization{Name: name, Namespace: "default", Action: action,
		Groups: []*security.Group{{Rules: []*security.Rules{{Matches: ms}}}}}
}

var (
	sleep    = identity.MustParse("spiffe://cluster.local/ns/default/sa/sleep")
	notsleep = identity.MustParse("spiffe://cluster.local/ns/default/sa/notsleep")
	other    = identity.MustParse("spiffe://cluster.local/ns/other/sa/client")
)

func conn(src *identity.Identity, srcIP string, port uint16) Conn {
	return Conn{Source: src, SrcIP: netip.MustParseAddr(srcIP), DstIP: netip.MustParseAddr("10.0.1.5"), DstPort: port}
}

func TestEvaluate(t *testing.T) {
	allowSleep := policy("allow-sleep", security.Action_ALLOW, &security.Match{Principals: []*security.StringMatch{exact(sleep.Principal())}})
	denySleep := policy("deny-sleep", security.Action_DENY, &security.Match{Principals: []*security.StringMatch{exact(sleep.Principal())}})
	// Istio's conversion of PeerAuthentication STRICT.
	strict := policy("converted_peer_authentication_strict", security.Action_DENY, &security.Match{NotPrincipals: []*security.StringMatch{presence()}})
	// ALLOW policy whose L7 rules were dropped: no groups, matches nothing.
	l7Only := &security.Authorization{Name: "l7-only", Namespace: "default", Action: security.Action_ALLOW}
	// Istio's "rules: [{}]": one group with no rules, matches everything.
	allowAll := &security.Authorization{Name: "allow-all", Namespace: "default", Action: security.Action_ALLOW, Groups: []*security.Group{{}}}
	denyAll := &security.Authorization{Name: "deny-all", Namespace: "default", Action: security.Action_DENY, Groups: []*security.Group{{}}}

	cases := []struct {
		name     string
		policies []*security.Authorization
		conn     Conn
		allowed  bool
		policy   string
	}{
		{"no policy allows", nil, conn(&sleep, "10.0.0.1", 80), true, ""},
		{"no policy allows plaintext", nil, conn(nil, "10.0.0.1", 80), true, ""},
		{"allow matches", []*security.Authorization{allowSleep}, conn(&sleep, "10.0.0.1", 80), true, "default/allow-sleep"},
		{"allow present but not matching denies", []*security.Authorization{allowSleep}, conn(&notsleep, "10.0.0.1", 80), false, ""},
		{"allow by principal refuses plaintext", []*security.Authorization{allowSleep}, conn(nil, "10.0.0.1", 80), false, ""},
		{"deny beats allow", []*security.Authorization{allowSleep, denySleep}, conn(&sleep, "10.0.0.1", 80), false, "default/deny-sleep"},
		{"deny not matching, no allow: allowed", []*security.Authorization{denySleep}, conn(&notsleep, "10.0.0.1", 80), true, ""},
		{"strict rejects plaintext", []*security.Authorization{strict}, conn(nil, "10.0.0.1", 80), false, "default/converted_peer_authentication_strict"},
		{"strict admits mTLS", []*security.Authorization{strict}, conn(&notsleep, "10.0.0.1", 80), true, ""},
		{"allow without groups (L7 dropped) denies all", []*security.Authorization{l7Only}, conn(&sleep, "10.0.0.1", 80), false, ""},
		{"L7 rule added beside allow still fails closed", []*security.Authorization{l7Only}, conn(&notsleep, "10.0.0.1", 80), false, ""},
		{"empty rule allows all", []*security.Authorization{allowAll}, conn(nil, "10.0.0.1", 80), true, "default/allow-all"},
		{"empty rule deny denies all", []*security.Authorization{denyAll, allowAll}, conn(&sleep, "10.0.0.1", 80), false, "default/deny-all"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := Evaluate(c.policies, c.conn)
			if d.Allowed != c.allowed || d.Policy != c.policy {
				t.Fatalf("Evaluate = %+v, want allowed=%v policy=%q", d, c.allowed, c.policy)
			}
		})
	}
}

func TestMatchFields(t *testing.T) {
	cases := []struct {
		name  string
		match *security.Match
		conn  Conn
		want  bool
	}{
		{"empty match holds", &security.Match{}, conn(nil, "1.2.3.4", 1), true},
		{"principal prefix (\"*\" suffix)", &security.Match{Principals: []*security.StringMatch{prefix("cluster.local/ns/default/")}}, conn(&sleep, "10.0.0.1", 80), true},
		{"principal prefix other ns", &security.Match{Principals: []*security.StringMatch{prefix("cluster.local/ns/default/")}}, conn(&other, "10.0.0.1", 80), false},
		{"principal suffix (\"*\" prefix)", &security.Match{Principals: []*security.StringMatch{suffix("/sa/sleep")}}, conn(&sleep, "10.0.0.1", 80), true},
		{"principal suffix not matching", &security.Match{Principals: []*security.StringMatch{suffix("/sa/sleep")}}, conn(&notsleep, "10.0.0.1", 80), false},
		{"presence needs identity", &security.Match{Principals: []*security.StringMatch{presence()}}, conn(nil, "10.0.0.1", 80), false},
		{"namespace exact", &security.Match{Namespaces: []*security.StringMatch{exact("other")}}, conn(&other, "10.0.0.1", 80), true},
		{"namespace other", &security.Match{Namespaces: []*security.StringMatch{exact("other")}}, conn(&sleep, "10.0.0.1", 80), false},
		{"namespace needs identity", &security.Match{Namespaces: []*security.StringMatch{exact("default")}}, conn(nil, "10.0.0.1", 80), false},
		{"not namespace excludes", &security.Match{NotNamespaces: []*security.StringMatch{exact("other")}}, conn(&other, "10.0.0.1", 80), false},
		{"not namespace others pass", &security.Match{NotNamespaces: []*security.StringMatch{exact("other")}}, conn(&sleep, "10.0.0.1", 80), true},
		{"not principal excludes", &security.Match{NotPrincipals: []*security.StringMatch{exact(sleep.Principal())}}, conn(&sleep, "10.0.0.1", 80), false},
		{"source cidr inside", &security.Match{SourceIps: []*security.Address{cidr("10.0.0.0/24")}}, conn(nil, "10.0.0.77", 80), true},
		{"source cidr outside", &security.Match{SourceIps: []*security.Address{cidr("10.0.0.0/24")}}, conn(nil, "10.0.9.1", 80), false},
		{"source host /32", &security.Match{SourceIps: []*security.Address{cidr("10.0.0.1/32")}}, conn(nil, "10.0.0.1", 80), true},
		{"not source cidr", &security.Match{NotSourceIps: []*security.Address{cidr("10.0.0.0/8")}}, conn(nil, "10.9.9.9", 80), false},
		{"ipv4-mapped source", &security.Match{SourceIps: []*security.Address{cidr("10.0.0.0/24")}}, conn(nil, "::ffff:10.0.0.9", 80), true},
		{"malformed cidr never matches", &security.Match{SourceIps: []*security.Address{{Address: []byte{1, 2, 3}, Length: 8}}}, conn(nil, "1.2.3.4", 80), false},
		{"prefix length too long", &security.Match{SourceIps: []*security.Address{{Address: []byte{10, 0, 0, 0}, Length: 40}}}, conn(nil, "10.0.0.0", 80), false},
		{"destination ip", &security.Match{DestinationIps: []*security.Address{cidr("10.0.1.0/24")}}, conn(nil, "1.1.1.1", 80), true},
		{"not destination ip", &security.Match{NotDestinationIps: []*security.Address{cidr("10.0.1.5/32")}}, conn(nil, "1.1.1.1", 80), false},
		{"port listed", &security.Match{DestinationPorts: []uint32{8080, 80}}, conn(nil, "1.1.1.1", 80), true},
		{"port not listed", &security.Match{DestinationPorts: []uint32{8080}}, conn(nil, "1.1.1.1", 80), false},
		{"not port", &security.Match{NotDestinationPorts: []uint32{80}}, conn(nil, "1.1.1.1", 80), false},
		{"all fields must hold", &security.Match{Principals: []*security.StringMatch{exact(sleep.Principal())}, DestinationPorts: []uint32{8080}}, conn(&sleep, "1.1.1.1", 80), false},
		{"unknown string match never matches", &security.Match{Principals: []*security.StringMatch{{}}}, conn(&sleep, "1.1.1.1", 80), false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := policy("p", security.Action_ALLOW, c.match)
			if got := Matches(p, c.conn); got != c.want {
				t.Fatalf("Matches = %v, want %v", got, c.want)
			}
		})
	}
}

func TestGroupAndRuleCombination(t *testing.T) {
	fromSleep := &security.Rules{Matches: []*security.Match{{Principals: []*security.StringMatch{exact(sleep.Principal())}}}}
	toPort80 := &security.Rules{Matches: []*security.Match{{DestinationPorts: []uint32{80}}}}
	fromOtherNS := &security.Rules{Matches: []*security.Match{{Namespaces: []*security.StringMatch{exact("other")}}}}
	p := &security.Authorization{Name: "p", Namespace: "default", Action: security.Action_ALLOW, Groups: []*security.Group{
		{Rules: []*security.Rules{fromSleep, toPort80}}, // from sleep AND to 80
		{Rules: []*security.Rules{fromOtherNS}},         // OR from namespace other
	}}
	cases := []struct {
		name string
		conn Conn
		want bool
	}{
		{"sleep to 80", conn(&sleep, "1.1.1.1", 80), true},
		{"sleep to 81", conn(&sleep, "1.1.1.1", 81), false},
		{"notsleep to 80", conn(&notsleep, "1.1.1.1", 80), false},
		{"other ns any port", conn(&other, "1.1.1.1", 9999), true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := Matches(p, c.conn); got != c.want {
				t.Fatalf("Matches = %v, want %v", got, c.want)
			}
		})
	}
}

func FuzzEvaluate(f *testing.F) {
	f.Add([]byte{10, 0, 0, 0}, uint32(8), "cluster.local/ns/default/sa/sleep", uint16(80))
	f.Fuzz(func(t *testing.T, addr []byte, length uint32, principal string, port uint16) {
		p := policy("f", security.Action_DENY, &security.Match{
			SourceIps:  []*security.Address{{Address: addr, Length: length}},
			Principals: []*security.StringMatch{prefix(principal)},
		})
		Evaluate([]*security.Authorization{p}, conn(&sleep, "10.1.2.3", port)) // must not panic
	})
}

// The control plane may leave the Presence message nil; after the wire
// round trip it must still mean "presence".
func TestPresenceSurvivesWire(t *testing.T) {
	p := policy("strict", security.Action_DENY, &security.Match{NotPrincipals: []*security.StringMatch{{MatchType: &security.StringMatch_Presence{}}}})
	b, err := proto.Marshal(p)
	if err != nil {
		t.Fatal(err)
	}
	var got security.Authorization
	if err := proto.Unmarshal(b, &got); err != nil {
		t.Fatal(err)
	}
	ps := []*security.Authorization{&got}
	if Evaluate(ps, conn(nil, "10.0.0.1", 80)).Allowed {
		t.Fatal("plaintext allowed under STRICT after wire round trip")
	}
	if !Evaluate(ps, conn(&sleep, "10.0.0.1", 80)).Allowed {
		t.Fatal("mTLS refused under STRICT after wire round trip")
	}
}

// The seeds' allow-sleep-to-httpbin (GET from sleep) reaches ztunnel as an
// L7-derived ALLOW without groups: deny-all, except for the destination's
// own waypoint, which enforced it whole.
func TestL7DerivedPolicySkippedOnlyForDestinationWaypoint(t *testing.T) {
	waypoint := identity.MustParse("spiffe://cluster.local/ns/default/sa/waypoint")
	l7Allow := &security.Authorization{Name: "allow-sleep-to-httpbin", Namespace: "default", Action: security.Action_ALLOW, AmbientL7Derived: true}
	// DENY POST from anyone: its L4 form (L7 attributes ignored) denies all.
	l7Deny := &security.Authorization{Name: "deny-post", Namespace: "default", Action: security.Action_DENY, AmbientL7Derived: true, Groups: []*security.Group{{}}}
	l4AllowSleep := policy("allow-sleep", security.Action_ALLOW, &security.Match{Principals: []*security.StringMatch{exact(sleep.Principal())}})
	l4DenyWaypoint := policy("deny-waypoint", security.Action_DENY, &security.Match{Principals: []*security.StringMatch{exact(waypoint.Principal())}})
	strict := policy("strict", security.Action_DENY, &security.Match{NotPrincipals: []*security.StringMatch{presence()}})
	viaWaypoint := func(src *identity.Identity) Conn {
		c := conn(src, "10.0.2.8", 80)
		c.FromDestinationWaypoint = true
		return c
	}
	toWaypoint := func(src *identity.Identity) Conn {
		c := conn(src, "10.0.0.1", 80)
		c.ToDestinationWaypoint = true
		return c
	}
	l7Here := func(src *identity.Identity) Conn {
		c := conn(src, "10.0.0.1", 80)
		c.L7EnforcedHere = true
		return c
	}
	cases := []struct {
		name     string
		policies []*security.Authorization
		conn     Conn
		allowed  bool
	}{
		{"L7-derived ALLOW skipped for the destination's waypoint", []*security.Authorization{l7Allow}, viaWaypoint(&waypoint), true},
		{"L7-derived ALLOW applies to sleep directly (fail closed)", []*security.Authorization{l7Allow}, conn(&sleep, "10.0.0.1", 80), false},
		{"L7-derived ALLOW applies to the waypoint identity when it is not this destination's waypoint", []*security.Authorization{l7Allow}, conn(&waypoint, "10.0.2.8", 80), false},
		{"L7-derived DENY skipped for the destination's waypoint", []*security.Authorization{l7Deny}, viaWaypoint(&waypoint), true},
		{"L7-derived DENY applies to others", []*security.Authorization{l7Deny}, conn(&sleep, "10.0.0.1", 80), false},
		{"L4 ALLOW still applies to waypoint traffic (as Istio)", []*security.Authorization{l7Allow, l4AllowSleep}, viaWaypoint(&waypoint), false},
		{"L4 ALLOW still allows its own principal directly", []*security.Authorization{l7Allow, l4AllowSleep}, conn(&sleep, "10.0.0.1", 80), true},
		{"L4 DENY still applies to waypoint traffic", []*security.Authorization{l7Allow, l4DenyWaypoint}, viaWaypoint(&waypoint), false},
		{"no identity: the flag alone never skips", []*security.Authorization{l7Allow}, viaWaypoint(nil), false},
		{"STRICT with the flag but no identity still denies", []*security.Authorization{strict}, viaWaypoint(nil), false},
		{"hair-pin: L7-derived ALLOW left to the waypoint", []*security.Authorization{l7Allow}, toWaypoint(&sleep), true},
		{"hair-pin: L7-derived DENY left to the waypoint", []*security.Authorization{l7Deny}, toWaypoint(nil), true},
		{"hair-pin: STRICT refuses a plaintext caller", []*security.Authorization{l7Allow, strict}, toWaypoint(nil), false},
		{"hair-pin: STRICT admits an mTLS caller", []*security.Authorization{l7Allow, strict}, toWaypoint(&sleep), true},
		{"hair-pin: L4 DENY keyed on the caller applies", []*security.Authorization{l4DenyWaypoint}, toWaypoint(&waypoint), false},
		{"hair-pin: L4 ALLOW keyed on the caller applies", []*security.Authorization{l4AllowSleep}, toWaypoint(&waypoint), false},
		{"sidecar L7 engine: L7-derived ALLOW left to it", []*security.Authorization{l7Allow}, l7Here(&sleep), true},
		{"sidecar L7 engine: L7-derived DENY left to it", []*security.Authorization{l7Deny}, l7Here(nil), true},
		{"sidecar L7 engine: STRICT still refuses plaintext", []*security.Authorization{l7Allow, strict}, l7Here(nil), false},
		{"sidecar L7 engine: L4 ALLOW keyed on the caller applies", []*security.Authorization{l7Allow, l4AllowSleep}, l7Here(&waypoint), false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if d := Evaluate(c.policies, c.conn); d.Allowed != c.allowed {
				t.Fatalf("Evaluate = %+v, want allowed=%v", d, c.allowed)
			}
		})
	}
}

package policy

import (
	"encoding/json"
	"net/netip"
	"testing"

	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/proto"
	apisecurity "istio.io/api/security/v1beta1"
	apitype "istio.io/api/type/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi/security"
)

const root = "ambient-system"

func ap(ns string, spec *apisecurity.AuthorizationPolicy) *securityv1.AuthorizationPolicy {
	p := &securityv1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Name: "p", Namespace: ns}}
	proto.Merge(&p.Spec, spec)
	return p
}

func exact(s string) *security.StringMatch {
	return &security.StringMatch{MatchType: &security.StringMatch_Exact{Exact: s}}
}

func cidr(s string) *security.Address {
	p := netip.MustParsePrefix(s)
	return &security.Address{Address: p.Addr().AsSlice(), Length: uint32(p.Bits())}
}

func group(rules ...*security.Rules) *security.Group { return &security.Group{Rules: rules} }
func rules(m ...*security.Match) *security.Rules     { return &security.Rules{Matches: m} }

func TestTranslateAuthorizationPolicy(t *testing.T) {
	allowFrom := func(src *apisecurity.Source) *apisecurity.AuthorizationPolicy {
		return &apisecurity.AuthorizationPolicy{Rules: []*apisecurity.Rule{{From: []*apisecurity.Rule_From{{Source: src}}}}}
	}
	tests := []struct {
		name string
		ns   string
		spec *apisecurity.AuthorizationPolicy
		want *security.Authorization // nil: no L4 policy
	}{
		{
			name: "root namespace without selector is global",
			ns:   root, spec: &apisecurity.AuthorizationPolicy{Action: apisecurity.AuthorizationPolicy_DENY},
			want: &security.Authorization{Name: "p", Namespace: root, Scope: security.Scope_GLOBAL, Action: security.Action_DENY},
		},
		{
			name: "namespace scope; empty rules list allows nothing",
			ns:   "app", spec: &apisecurity.AuthorizationPolicy{},
			want: &security.Authorization{Name: "p", Namespace: "app", Scope: security.Scope_NAMESPACE},
		},
		{
			name: "selector scope; empty rule allows everything",
			ns:   "app", spec: &apisecurity.AuthorizationPolicy{Selector: &apitype.WorkloadSelector{MatchLabels: map[string]string{"app": "x"}}, Rules: []*apisecurity.Rule{{}}},
			want: &security.Authorization{Name: "p", Namespace: "app", Scope: security.Scope_WORKLOAD_SELECTOR, Groups: []*security.Group{group()}},
		},
		{
			name: "principals, namespaces and ip blocks with negations",
			ns:   "app",
			spec: allowFrom(&apisecurity.Source{
				Principals: []string{"cluster.local/ns/a/sa/b", "*"}, NotPrincipals: []string{"*/sa/evil"},
				Namespaces: []string{"prod*"}, NotNamespaces: []string{"kube-system"},
				IpBlocks: []string{"10.0.0.0/8", "192.168.1.1"}, NotIpBlocks: []string{"10.1.0.0/16", "2001:db8::/32"},
			}),
			want: &security.Authorization{Name: "p", Namespace: "app", Scope: security.Scope_NAMESPACE, Groups: []*security.Group{group(rules(&security.Match{
				Principals:    []*security.StringMatch{exact("cluster.local/ns/a/sa/b"), {MatchType: &security.StringMatch_Presence{}}},
				NotPrincipals: []*security.StringMatch{{MatchType: &security.StringMatch_Suffix{Suffix: "/sa/evil"}}},
				Namespaces:    []*security.StringMatch{{MatchType: &security.StringMatch_Prefix{Prefix: "prod"}}},
				NotNamespaces: []*security.StringMatch{exact("kube-system")},
				SourceIps:     []*security.Address{cidr("10.0.0.0/8"), cidr("192.168.1.1/32")},
				NotSourceIps:  []*security.Address{cidr("10.1.0.0/16"), cidr("2001:db8::/32")},
			}))}},
		},
		{
			name: "service accounts become principal suffixes",
			ns:   "app",
			spec: allowFrom(&apisecurity.Source{ServiceAccounts: []string{"web", "other/api"}, NotServiceAccounts: []string{"bad"}}),
			want: &security.Authorization{Name: "p", Namespace: "app", Scope: security.Scope_NAMESPACE, Groups: []*security.Group{group(rules(&security.Match{
				Principals:    []*security.StringMatch{{MatchType: &security.StringMatch_Suffix{Suffix: "/ns/app/sa/web"}}, {MatchType: &security.StringMatch_Suffix{Suffix: "/ns/other/sa/api"}}},
				NotPrincipals: []*security.StringMatch{{MatchType: &security.StringMatch_Suffix{Suffix: "/ns/app/sa/bad"}}},
			}))}},
		},
		{
			name: "ports and not ports; to, from and when are separate ANDed rules",
			ns:   "app",
			spec: &apisecurity.AuthorizationPolicy{Rules: []*apisecurity.Rule{{
				To:   []*apisecurity.Rule_To{{Operation: &apisecurity.Operation{Ports: []string{"80", "443"}, NotPorts: []string{"8080"}}}},
				From: []*apisecurity.Rule_From{{Source: &apisecurity.Source{Namespaces: []string{"a"}}}, {Source: &apisecurity.Source{Namespaces: []string{"b"}}}},
				When: []*apisecurity.Condition{
					{Key: "source.ip", Values: []string{"10.0.0.1"}, NotValues: []string{"10.0.0.2/32"}},
					{Key: "destination.port", Values: []string{"80"}, NotValues: []string{"81"}},
					{Key: "source.namespace", Values: []string{"a"}},
					{Key: "source.principal", NotValues: []string{"x"}},
					{Key: "destination.ip", Values: []string{"10.96.0.0/12"}},
				},
			}}},
			want: &security.Authorization{Name: "p", Namespace: "app", Scope: security.Scope_NAMESPACE, Groups: []*security.Group{group(
				rules(&security.Match{DestinationPorts: []uint32{80, 443}, NotDestinationPorts: []uint32{8080}}),
				rules(&security.Match{Namespaces: []*security.StringMatch{exact("a")}}, &security.Match{Namespaces: []*security.StringMatch{exact("b")}}),
				rules(&security.Match{SourceIps: []*security.Address{cidr("10.0.0.1/32")}, NotSourceIps: []*security.Address{cidr("10.0.0.2/32")}}),
				rules(&security.Match{DestinationPorts: []uint32{80}, NotDestinationPorts: []uint32{81}}),
				rules(&security.Match{Namespaces: []*security.StringMatch{exact("a")}}),
				rules(&security.Match{NotPrincipals: []*security.StringMatch{exact("x")}}),
				rules(&security.Match{DestinationIps: []*security.Address{cidr("10.96.0.0/12")}}),
			)}},
		},
		{
			name: "ALLOW with L7 rule drops that rule: targets denied (fail closed)",
			ns:   "app",
			spec: &apisecurity.AuthorizationPolicy{Rules: []*apisecurity.Rule{
				{To: []*apisecurity.Rule_To{{Operation: &apisecurity.Operation{Methods: []string{"GET"}}}}},
			}},
			want: &security.Authorization{Name: "p", Namespace: "app", Scope: security.Scope_NAMESPACE, AmbientL7Derived: true},
		},
		{
			name: "the seeds' allow-sleep-to-httpbin (GET from sleep): deny-all marked L7-derived",
			ns:   "ambient-demo",
			spec: &apisecurity.AuthorizationPolicy{
				Selector: &apitype.WorkloadSelector{MatchLabels: map[string]string{"app": "httpbin"}},
				Action:   apisecurity.AuthorizationPolicy_ALLOW,
				Rules: []*apisecurity.Rule{{
					From: []*apisecurity.Rule_From{{Source: &apisecurity.Source{Principals: []string{"cluster.local/ns/ambient-demo/sa/sleep"}}}},
					To:   []*apisecurity.Rule_To{{Operation: &apisecurity.Operation{Methods: []string{"GET"}}}},
				}},
			},
			want: &security.Authorization{Name: "p", Namespace: "ambient-demo", Scope: security.Scope_WORKLOAD_SELECTOR, AmbientL7Derived: true},
		},
		{
			name: "ALLOW keeps its L4 rules next to a dropped L7 rule",
			ns:   "app",
			spec: &apisecurity.AuthorizationPolicy{Rules: []*apisecurity.Rule{
				{To: []*apisecurity.Rule_To{{Operation: &apisecurity.Operation{Paths: []string{"/admin"}}}}},
				{From: []*apisecurity.Rule_From{{Source: &apisecurity.Source{RequestPrincipals: []string{"*"}}}}},
				{When: []*apisecurity.Condition{{Key: "request.headers[x]", Values: []string{"y"}}}},
				{From: []*apisecurity.Rule_From{{Source: &apisecurity.Source{RemoteIpBlocks: []string{"1.2.3.4"}}}}},
				{To: []*apisecurity.Rule_To{{Operation: &apisecurity.Operation{Hosts: []string{"a.com"}, Ports: []string{"80"}}}}},
				{To: []*apisecurity.Rule_To{{Operation: &apisecurity.Operation{Ports: []string{"9090"}}}}},
			}},
			want: &security.Authorization{Name: "p", Namespace: "app", Scope: security.Scope_NAMESPACE, AmbientL7Derived: true, Groups: []*security.Group{
				group(rules(&security.Match{DestinationPorts: []uint32{9090}, NotDestinationPorts: []uint32{}})),
			}},
		},
		{
			name: "DENY with L7 keeps the L4 part: denies more, never less",
			ns:   "app",
			spec: &apisecurity.AuthorizationPolicy{Action: apisecurity.AuthorizationPolicy_DENY, Rules: []*apisecurity.Rule{{
				From: []*apisecurity.Rule_From{{Source: &apisecurity.Source{Namespaces: []string{"x"}, RequestPrincipals: []string{"*"}}}},
				To:   []*apisecurity.Rule_To{{Operation: &apisecurity.Operation{Methods: []string{"POST"}, Ports: []string{"80"}}}},
				When: []*apisecurity.Condition{{Key: "request.auth.claims[iss]", Values: []string{"a"}}},
			}}},
			want: &security.Authorization{Name: "p", Namespace: "app", Scope: security.Scope_NAMESPACE, Action: security.Action_DENY, AmbientL7Derived: true, Groups: []*security.Group{group(
				rules(&security.Match{DestinationPorts: []uint32{80}, NotDestinationPorts: []uint32{}}),
				rules(&security.Match{Namespaces: []*security.StringMatch{exact("x")}, NotNamespaces: []*security.StringMatch{}, Principals: []*security.StringMatch{}, NotPrincipals: []*security.StringMatch{}, SourceIps: []*security.Address{}, NotSourceIps: []*security.Address{}}),
				rules(&security.Match{}),
			)}},
		},
		{
			name: "pure L4 policy with L4 conditions is not marked L7-derived",
			ns:   "app",
			spec: &apisecurity.AuthorizationPolicy{Rules: []*apisecurity.Rule{{
				From: []*apisecurity.Rule_From{{Source: &apisecurity.Source{Principals: []string{"cluster.local/ns/app/sa/a"}}}},
				When: []*apisecurity.Condition{{Key: "destination.port", Values: []string{"80"}}},
			}}},
			want: &security.Authorization{Name: "p", Namespace: "app", Scope: security.Scope_NAMESPACE, Groups: []*security.Group{group(
				rules(&security.Match{Principals: []*security.StringMatch{exact("cluster.local/ns/app/sa/a")}}),
				rules(&security.Match{DestinationPorts: []uint32{80}}),
			)}},
		},
		{
			name: "ALLOW with an unparsable value drops the rule instead of widening it",
			ns:   "app",
			spec: allowFrom(&apisecurity.Source{IpBlocks: []string{"not-an-ip"}}),
			want: &security.Authorization{Name: "p", Namespace: "app", Scope: security.Scope_NAMESPACE},
		},
		{
			name: "ALLOW with an out of range port drops the rule",
			ns:   "app",
			spec: &apisecurity.AuthorizationPolicy{Rules: []*apisecurity.Rule{{To: []*apisecurity.Rule_To{{Operation: &apisecurity.Operation{Ports: []string{"70000"}}}}}}},
			want: &security.Authorization{Name: "p", Namespace: "app", Scope: security.Scope_NAMESPACE},
		},
		{
			name: "targetRefs are waypoint-only",
			ns:   "app", spec: &apisecurity.AuthorizationPolicy{TargetRefs: []*apitype.PolicyTargetReference{{Kind: "Service", Name: "s"}}},
		},
		{
			name: "CUSTOM is not enforced by ztunnel",
			ns:   "app", spec: &apisecurity.AuthorizationPolicy{Action: apisecurity.AuthorizationPolicy_CUSTOM},
		},
		{
			name: "AUDIT is not enforced by ztunnel",
			ns:   "app", spec: &apisecurity.AuthorizationPolicy{Action: apisecurity.AuthorizationPolicy_AUDIT},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := TranslateAuthorizationPolicy(root, ap(tt.ns, tt.spec))
			if !equalAuthz(got, tt.want) {
				t.Fatalf("got  %s\nwant %s", prototext.Format(got), prototext.Format(tt.want))
			}
		})
	}
}

// equalAuthz compares semantically: nil and empty lists are the same on the wire.
func equalAuthz(a, b *security.Authorization) bool {
	if a == nil || b == nil {
		return a == nil && b == nil
	}
	ab, _ := proto.MarshalOptions{Deterministic: true}.Marshal(a)
	bb, _ := proto.MarshalOptions{Deterministic: true}.Marshal(b)
	return string(ab) == string(bb)
}

func TestNeedsWaypoint(t *testing.T) {
	tests := []struct {
		name string
		spec *apisecurity.AuthorizationPolicy
		want bool
	}{
		{"pure L4", &apisecurity.AuthorizationPolicy{Rules: []*apisecurity.Rule{{From: []*apisecurity.Rule_From{{Source: &apisecurity.Source{Principals: []string{"a"}}}}}}}, false},
		{"methods", &apisecurity.AuthorizationPolicy{Rules: []*apisecurity.Rule{{To: []*apisecurity.Rule_To{{Operation: &apisecurity.Operation{Methods: []string{"GET"}}}}}}}, true},
		{"not paths", &apisecurity.AuthorizationPolicy{Rules: []*apisecurity.Rule{{To: []*apisecurity.Rule_To{{Operation: &apisecurity.Operation{NotPaths: []string{"/"}}}}}}}, true},
		{"hosts", &apisecurity.AuthorizationPolicy{Rules: []*apisecurity.Rule{{To: []*apisecurity.Rule_To{{Operation: &apisecurity.Operation{NotHosts: []string{"a"}}}}}}}, true},
		{"request principals", &apisecurity.AuthorizationPolicy{Rules: []*apisecurity.Rule{{From: []*apisecurity.Rule_From{{Source: &apisecurity.Source{NotRequestPrincipals: []string{"a"}}}}}}}, true},
		{"header condition", &apisecurity.AuthorizationPolicy{Rules: []*apisecurity.Rule{{When: []*apisecurity.Condition{{Key: "request.headers[a]"}}}}}, true},
		{"L4 condition", &apisecurity.AuthorizationPolicy{Rules: []*apisecurity.Rule{{When: []*apisecurity.Condition{{Key: "source.ip"}}}}}, false},
		{"targetRef", &apisecurity.AuthorizationPolicy{TargetRef: &apitype.PolicyTargetReference{Kind: "Gateway", Name: "w"}}, true},
	}
	for _, tt := range tests {
		if got := NeedsWaypoint(ap("app", tt.spec)); got != tt.want {
			t.Errorf("%s: NeedsWaypoint = %v, want %v", tt.name, got, tt.want)
		}
	}
}

// FuzzTranslateAuthorizationPolicy decodes arbitrary JSON into a policy and
// checks the invariants: no panic, valid CIDRs and ports, and an ALLOW
// policy never gains a group from a rule that needs L7.
func FuzzTranslateAuthorizationPolicy(f *testing.F) {
	f.Add(`{"action":"ALLOW","rules":[{"from":[{"source":{"principals":["*"],"ipBlocks":["10.0.0.0/8"]}}],"to":[{"operation":{"ports":["80"],"methods":["GET"]}}]}]}`)
	f.Add(`{"action":"DENY","selector":{"matchLabels":{"a":"b"}},"rules":[{"when":[{"key":"source.ip","values":["::1/128","1.2.3.4/33"]}]}]}`)
	f.Add(`{"rules":[{"from":[{"source":{"serviceAccounts":["a/b/c","/x",""]}}]}]}`)
	f.Fuzz(func(t *testing.T, js string) {
		var spec apisecurity.AuthorizationPolicy
		if err := json.Unmarshal([]byte(js), &spec); err != nil {
			return
		}
		p := &securityv1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Name: "f", Namespace: "app"}}
		proto.Merge(&p.Spec, &spec)
		out := TranslateAuthorizationPolicy(root, p)
		if out == nil {
			return
		}
		if out.AmbientL7Derived != NeedsWaypoint(p) {
			t.Fatalf("AmbientL7Derived = %v for a policy with NeedsWaypoint = %v", out.AmbientL7Derived, NeedsWaypoint(p))
		}
		l7Rules := 0
		for _, r := range spec.GetRules() {
			for _, to := range r.GetTo() {
				if operationNeedsL7(to.GetOperation()) {
					l7Rules++
					break
				}
			}
		}
		if out.Action == security.Action_ALLOW && len(out.Groups) > len(spec.GetRules())-l7Rules {
			t.Fatalf("ALLOW kept an L7 rule: %d groups from %d rules (%d L7)", len(out.Groups), len(spec.GetRules()), l7Rules)
		}
		for _, g := range out.Groups {
			for _, r := range g.Rules {
				for _, m := range r.Matches {
					for _, set := range [][]*security.Address{m.SourceIps, m.NotSourceIps, m.DestinationIps, m.NotDestinationIps} {
						for _, a := range set {
							if (len(a.Address) != 4 && len(a.Address) != 16) || a.Length > uint32(len(a.Address)*8) {
								t.Fatalf("invalid CIDR %v/%d", a.Address, a.Length)
							}
						}
					}
					for _, pp := range append(append([]uint32{}, m.DestinationPorts...), m.NotDestinationPorts...) {
						if pp > 65535 {
							t.Fatalf("port %d", pp)
						}
					}
				}
			}
		}
	})
}

func TestDroppedL7Rules(t *testing.T) {
	paths := &apisecurity.Rule{To: []*apisecurity.Rule_To{{Operation: &apisecurity.Operation{Paths: []string{"/admin"}, Methods: []string{"GET"}}}}}
	jwt := &apisecurity.Rule{From: []*apisecurity.Rule_From{{Source: &apisecurity.Source{RequestPrincipals: []string{"*"}}}}}
	header := &apisecurity.Rule{When: []*apisecurity.Condition{{Key: "request.headers[x-user]", Values: []string{"a"}}}}
	l4 := &apisecurity.Rule{From: []*apisecurity.Rule_From{{Source: &apisecurity.Source{Namespaces: []string{"a"}}}}}
	tests := []struct {
		name string
		spec *apisecurity.AuthorizationPolicy
		want []DroppedRule
	}{
		{"L4 only", &apisecurity.AuthorizationPolicy{Rules: []*apisecurity.Rule{l4}}, nil},
		{"ALLOW with L7 rules among L4 ones",
			&apisecurity.AuthorizationPolicy{Rules: []*apisecurity.Rule{l4, paths, jwt, header}},
			[]DroppedRule{{1, []string{"methods", "paths"}}, {2, []string{"requestPrincipals"}}, {3, []string{"when request.headers[x-user]"}}}},
		{"DENY keeps its L4 part", &apisecurity.AuthorizationPolicy{Action: apisecurity.AuthorizationPolicy_DENY, Rules: []*apisecurity.Rule{paths}}, nil},
		{"targetRef: waypoint only", &apisecurity.AuthorizationPolicy{TargetRefs: []*apitype.PolicyTargetReference{{Kind: "Service", Name: "s"}}, Rules: []*apisecurity.Rule{paths}}, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := DroppedL7Rules(root, ap("app", tc.spec))
			if !equalDropped(got, tc.want) {
				t.Fatalf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

func equalDropped(a, b []DroppedRule) bool {
	ja, _ := json.Marshal(a)
	jb, _ := json.Marshal(b)
	return string(ja) == string(jb)
}

package policy

import (
	"reflect"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/prototext"
	apisecurity "istio.io/api/security/v1beta1"
	apitype "istio.io/api/type/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi/security"
)

type mtls = apisecurity.PeerAuthentication_MutualTLS

func pa(ns, name string, age int, sel map[string]string, mode mtlsMode, ports map[uint32]mtlsMode) *securityv1.PeerAuthentication {
	p := &securityv1.PeerAuthentication{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns,
		CreationTimestamp: metav1.NewTime(time.Unix(1_000_000-int64(age), 0))}}
	if sel != nil {
		p.Spec.Selector = &apitype.WorkloadSelector{MatchLabels: sel}
	}
	if mode != modeUnset {
		p.Spec.Mtls = &mtls{Mode: mode}
	}
	if ports != nil {
		p.Spec.PortLevelMtls = map[uint32]*mtls{}
		for port, m := range ports {
			p.Spec.PortLevelMtls[port] = &mtls{Mode: m}
		}
	}
	return p
}

func TestWorkloadPeerAuthenticationKeys(t *testing.T) {
	app := map[string]string{"app": "web"}
	static := root + "/" + StaticStrictPolicyName
	tests := []struct {
		name string
		pas  []*securityv1.PeerAuthentication
		want []string
	}{
		{"no policy: permissive", nil, nil},
		{"mesh STRICT", []*securityv1.PeerAuthentication{pa(root, "m", 1, nil, modeStrict, nil)}, []string{static}},
		{"mesh STRICT, namespace PERMISSIVE", []*securityv1.PeerAuthentication{pa(root, "m", 1, nil, modeStrict, nil), pa("app", "n", 1, nil, modePermissive, nil)}, nil},
		{"mesh PERMISSIVE, namespace STRICT", []*securityv1.PeerAuthentication{pa(root, "m", 1, nil, modePermissive, nil), pa("app", "n", 1, nil, modeStrict, nil)}, []string{static}},
		{"namespace UNSET inherits mesh STRICT", []*securityv1.PeerAuthentication{pa(root, "m", 1, nil, modeStrict, nil), pa("app", "n", 1, nil, modeUnset, nil)}, []string{static}},
		{"oldest namespace policy wins", []*securityv1.PeerAuthentication{pa("app", "new", 1, nil, modePermissive, nil), pa("app", "old", 5, nil, modeStrict, nil)}, []string{static}},
		{"workload STRICT over namespace PERMISSIVE", []*securityv1.PeerAuthentication{pa("app", "n", 1, nil, modePermissive, nil), pa("app", "w", 1, app, modeStrict, nil)}, []string{static}},
		{"workload PERMISSIVE over mesh STRICT", []*securityv1.PeerAuthentication{pa(root, "m", 1, nil, modeStrict, nil), pa("app", "w", 1, app, modePermissive, nil)}, nil},
		{"workload DISABLE over mesh STRICT", []*securityv1.PeerAuthentication{pa(root, "m", 1, nil, modeStrict, nil), pa("app", "w", 1, app, modeDisable, nil)}, nil},
		{"selector not matching is ignored", []*securityv1.PeerAuthentication{pa("app", "w", 1, map[string]string{"app": "other"}, modeStrict, nil)}, nil},
		{"selector in root namespace is ignored", []*securityv1.PeerAuthentication{pa(root, "w", 1, app, modeStrict, nil)}, nil},
		{"other namespace is ignored", []*securityv1.PeerAuthentication{pa("other", "n", 1, nil, modeStrict, nil)}, nil},
		{"workload STRICT with a PERMISSIVE port", []*securityv1.PeerAuthentication{pa("app", "w", 1, app, modeStrict, map[uint32]mtlsMode{8080: modePermissive})}, []string{"app/" + ConvertedPeerAuthPrefix + "w"}},
		{"workload STRICT with only STRICT ports", []*securityv1.PeerAuthentication{pa("app", "w", 1, app, modeStrict, map[uint32]mtlsMode{8080: modeStrict})}, []string{static}},
		{"workload PERMISSIVE with a STRICT port", []*securityv1.PeerAuthentication{pa("app", "w", 1, app, modePermissive, map[uint32]mtlsMode{9000: modeStrict})}, []string{"app/" + ConvertedPeerAuthPrefix + "w" + strictPortsSuffix}},
		{"workload UNSET with PERMISSIVE port under mesh STRICT", []*securityv1.PeerAuthentication{pa(root, "m", 1, nil, modeStrict, nil), pa("app", "w", 1, app, modeUnset, map[uint32]mtlsMode{8080: modePermissive})}, []string{"app/" + ConvertedPeerAuthPrefix + "w"}},
		{"workload UNSET with STRICT port, nothing above", []*securityv1.PeerAuthentication{pa("app", "w", 1, app, modeUnset, map[uint32]mtlsMode{8080: modeStrict})}, []string{"app/" + ConvertedPeerAuthPrefix + "w" + strictPortsSuffix}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := WorkloadPeerAuthenticationKeys(root, "app", map[string]string{"app": "web", "v": "1"}, tt.pas)
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("keys = %v, want %v", got, tt.want)
			}
			// Every referenced converted policy must exist.
			for _, k := range got {
				if k == static {
					continue
				}
				found := false
				for _, p := range tt.pas {
					for _, a := range TranslatePeerAuthentication(root, p) {
						if a.Namespace+"/"+a.Name == k {
							found = true
						}
					}
				}
				if !found {
					t.Fatalf("referenced policy %s is never produced", k)
				}
			}
		})
	}
}

func TestTranslatePeerAuthentication(t *testing.T) {
	app := map[string]string{"app": "web"}
	presence := []*security.StringMatch{{MatchType: &security.StringMatch_Presence{}}}
	got := TranslatePeerAuthentication(root, pa("app", "w", 1, app, modeStrict, map[uint32]mtlsMode{8080: modePermissive, 9090: modeDisable, 7000: modeStrict}))
	want := &security.Authorization{Name: ConvertedPeerAuthPrefix + "w", Namespace: "app", Scope: security.Scope_WORKLOAD_SELECTOR, Action: security.Action_DENY,
		Groups: []*security.Group{group(rules(&security.Match{NotPrincipals: presence, NotDestinationPorts: []uint32{8080, 9090}}))}}
	if len(got) != 1 || !equalAuthz(got[0], want) {
		t.Fatalf("strict with exemptions: %v", got)
	}
	got = TranslatePeerAuthentication(root, pa("app", "w", 1, app, modeUnset, map[uint32]mtlsMode{8080: modePermissive, 7000: modeStrict}))
	if len(got) != 2 {
		t.Fatalf("unset top must produce both variants, got %d", len(got))
	}
	wantStrictPorts := &security.Authorization{Name: ConvertedPeerAuthPrefix + "w" + strictPortsSuffix, Namespace: "app", Scope: security.Scope_WORKLOAD_SELECTOR, Action: security.Action_DENY,
		Groups: []*security.Group{group(rules(&security.Match{NotPrincipals: presence, DestinationPorts: []uint32{7000}}))}}
	if !equalAuthz(got[1], wantStrictPorts) {
		t.Fatalf("strict ports variant:\n%s", prototext.Format(got[1]))
	}
	for _, p := range []*securityv1.PeerAuthentication{
		pa(root, "w", 1, app, modeStrict, map[uint32]mtlsMode{80: modePermissive}),  // root namespace
		pa("app", "n", 1, nil, modeStrict, map[uint32]mtlsMode{80: modePermissive}), // no selector
		pa("app", "w", 1, app, modeStrict, nil),                                     // no ports
		pa("app", "w", 1, app, modeStrict, map[uint32]mtlsMode{80: modeStrict}),     // all strict
	} {
		if out := TranslatePeerAuthentication(root, p); len(out) != 0 {
			t.Errorf("%s/%s: expected no synthetic policy, got %d", p.Namespace, p.Name, len(out))
		}
	}
	s := StaticStrictPolicy(root)
	if s.Action != security.Action_DENY || s.Scope != security.Scope_WORKLOAD_SELECTOR || s.Namespace != root || len(s.Groups[0].Rules[0].Matches[0].NotPrincipals) != 1 {
		t.Fatalf("static strict policy: %v", s)
	}
}

// FuzzPeerAuthentication: for any mix of mesh, namespace and workload modes
// with port-level settings, every policy a workload references exists, and
// a workload whose effective default is STRICT always references a policy
// that denies plaintext.
func FuzzPeerAuthentication(f *testing.F) {
	f.Add(uint8(3), uint8(0), uint8(0), []byte{0x50, 2})
	f.Add(uint8(0), uint8(2), uint8(3), []byte{0x01, 3, 0x02, 1})
	f.Add(uint8(1), uint8(0), uint8(0), []byte{})
	f.Fuzz(func(t *testing.T, meshMode, nsMode, wlMode uint8, ports []byte) {
		m := func(b uint8) mtlsMode { return mtlsMode(b % 4) }
		portModes := map[uint32]mtlsMode{}
		for i := 0; i+1 < len(ports) && i < 16; i += 2 {
			portModes[uint32(ports[i])+1] = m(ports[i+1])
		}
		pas := []*securityv1.PeerAuthentication{
			pa(root, "mesh", 3, nil, m(meshMode), nil),
			pa("app", "ns", 2, nil, m(nsMode), nil),
			pa("app", "wl", 1, map[string]string{"app": "web"}, m(wlMode), portModes),
		}
		produced := map[string]*security.Authorization{root + "/" + StaticStrictPolicyName: StaticStrictPolicy(root)}
		for _, p := range pas {
			for _, a := range TranslatePeerAuthentication(root, p) {
				produced[a.Namespace+"/"+a.Name] = a
			}
		}
		keys := WorkloadPeerAuthenticationKeys(root, "app", map[string]string{"app": "web"}, pas)
		for _, k := range keys {
			if produced[k] == nil {
				t.Fatalf("referenced %s is never produced", k)
			}
		}
		// Effective default mode, computed independently.
		strict := false
		for _, md := range []mtlsMode{m(meshMode), m(nsMode), m(wlMode)} {
			if md != modeUnset {
				strict = md == modeStrict
			}
		}
		if strict && len(keys) == 0 {
			t.Fatalf("effective STRICT but no policy referenced (mesh %v ns %v wl %v ports %v)", m(meshMode), m(nsMode), m(wlMode), portModes)
		}
		for _, k := range keys {
			if a := produced[k]; a.Action != security.Action_DENY {
				t.Fatalf("%s is not a DENY policy", k)
			}
		}
	})
}

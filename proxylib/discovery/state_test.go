package discovery

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi/security"
)

func anyOf(t testing.TB, typeURL string, m proto.Message) *anypb.Any {
	b, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return &anypb.Any{TypeUrl: typeURL, Value: b}
}

func TestPoliciesForScopes(t *testing.T) {
	s := NewState(AddressType, AuthorizationType)
	pols := []*security.Authorization{
		{Name: "global", Namespace: "root", Scope: security.Scope_GLOBAL},
		{Name: "ns", Namespace: "app", Scope: security.Scope_NAMESPACE},
		{Name: "other-ns", Namespace: "other", Scope: security.Scope_NAMESPACE},
		{Name: "sel", Namespace: "app", Scope: security.Scope_WORKLOAD_SELECTOR},
		{Name: "sel-unreferenced", Namespace: "app", Scope: security.Scope_WORKLOAD_SELECTOR},
	}
	var res []Resource
	for _, p := range pols {
		res = append(res, Resource{Name: PolicyKey(p.Namespace, p.Name), Version: "1", Body: anyOf(t, AuthorizationType, p)})
	}
	if err := s.Apply(AuthorizationType, res, nil); err != nil {
		t.Fatal(err)
	}
	w := &workloadapi.Workload{Uid: "u", Namespace: "app", AuthorizationPolicies: []string{"app/sel", "app/missing"}}
	var got []string
	for _, p := range s.PoliciesFor(w) {
		got = append(got, PolicyKey(p.Namespace, p.Name))
	}
	want := []string{"app/ns", "app/sel", "root/global"}
	if len(got) != len(want) {
		t.Fatalf("PoliciesFor = %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("PoliciesFor = %v, want %v", got, want)
		}
	}
	if s.Ready() {
		t.Fatal("ready before addresses synced")
	}
}

func TestApplyRejectsInvalid(t *testing.T) {
	ok := &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: &workloadapi.Workload{Uid: "u1", Addresses: [][]byte{{10, 0, 0, 1}}}}}
	tests := []struct {
		name string
		res  Resource
	}{
		{"empty name", Resource{Name: "", Body: anyOf(t, AddressType, ok)}},
		{"name differs from uid", Resource{Name: "other", Body: anyOf(t, AddressType, ok)}},
		{"wrong body type", Resource{Name: "u1", Body: anyOf(t, AuthorizationType, ok)}},
		{"garbage body", Resource{Name: "u1", Body: &anypb.Any{TypeUrl: AddressType, Value: []byte{0xff, 0xff, 0xff}}}},
		{"empty address", Resource{Name: "u1", Body: anyOf(t, AddressType, &workloadapi.Address{})}},
		{"no address nor hostname", Resource{Name: "u1", Body: anyOf(t, AddressType, &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: &workloadapi.Workload{Uid: "u1"}}})}},
		{"waypoint without destination", Resource{Name: "u1", Body: anyOf(t, AddressType, &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: &workloadapi.Workload{Uid: "u1", Addresses: [][]byte{{10, 0, 0, 1}}, Waypoint: &workloadapi.GatewayAddress{}}}})}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := NewState(AddressType)
			good := Resource{Name: "u1", Body: anyOf(t, AddressType, ok)}
			if tt.res.Name == "u1" {
				good = Resource{Name: "u2", Body: anyOf(t, AddressType, &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: &workloadapi.Workload{Uid: "u2", Addresses: [][]byte{{10, 0, 0, 2}}}}})}
			}
			if err := s.Apply(AddressType, []Resource{good, tt.res}, nil); err == nil {
				t.Fatal("Apply accepted an invalid resource")
			}
			if len(s.Workloads()) != 0 || s.Ready() {
				t.Fatal("a rejected response changed the state")
			}
		})
	}
}

func TestHostNetworkWorkloadNotIndexedByAddress(t *testing.T) {
	s := NewState(AddressType)
	w := &workloadapi.Workload{Uid: "h", Addresses: [][]byte{{10, 0, 0, 5}}, NetworkMode: workloadapi.NetworkMode_HOST_NETWORK}
	if err := s.Apply(AddressType, []Resource{{Name: "h", Body: anyOf(t, AddressType, &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: w}})}}, nil); err != nil {
		t.Fatal(err)
	}
	if s.WorkloadByAddr(netip.MustParseAddr("10.0.0.5")) != nil {
		t.Fatal("host-network workload found by shared address")
	}
	if s.WorkloadByUID("h") == nil {
		t.Fatal("host-network workload missing by uid")
	}
}

// FuzzApply feeds arbitrary bytes as resources of every type: the state must
// never panic, and a rejected response must leave it empty.
func FuzzApply(f *testing.F) {
	wl, _ := proto.Marshal(&workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: &workloadapi.Workload{Uid: "u", Addresses: [][]byte{{10, 0, 0, 1}}, Services: map[string]*workloadapi.PortList{"a/b": {}}}}})
	svc, _ := proto.Marshal(&workloadapi.Address{Type: &workloadapi.Address_Service{Service: &workloadapi.Service{Namespace: "a", Hostname: "b", Addresses: []*workloadapi.NetworkAddress{{Address: []byte{10, 96, 0, 1}}}}}})
	pol, _ := proto.Marshal(&security.Authorization{Name: "p", Namespace: "a", Groups: []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{{SourceIps: []*security.Address{{Address: []byte{1, 2, 3, 4}, Length: 24}}}}}}}}})
	f.Add(uint8(0), "u", wl)
	f.Add(uint8(0), "a/b", svc)
	f.Add(uint8(1), "a/p", pol)
	f.Add(uint8(2), "g/k/n/x", []byte{0x0a, 0x01, 0x67})
	types := []string{AddressType, AuthorizationType, L7ResourceType}
	f.Fuzz(func(t *testing.T, typ uint8, name string, body []byte) {
		typeURL := types[int(typ)%len(types)]
		s := NewState(typeURL)
		err := s.Apply(typeURL, []Resource{{Name: name, Version: "v", Body: &anypb.Any{TypeUrl: typeURL, Value: body}}}, nil)
		if err != nil && (len(s.Workloads())+len(s.Services())+len(s.Policies())+len(s.L7Resources()) != 0 || s.Ready()) {
			t.Fatal("rejected response changed the state")
		}
		for _, w := range s.Workloads() {
			_ = s.PoliciesFor(w)
			for k := range w.Services {
				_ = s.Endpoints(k)
			}
		}
		// Removing what was added leaves nothing behind.
		if err := s.Apply(typeURL, nil, []string{name}); err != nil {
			t.Fatal(err)
		}
		if len(s.Workloads())+len(s.Services())+len(s.Policies())+len(s.L7Resources()) != 0 || len(s.wlByAddr)+len(s.svcByVIP)+len(s.endpoints) != 0 {
			t.Fatal("removal left indexes behind")
		}
	})
}

func TestServiceAccountMatchesBecomePrincipals(t *testing.T) {
	sa := func(ns, name string) *security.ServiceAccountMatch {
		return &security.ServiceAccountMatch{Namespace: ns, ServiceAccount: name}
	}
	pol := func(m *security.Match) *security.Authorization {
		return &security.Authorization{Name: "p", Namespace: "a", Groups: []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{m}}}}}}
	}
	s := NewState(AuthorizationType)
	in := pol(&security.Match{ServiceAccounts: []*security.ServiceAccountMatch{sa("a", "web")},
		NotPrincipals: []*security.StringMatch{{MatchType: &security.StringMatch_Exact{Exact: "x"}}}, NotServiceAccounts: []*security.ServiceAccountMatch{sa("b", "bad")}})
	if err := s.Apply(AuthorizationType, []Resource{{Name: "a/p", Body: anyOf(t, AuthorizationType, in)}}, nil); err != nil {
		t.Fatal(err)
	}
	m := s.Policy("a/p").Groups[0].Rules[0].Matches[0]
	if len(m.ServiceAccounts)+len(m.NotServiceAccounts) != 0 || m.Principals[0].GetSuffix() != "/ns/a/sa/web" ||
		len(m.NotPrincipals) != 2 || m.NotPrincipals[1].GetSuffix() != "/ns/b/sa/bad" {
		t.Fatalf("normalized match = %v", m)
	}
	for name, bad := range map[string]*security.Authorization{
		"principals and service accounts": pol(&security.Match{ServiceAccounts: []*security.ServiceAccountMatch{sa("a", "web")}, Principals: []*security.StringMatch{{MatchType: &security.StringMatch_Exact{Exact: "x"}}}}),
		"empty service account":           pol(&security.Match{ServiceAccounts: []*security.ServiceAccountMatch{sa("a", "")}}),
	} {
		if err := NewState(AuthorizationType).Apply(AuthorizationType, []Resource{{Name: "a/p", Body: anyOf(t, AuthorizationType, bad)}}, nil); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// TestServicesByHostname: a ServiceEntry host declared in two namespaces
// is found in both, in key order, and forgotten as each goes.
func TestServicesByHostname(t *testing.T) {
	s := NewState(AddressType)
	svc := func(ns string) Resource {
		m := &workloadapi.Address{Type: &workloadapi.Address_Service{Service: &workloadapi.Service{Name: "ext", Namespace: ns, Hostname: "api.example.com"}}}
		return Resource{Name: ServiceKey(ns, "api.example.com"), Version: "1", Body: anyOf(t, AddressType, m)}
	}
	if err := s.Apply(AddressType, []Resource{svc("b"), svc("a")}, nil); err != nil {
		t.Fatal(err)
	}
	if got := s.ServicesByHostname("api.example.com"); len(got) != 2 || got[0].Namespace != "a" || got[1].Namespace != "b" {
		t.Fatalf("ServicesByHostname = %v", got)
	}
	if err := s.Apply(AddressType, nil, []string{ServiceKey("a", "api.example.com")}); err != nil {
		t.Fatal(err)
	}
	if got := s.ServicesByHostname("api.example.com"); len(got) != 1 || got[0].Namespace != "b" {
		t.Fatalf("after removing a: %v", got)
	}
	if err := s.Apply(AddressType, nil, []string{ServiceKey("b", "api.example.com")}); err != nil {
		t.Fatal(err)
	}
	if got := s.ServicesByHostname("api.example.com"); len(got) != 0 || len(s.svcByHost) != 0 {
		t.Fatalf("after removing both: %v (index %v)", got, s.svcByHost)
	}
}

func TestIsKubernetesServiceHost(t *testing.T) {
	for _, tc := range []struct {
		name, ns, host string
		want           bool
	}{
		{"httpbin", "default", "httpbin.default.svc.cluster.local", true},
		{"httpbin", "default", "httpbin.default.svc.corp.example", true},
		{"api", "default", "api.example.com", false},
		{"api", "default", "api.default.example.com", false},
	} {
		if got := IsKubernetesServiceHost(tc.name, tc.ns, tc.host); got != tc.want {
			t.Errorf("%s %s %s: %t", tc.name, tc.ns, tc.host, got)
		}
	}
}

// TestWaitReady: waiters are released once every subscribed type has had
// its first response, not before; a State with no subscriptions is ready
// at once; a waiter's context bounds the wait.
func TestWaitReady(t *testing.T) {
	if err := NewState().WaitReady(context.Background()); err != nil {
		t.Fatalf("no subscriptions: %v", err)
	}
	s := NewState(AddressType, AuthorizationType)
	done := make(chan error, 1)
	go func() { done <- s.WaitReady(context.Background()) }()
	if err := s.Apply(AddressType, nil, nil); err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := s.WaitReady(short); !errors.Is(err, context.DeadlineExceeded) || s.Ready() {
		t.Fatalf("one of two types synced: WaitReady = %v, Ready = %v", err, s.Ready())
	}
	if err := s.Apply(AuthorizationType, nil, nil); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil || !s.Ready() {
		t.Fatalf("both synced: waiter got %v, Ready = %v", err, s.Ready())
	}
	if err := s.Apply(AuthorizationType, nil, nil); err != nil { // a later push must not close twice
		t.Fatal(err)
	}
}

// HoldUntilReady returns at once when ready, holds until the sync, and
// names the bound when the sync does not come in time.
func TestHoldUntilReady(t *testing.T) {
	if err := NewState().HoldUntilReady(context.Background(), time.Millisecond); err != nil {
		t.Fatalf("ready state: %v", err)
	}
	s := NewState(AddressType)
	if err := s.HoldUntilReady(context.Background(), 20*time.Millisecond); err == nil || !strings.Contains(err.Error(), "20ms") {
		t.Fatalf("never synced: %v, want an error naming 20ms", err)
	}
	go func() {
		time.Sleep(20 * time.Millisecond)
		s.Apply(AddressType, nil, nil)
	}()
	if err := s.HoldUntilReady(context.Background(), 10*time.Second); err != nil {
		t.Fatalf("synced while held: %v", err)
	}
}

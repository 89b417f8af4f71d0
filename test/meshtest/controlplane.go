package meshtest

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"testing"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"sigs.k8s.io/yaml"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/meshapi"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi/security"
)

// ControlPlane is the test control plane: it applies every change to each
// registered discovery State at once, as delta xDS would, and gives a State
// registered later everything current (a new proxy's first push).
type ControlPlane struct {
	t      testing.TB
	mu     sync.Mutex
	states []*discovery.State
	ver    int
	// current resources by type URL and name
	current map[string]map[string]discovery.Resource
	// scoped: the node-scoped States (NewScopedState) and what they hold.
	scoped map[*discovery.State]*scopedState
	// Unanswered: address lookups the control plane never answers.
	Unanswered map[string]bool
}

// NewState registers a State subscribed to types, by default the address
// and authorization types (a ztunnel's).
func (cp *ControlPlane) NewState(types ...string) *discovery.State {
	if len(types) == 0 {
		types = []string{discovery.AddressType, discovery.AuthorizationType}
	}
	s := discovery.NewState(types...)
	cp.mu.Lock()
	defer cp.mu.Unlock()
	cp.states = append(cp.states, s)
	for _, typeURL := range types {
		var rs []discovery.Resource
		for _, r := range cp.current[typeURL] {
			rs = append(rs, r)
		}
		if len(rs) == 0 {
			continue
		}
		if err := s.Apply(typeURL, rs, nil); err != nil {
			cp.t.Fatalf("replay %s: %v", typeURL, err)
		}
	}
	return s
}

// Push applies resource name of typeURL with a new version to every State.
func (cp *ControlPlane) Push(typeURL string, name string, m proto.Message) {
	cp.t.Helper()
	body, err := anypb.New(m)
	if err != nil {
		cp.t.Fatal(err)
	}
	body.TypeUrl = typeURL
	cp.mu.Lock()
	cp.ver++
	v := fmt.Sprint(cp.ver)
	r := discovery.Resource{Name: name, Version: v, Body: body}
	if cp.current == nil {
		cp.current = map[string]map[string]discovery.Resource{}
	}
	if cp.current[typeURL] == nil {
		cp.current[typeURL] = map[string]discovery.Resource{}
	}
	cp.current[typeURL][name] = r
	var states []*discovery.State
	for _, s := range cp.states {
		if sc := cp.scoped[s]; sc == nil || sc.delivers(typeURL, name, m) {
			states = append(states, s)
		}
	}
	cp.mu.Unlock()
	for _, s := range states {
		if err := s.Apply(typeURL, []discovery.Resource{r}, nil); err != nil {
			cp.t.Fatalf("apply %s: %v", name, err)
		}
	}
}

// Remove deletes resource name of typeURL from every State.
func (cp *ControlPlane) Remove(typeURL, name string) {
	cp.mu.Lock()
	delete(cp.current[typeURL], name)
	states := append([]*discovery.State(nil), cp.states...)
	cp.mu.Unlock()
	for _, s := range states {
		if err := s.Apply(typeURL, nil, []string{name}); err != nil {
			cp.t.Fatal(err)
		}
	}
}

// SyncEmpty marks the address, authorization and L7 types synced in s (the
// first full push of an empty mesh).
func (cp *ControlPlane) SyncEmpty(s *discovery.State) {
	s.Apply(discovery.AddressType, nil, nil)
	s.Apply(discovery.AuthorizationType, nil, nil)
	s.Apply(discovery.L7ResourceType, nil, nil)
}

// Workload publishes w.
func (cp *ControlPlane) Workload(w *workloadapi.Workload) {
	cp.Push(discovery.AddressType, w.Uid, &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: w}})
}

// Service publishes s.
func (cp *ControlPlane) Service(s *workloadapi.Service) {
	cp.Push(discovery.AddressType, discovery.ServiceKey(s.Namespace, s.Hostname), &workloadapi.Address{Type: &workloadapi.Address_Service{Service: s}})
}

// Policy publishes p.
func (cp *ControlPlane) Policy(p *security.Authorization) {
	cp.Push(discovery.AuthorizationType, discovery.PolicyKey(p.Namespace, p.Name), p)
}

// L7 publishes a Kubernetes object (YAML) to the waypoints as the control
// plane does: an L7Resource holding the object as JSON (namespace
// "default" unless the object names one).
func (cp *ControlPlane) L7(y string) {
	t := cp.t
	t.Helper()
	js, err := yaml.YAMLToJSON([]byte(y))
	if err != nil {
		t.Fatal(err)
	}
	var obj struct {
		APIVersion, Kind string
		Metadata         struct{ Name, Namespace string }
	}
	if err := yaml.Unmarshal([]byte(y), &obj); err != nil {
		t.Fatal(err)
	}
	ns := obj.Metadata.Namespace
	if ns == "" {
		ns = Namespace
	}
	group, _, _ := strings.Cut(obj.APIVersion, "/")
	res := &meshapi.L7Resource{Group: group, Kind: obj.Kind, Namespace: ns, Name: obj.Metadata.Name, Json: js}
	cp.Push(discovery.L7ResourceType, discovery.L7Key(group, obj.Kind, ns, obj.Metadata.Name), res)
}

// scopedState is a node-scoped ztunnel's State (WithOnDemand): it receives
// services, its node's workloads and what it asked for, as the real control
// plane's AddressCache serves a ztunnel subscribed to the node scope.
type scopedState struct {
	node  string
	asked map[string]bool // resource names it was given
}

// NewScopedState registers a node-scoped State for node and returns it with
// its Demand function (proxy.Config.Demand). Addresses in unanswered are
// never answered (the lookup times out).
func (cp *ControlPlane) NewScopedState(node string) (*discovery.State, func(ctx context.Context, names ...string) error) {
	return cp.newScopedState(node, discovery.AddressType, discovery.AuthorizationType)
}

func (cp *ControlPlane) newScopedState(node string, types ...string) (*discovery.State, func(ctx context.Context, names ...string) error) {
	s := discovery.NewState(types...)
	sc := &scopedState{node: node, asked: map[string]bool{}}
	cp.mu.Lock()
	if cp.scoped == nil {
		cp.scoped = map[*discovery.State]*scopedState{}
	}
	cp.scoped[s] = sc
	cp.states = append(cp.states, s)
	cp.mu.Unlock()
	demand := func(ctx context.Context, names ...string) error {
		cp.mu.Lock()
		var rs []discovery.Resource
		for _, n := range names {
			if cp.Unanswered[n] {
				cp.mu.Unlock()
				<-ctx.Done()
				return ctx.Err()
			}
			for name, r := range cp.current[discovery.AddressType] {
				if cp.answers(name, r, n) && !sc.asked[name] {
					sc.asked[name] = true
					rs = append(rs, r)
				}
			}
		}
		cp.mu.Unlock()
		if len(rs) == 0 {
			return nil // not in the mesh
		}
		return s.Apply(discovery.AddressType, rs, nil)
	}
	return s, demand
}

// NewSidecarState registers a State scoped as the control plane's
// AddressCache scopes a sidecar (its own workload uid, every service, what
// it looks up; no node's pods) and returns it with its Demand function.
// Unlike the real cache it does not add the workloads behind waypoints:
// tests with waypoints use full sidecars.
func (cp *ControlPlane) NewSidecarState(uid string) (*discovery.State, func(ctx context.Context, names ...string) error) {
	s, demand := cp.newScopedState("", discovery.SidecarTypes...)
	cp.mu.Lock()
	sc := cp.scoped[s]
	sc.asked[uid] = true
	replay := map[string][]discovery.Resource{}
	for _, typeURL := range discovery.SidecarTypes {
		for name, r := range cp.current[typeURL] {
			var a workloadapi.Address
			if typeURL != discovery.AddressType || r.Body.UnmarshalTo(&a) == nil && sc.delivers(typeURL, name, &a) {
				replay[typeURL] = append(replay[typeURL], r)
			}
		}
	}
	cp.mu.Unlock()
	for typeURL, rs := range replay {
		if err := s.Apply(typeURL, rs, nil); err != nil {
			cp.t.Fatal(err)
		}
	}
	return s, demand
}

// answers reports whether resource name (r) answers the lookup of n: it is
// n, owns address alias n, or is an endpoint of service n or of the service
// owning alias n.
func (cp *ControlPlane) answers(name string, r discovery.Resource, n string) bool {
	if name == n {
		return true
	}
	var a workloadapi.Address
	if err := r.Body.UnmarshalTo(&a); err != nil {
		return false
	}
	owns := func(addrs [][]byte) bool {
		for _, b := range addrs {
			if ip, ok := netip.AddrFromSlice(b); ok && discovery.AddressAlias("", ip) == n {
				return true
			}
		}
		return false
	}
	if svc := a.GetService(); svc != nil {
		var vips [][]byte
		for _, v := range svc.Addresses {
			vips = append(vips, v.Address)
		}
		return owns(vips)
	}
	w := a.GetWorkload()
	if owns(w.GetAddresses()) {
		return true
	}
	for key := range w.GetServices() {
		if key == n || cp.serviceOwns(key, n) {
			return true
		}
	}
	return false
}

func (cp *ControlPlane) serviceOwns(key, alias string) bool {
	r, ok := cp.current[discovery.AddressType][key]
	return ok && key != alias && cp.answers(key, r, alias)
}

// delivers reports whether a scoped State receives resource name.
func (sc *scopedState) delivers(typeURL, name string, m proto.Message) bool {
	if typeURL != discovery.AddressType || sc.asked[name] {
		return true
	}
	a, ok := m.(*workloadapi.Address)
	if !ok {
		return false
	}
	for key := range a.GetWorkload().GetServices() {
		if sc.asked[key] {
			return true // an endpoint of a service it asked for
		}
	}
	return a.GetService() != nil || sc.node != "" && a.GetWorkload().GetNode() == sc.node
}

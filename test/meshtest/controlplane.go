package meshtest

import (
	"fmt"
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
	states := append([]*discovery.State(nil), cp.states...)
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

package discovery

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sort"
	"sync"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/ambientmesh/ambient/proxylib/discovery/meshapi"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi/security"
)

// Change describes one applied xDS response. Names are resource names.
type Change struct {
	TypeURL string
	Updated []string
	Removed []string
}

// Resource is one named, versioned resource of a delta response.
type Resource struct {
	Name    string
	Version string
	Body    *anypb.Any
}

// State is the proxy's view of the mesh, fed by Client. It is safe for
// concurrent use. Messages returned by its getters are shared and must not be
// modified.
type State struct {
	mu sync.RWMutex

	workloads  map[string]*workloadapi.Workload // by uid
	wlByAddr   map[netip.Addr]string            // address -> uid (STANDARD network mode only)
	services   map[string]*workloadapi.Service  // by "<ns>/<hostname>"
	svcByVIP   map[netip.Addr]string            // VIP -> service key
	svcByHost  map[string]map[string]struct{}   // hostname -> service keys
	endpoints  map[string]map[string]struct{}   // service key -> workload uids
	policies   map[string]*security.Authorization
	l7         map[string]*meshapi.L7Resource
	versions   map[string]map[string]string // type URL -> name -> version
	synced     map[string]bool
	subscribed []string
	listeners  []func(Change)
	ready      chan struct{} // closed once every subscribed type synced
}

// NewState returns an empty State that reports Ready once every type in
// typeURLs has been synced at least once.
func NewState(typeURLs ...string) *State {
	s := &State{
		workloads:  map[string]*workloadapi.Workload{},
		wlByAddr:   map[netip.Addr]string{},
		services:   map[string]*workloadapi.Service{},
		svcByVIP:   map[netip.Addr]string{},
		svcByHost:  map[string]map[string]struct{}{},
		endpoints:  map[string]map[string]struct{}{},
		policies:   map[string]*security.Authorization{},
		l7:         map[string]*meshapi.L7Resource{},
		versions:   map[string]map[string]string{},
		synced:     map[string]bool{},
		subscribed: append([]string(nil), typeURLs...),
		ready:      make(chan struct{}),
	}
	if len(typeURLs) == 0 {
		close(s.ready)
	}
	return s
}

// OnChange registers fn to be called (outside the lock, in order) after each
// applied response.
func (s *State) OnChange(fn func(Change)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.listeners = append(s.listeners, fn)
}

// Ready reports whether every subscribed type has been received at least once.
// Until then a proxy must not admit traffic that policy might forbid.
func (s *State) Ready() bool {
	select {
	case <-s.ready:
		return true
	default:
		return false
	}
}

// WaitReady waits until the state is Ready or ctx ends: a connection that
// arrives while a fresh proxy syncs is held, not refused.
func (s *State) WaitReady(ctx context.Context) error {
	select {
	case <-s.ready:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// HoldUntilReady waits until the state is Ready for at most d: a proxy
// holds a connection that arrives while it syncs, then refuses it (fail
// closed) with this error.
func (s *State) HoldUntilReady(ctx context.Context, d time.Duration) error {
	if s.Ready() {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	if err := s.WaitReady(ctx); err != nil {
		return fmt.Errorf("discovery not synced within %s", d)
	}
	return nil
}

// markSynced records typeURL's first response; s.mu is held.
func (s *State) markSynced(typeURL string) {
	if s.synced[typeURL] {
		return
	}
	s.synced[typeURL] = true
	for _, t := range s.subscribed {
		if !s.synced[t] {
			return
		}
	}
	if !s.Ready() { // a State with no subscriptions starts ready
		close(s.ready)
	}
}

// Versions returns the known resource versions of typeURL, sent as
// initial_resource_versions when the client reconnects.
func (s *State) Versions(typeURL string) map[string]string {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make(map[string]string, len(s.versions[typeURL]))
	for k, v := range s.versions[typeURL] {
		out[k] = v
	}
	return out
}

// ErrInvalidResource marks a resource the State refuses; the client NACKs.
var ErrInvalidResource = errors.New("invalid discovery resource")

type decoded struct {
	name, version string
	workload      *workloadapi.Workload
	service       *workloadapi.Service
	policy        *security.Authorization
	l7            *meshapi.L7Resource
}

// Apply validates and applies one delta response atomically: when any
// resource is invalid nothing changes and the error is returned.
func (s *State) Apply(typeURL string, updated []Resource, removed []string) error {
	decs := make([]decoded, 0, len(updated))
	for _, r := range updated {
		d, err := decode(typeURL, r)
		if err != nil {
			return fmt.Errorf("%w: %s %q: %v", ErrInvalidResource, typeURL, r.Name, err)
		}
		decs = append(decs, d)
	}
	s.mu.Lock()
	for _, name := range removed {
		s.remove(typeURL, name)
	}
	for _, d := range decs {
		s.remove(typeURL, d.name)
		s.insert(typeURL, d)
	}
	s.markSynced(typeURL)
	listeners := append([]func(Change){}, s.listeners...)
	s.mu.Unlock()

	ch := Change{TypeURL: typeURL, Removed: append([]string(nil), removed...)}
	for _, d := range decs {
		ch.Updated = append(ch.Updated, d.name)
	}
	for _, fn := range listeners {
		fn(ch)
	}
	return nil
}

func decode(typeURL string, r Resource) (decoded, error) {
	d := decoded{name: r.Name, version: r.Version}
	if r.Name == "" {
		return d, errors.New("empty name")
	}
	if r.Body == nil {
		return d, errors.New("no body")
	}
	if r.Body.TypeUrl != typeURL {
		return d, fmt.Errorf("body type %q", r.Body.TypeUrl)
	}
	switch typeURL {
	case AddressType:
		var a workloadapi.Address
		if err := proto.Unmarshal(r.Body.Value, &a); err != nil {
			return d, err
		}
		switch {
		case a.GetWorkload() != nil:
			d.workload = a.GetWorkload()
			return d, validateWorkload(r.Name, d.workload)
		case a.GetService() != nil:
			d.service = a.GetService()
			return d, validateService(r.Name, d.service)
		}
		return d, errors.New("address is neither workload nor service")
	case AuthorizationType:
		var p security.Authorization
		if err := proto.Unmarshal(r.Body.Value, &p); err != nil {
			return d, err
		}
		if r.Name != PolicyKey(p.Namespace, p.Name) {
			return d, fmt.Errorf("name does not match policy %s/%s", p.Namespace, p.Name)
		}
		d.policy = &p
		if err := normalizeServiceAccounts(&p); err != nil {
			return d, err
		}
		return d, validatePolicy(&p)
	case L7ResourceType:
		var res meshapi.L7Resource
		if err := proto.Unmarshal(r.Body.Value, &res); err != nil {
			return d, err
		}
		if r.Name != L7Key(res.Group, res.Kind, res.Namespace, res.Name) {
			return d, errors.New("name does not match the object")
		}
		d.l7 = &res
		return d, nil
	}
	return d, fmt.Errorf("unsupported type")
}

func validIP(b []byte) bool { return len(b) == 4 || len(b) == 16 }

func validateWorkload(name string, w *workloadapi.Workload) error {
	if w.Uid != name {
		return fmt.Errorf("name does not match uid %q", w.Uid)
	}
	for _, a := range w.Addresses {
		if !validIP(a) {
			return fmt.Errorf("address of %d bytes", len(a))
		}
	}
	if len(w.Addresses) == 0 && w.Hostname == "" {
		return errors.New("workload has neither address nor hostname")
	}
	return validateGateway(w.Waypoint)
}

func validateService(name string, svc *workloadapi.Service) error {
	if name != ServiceKey(svc.Namespace, svc.Hostname) {
		return fmt.Errorf("name does not match %s/%s", svc.Namespace, svc.Hostname)
	}
	for _, a := range svc.Addresses {
		if !validIP(a.Address) {
			return fmt.Errorf("VIP of %d bytes", len(a.Address))
		}
	}
	for _, p := range svc.Ports {
		if p.ServicePort > 65535 || p.TargetPort > 65535 {
			return fmt.Errorf("port out of range")
		}
	}
	return validateGateway(svc.Waypoint)
}

func validateGateway(g *workloadapi.GatewayAddress) error {
	if g == nil {
		return nil
	}
	if a := g.GetAddress(); a != nil && !validIP(a.Address) {
		return errors.New("waypoint address invalid")
	}
	if g.GetAddress() == nil && g.GetHostname() == nil {
		return errors.New("waypoint without destination")
	}
	return nil
}

// normalizeServiceAccounts rewrites service-account matches (set by Istio's
// istiod) as principal suffixes "/ns/<ns>/sa/<sa>", which is what evaluators
// understand. not_* lists merge exactly; a positive list merges only when
// the match has no principals of its own (ANDing both cannot be expressed),
// otherwise the policy is refused rather than widened.
func normalizeServiceAccounts(p *security.Authorization) error {
	suffixes := func(sas []*security.ServiceAccountMatch) ([]*security.StringMatch, error) {
		out := make([]*security.StringMatch, 0, len(sas))
		for _, sa := range sas {
			if sa.GetNamespace() == "" || sa.GetServiceAccount() == "" {
				return nil, errors.New("service account match without namespace or name")
			}
			out = append(out, &security.StringMatch{MatchType: &security.StringMatch_Suffix{Suffix: "/ns/" + sa.Namespace + "/sa/" + sa.ServiceAccount}})
		}
		return out, nil
	}
	for _, g := range p.Groups {
		for _, r := range g.Rules {
			for _, m := range r.Matches {
				if len(m.ServiceAccounts) > 0 {
					if len(m.Principals) > 0 {
						return errors.New("match with both principals and service accounts is not supported")
					}
					sfx, err := suffixes(m.ServiceAccounts)
					if err != nil {
						return err
					}
					m.Principals, m.ServiceAccounts = sfx, nil
				}
				if len(m.NotServiceAccounts) > 0 {
					sfx, err := suffixes(m.NotServiceAccounts)
					if err != nil {
						return err
					}
					m.NotPrincipals, m.NotServiceAccounts = append(m.NotPrincipals, sfx...), nil
				}
			}
		}
	}
	return nil
}

func validatePolicy(p *security.Authorization) error {
	for _, g := range p.Groups {
		for _, r := range g.Rules {
			for _, m := range r.Matches {
				for _, set := range [][]*security.Address{m.SourceIps, m.NotSourceIps, m.DestinationIps, m.NotDestinationIps} {
					for _, a := range set {
						if !validIP(a.Address) || a.Length > uint32(len(a.Address)*8) {
							return errors.New("invalid CIDR")
						}
					}
				}
				for _, set := range [][]uint32{m.DestinationPorts, m.NotDestinationPorts} {
					for _, port := range set {
						if port > 65535 {
							return errors.New("port out of range")
						}
					}
				}
			}
		}
	}
	return nil
}

func (s *State) remove(typeURL, name string) {
	delete(s.versions[typeURL], name)
	switch typeURL {
	case AddressType:
		if w, ok := s.workloads[name]; ok {
			s.unindexWorkload(w)
			delete(s.workloads, name)
		}
		if svc, ok := s.services[name]; ok {
			for _, a := range svc.Addresses {
				if ip, ok := netip.AddrFromSlice(a.Address); ok && s.svcByVIP[ip.Unmap()] == name {
					delete(s.svcByVIP, ip.Unmap())
				}
			}
			delete(s.svcByHost[svc.Hostname], name)
			if len(s.svcByHost[svc.Hostname]) == 0 {
				delete(s.svcByHost, svc.Hostname)
			}
			delete(s.services, name)
		}
	case AuthorizationType:
		delete(s.policies, name)
	case L7ResourceType:
		delete(s.l7, name)
	}
}

func (s *State) insert(typeURL string, d decoded) {
	if s.versions[typeURL] == nil {
		s.versions[typeURL] = map[string]string{}
	}
	s.versions[typeURL][d.name] = d.version
	switch {
	case d.workload != nil:
		s.workloads[d.name] = d.workload
		s.indexWorkload(d.workload)
	case d.service != nil:
		s.services[d.name] = d.service
		if s.svcByHost[d.service.Hostname] == nil {
			s.svcByHost[d.service.Hostname] = map[string]struct{}{}
		}
		s.svcByHost[d.service.Hostname][d.name] = struct{}{}
		for _, a := range d.service.Addresses {
			if ip, ok := netip.AddrFromSlice(a.Address); ok {
				s.svcByVIP[ip.Unmap()] = d.name
			}
		}
	case d.policy != nil:
		s.policies[d.name] = d.policy
	case d.l7 != nil:
		s.l7[d.name] = d.l7
	}
}

func (s *State) indexWorkload(w *workloadapi.Workload) {
	if w.NetworkMode == workloadapi.NetworkMode_STANDARD {
		for _, a := range w.Addresses {
			if ip, ok := netip.AddrFromSlice(a); ok {
				s.wlByAddr[ip.Unmap()] = w.Uid
			}
		}
	}
	for svc := range w.Services {
		if s.endpoints[svc] == nil {
			s.endpoints[svc] = map[string]struct{}{}
		}
		s.endpoints[svc][w.Uid] = struct{}{}
	}
}

func (s *State) unindexWorkload(w *workloadapi.Workload) {
	for _, a := range w.Addresses {
		if ip, ok := netip.AddrFromSlice(a); ok && s.wlByAddr[ip.Unmap()] == w.Uid {
			delete(s.wlByAddr, ip.Unmap())
		}
	}
	for svc := range w.Services {
		delete(s.endpoints[svc], w.Uid)
		if len(s.endpoints[svc]) == 0 {
			delete(s.endpoints, svc)
		}
	}
}

// WorkloadByUID returns the workload with this uid, or nil.
func (s *State) WorkloadByUID(uid string) *workloadapi.Workload {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.workloads[uid]
}

// WorkloadByAddr returns the workload owning ip, or nil. Host-network
// workloads are never returned: their address is shared.
func (s *State) WorkloadByAddr(ip netip.Addr) *workloadapi.Workload {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.workloads[s.wlByAddr[ip.Unmap()]]
}

// ServiceByVIP returns the service reachable at ip, or nil.
func (s *State) ServiceByVIP(ip netip.Addr) *workloadapi.Service {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.services[s.svcByVIP[ip.Unmap()]]
}

// ServiceByKey returns the service named "<namespace>/<hostname>", or nil.
func (s *State) ServiceByKey(key string) *workloadapi.Service {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.services[key]
}

// ServicesByHostname returns the services with this hostname (a
// ServiceEntry host may be declared in several namespaces), sorted by key.
func (s *State) ServicesByHostname(host string) []*workloadapi.Service {
	s.mu.RLock()
	defer s.mu.RUnlock()
	keys := make([]string, 0, len(s.svcByHost[host]))
	for k := range s.svcByHost[host] {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	out := make([]*workloadapi.Service, 0, len(keys))
	for _, k := range keys {
		out = append(out, s.services[k])
	}
	return out
}

// Endpoints returns the workloads backing the service key, sorted by uid.
func (s *State) Endpoints(serviceKey string) []*workloadapi.Workload {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]*workloadapi.Workload, 0, len(s.endpoints[serviceKey]))
	for uid := range s.endpoints[serviceKey] {
		out = append(out, s.workloads[uid])
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Uid < out[j].Uid })
	return out
}

// PoliciesFor returns the policies that apply to w: global ones, those of its
// namespace, and the selector policies it names. Sorted by resource name.
func (s *State) PoliciesFor(w *workloadapi.Workload) []*security.Authorization {
	s.mu.RLock()
	defer s.mu.RUnlock()
	var out []*security.Authorization
	for _, p := range s.policies {
		switch p.Scope {
		case security.Scope_GLOBAL:
			out = append(out, p)
		case security.Scope_NAMESPACE:
			if p.Namespace == w.Namespace {
				out = append(out, p)
			}
		}
	}
	for _, name := range w.AuthorizationPolicies {
		if p := s.policies[name]; p != nil && p.Scope == security.Scope_WORKLOAD_SELECTOR {
			out = append(out, p)
		}
	}
	sort.Slice(out, func(i, j int) bool {
		return PolicyKey(out[i].Namespace, out[i].Name) < PolicyKey(out[j].Namespace, out[j].Name)
	})
	return out
}

// Policy returns the policy named "<namespace>/<name>", or nil.
func (s *State) Policy(key string) *security.Authorization {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.policies[key]
}

// Workloads returns every workload, sorted by uid.
func (s *State) Workloads() []*workloadapi.Workload {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]*workloadapi.Workload, 0, len(s.workloads))
	for _, w := range s.workloads {
		out = append(out, w)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Uid < out[j].Uid })
	return out
}

// Services returns every service, sorted by key.
func (s *State) Services() []*workloadapi.Service {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]*workloadapi.Service, 0, len(s.services))
	for _, svc := range s.services {
		out = append(out, svc)
	}
	sort.Slice(out, func(i, j int) bool {
		return ServiceKey(out[i].Namespace, out[i].Hostname) < ServiceKey(out[j].Namespace, out[j].Hostname)
	})
	return out
}

// Policies returns every authorization policy, sorted by key.
func (s *State) Policies() []*security.Authorization {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]*security.Authorization, 0, len(s.policies))
	for _, p := range s.policies {
		out = append(out, p)
	}
	sort.Slice(out, func(i, j int) bool {
		return PolicyKey(out[i].Namespace, out[i].Name) < PolicyKey(out[j].Namespace, out[j].Name)
	})
	return out
}

// L7Resources returns every L7 resource, sorted by name.
func (s *State) L7Resources() []*meshapi.L7Resource {
	s.mu.RLock()
	defer s.mu.RUnlock()
	keys := make([]string, 0, len(s.l7))
	for k := range s.l7 {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	out := make([]*meshapi.L7Resource, 0, len(keys))
	for _, k := range keys {
		out = append(out, s.l7[k])
	}
	return out
}

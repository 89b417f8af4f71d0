package discovery

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"sync"

	cachetypes "github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	xds "github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
)

// AddressCache serves the Address type per proxy. A wildcard subscriber
// (Istio's ztunnel without on-demand, waypoints, tools) receives every
// workload and service, as a LinearCache would serve it. A ztunnel that
// subscribes to xds.NodeScopeName instead receives only:
//
//   - every service (cheap, and the DNS proxy answers from them),
//   - the workloads on its own node (the node is the authenticated pod's
//     spec.nodeName, never what the client claims),
//   - the workloads behind waypoints (every ztunnel may have to send there),
//   - what it subscribed to by name: a workload uid, a service key (which
//     brings that service's endpoints, as istiod's on-demand does for a
//     VIP), or an address alias "<network>/<ip>" (the workload or service
//     owning that address).
//
// Each resource carries its aliases, so a client that asked for an address
// A sidecar subscribed to xds.NodeScopeName receives the same minus the
// node's workloads: every service (Istio's default Sidecar scope), its own
// pod's workload (from the authenticated caller), the workloads behind
// waypoints, and what it looks up (the endpoints of the services it calls,
// its callers' addresses).
//
// that no resource owns is returned in removed_resources, so the client
// stops waiting and knows the address is outside the mesh.
type AddressCache struct {
	mu        sync.Mutex
	seq       uint64
	entries   map[string]*addrEntry
	services  map[string]struct{}            // the entries that are services
	byAlias   map[string]string              // "<network>/<ip>" -> resource name
	byNode    map[string]map[string]struct{} // node -> workload uids
	endpoints map[string]map[string]struct{} // service key -> workload uids
	gwRefs    map[string]int                 // waypoint references: service key or alias -> count
	watches   watchSet[*addrWatch]
}

type addrEntry struct {
	res      *anypb.Any
	version  string
	aliases  []string
	node     string
	services []string // a workload's service keys
	gws      []string // waypoint references (service key or alias)
	service  bool
}

// watchScope is who a watch serves: a node-scoped ztunnel (node), a
// sidecar (pod: its own workload's uid), or everything.
type watchScope struct {
	node, pod string
	scoped    bool
}

type addrWatch struct {
	req   *cachev3.DeltaRequest
	sub   cachev3.Subscription
	scope watchScope
	out   chan cachev3.DeltaResponse
}

// NewAddressCache returns an empty cache.
func NewAddressCache() *AddressCache {
	c := &AddressCache{
		entries: map[string]*addrEntry{}, services: map[string]struct{}{}, byAlias: map[string]string{}, byNode: map[string]map[string]struct{}{},
		endpoints: map[string]map[string]struct{}{}, gwRefs: map[string]int{},
	}
	c.watches = newWatchSet(&c.mu, c.respond)
	return c
}

func gatewayRef(g *workloadapi.GatewayAddress) string {
	switch d := g.GetDestination().(type) {
	case *workloadapi.GatewayAddress_Hostname:
		return xds.ServiceKey(d.Hostname.GetNamespace(), d.Hostname.GetHostname())
	case *workloadapi.GatewayAddress_Address:
		if ip, ok := netip.AddrFromSlice(d.Address.GetAddress()); ok {
			return xds.AddressAlias(d.Address.GetNetwork(), ip)
		}
	}
	return ""
}

// newEntry indexes addr. Its version is a hash of its content, as the
// LinearCache's: a proxy reconnecting to a restarted control plane or to
// another replica with the versions it holds is sent only what changed
// (an instance's update counter would differ and resend everything).
func newEntry(addr *workloadapi.Address) (*addrEntry, error) {
	b, err := encode.Marshal(addr)
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256(b)
	e := &addrEntry{res: &anypb.Any{TypeUrl: xds.AddressType, Value: b}, version: hex.EncodeToString(sum[:8])}
	var gws []*workloadapi.GatewayAddress
	if w := addr.GetWorkload(); w != nil {
		for _, b := range w.GetAddresses() {
			if ip, ok := netip.AddrFromSlice(b); ok && w.GetNetworkMode() == workloadapi.NetworkMode_STANDARD {
				e.aliases = append(e.aliases, xds.AddressAlias(w.GetNetwork(), ip))
			}
		}
		e.node = w.GetNode()
		for key := range w.GetServices() {
			e.services = append(e.services, key)
		}
		gws = append(gws, w.GetWaypoint())
	} else if s := addr.GetService(); s != nil {
		e.service = true
		for _, a := range s.GetAddresses() {
			if ip, ok := netip.AddrFromSlice(a.GetAddress()); ok {
				e.aliases = append(e.aliases, xds.AddressAlias(a.GetNetwork(), ip))
			}
		}
		gws = append(gws, s.GetWaypoint())
	} else {
		return nil, errors.New("address is neither workload nor service")
	}
	for _, g := range gws {
		if ref := gatewayRef(g); ref != "" {
			e.gws = append(e.gws, ref)
		}
	}
	return e, nil
}

// encode is how resources are stored and compared: deterministic, so
// equal messages encode equally.
var encode = proto.MarshalOptions{Deterministic: true}

// Holds reports whether the cache holds msg under name, unchanged.
func (c *AddressCache) Holds(name string, msg proto.Message) bool {
	b, err := encode.Marshal(msg)
	if err != nil {
		return false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.entries[name]
	return ok && bytes.Equal(e.res.GetValue(), b)
}

// Message decodes the resource held under name (nil if none).
func (c *AddressCache) Message(name string) proto.Message {
	c.mu.Lock()
	e, ok := c.entries[name]
	c.mu.Unlock()
	if !ok {
		return nil
	}
	var a workloadapi.Address
	if err := proto.Unmarshal(e.res.GetValue(), &a); err != nil {
		return nil
	}
	return &a
}

// UpdateResources replaces and removes resources, then answers the open
// watches that see a difference.
func (c *AddressCache) UpdateResources(update map[string]cachetypes.Resource, remove []string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	var errs []error
	for _, name := range remove {
		c.unindex(name)
	}
	for name, r := range update {
		addr, ok := r.(*workloadapi.Address)
		if !ok {
			errs = append(errs, fmt.Errorf("%s: %T is not an Address", name, r))
			continue
		}
		c.seq++
		e, err := newEntry(addr)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", name, err))
			continue
		}
		c.unindex(name)
		c.index(name, e)
	}
	c.watches.answer()
	return errors.Join(errs...)
}

func addTo(m map[string]map[string]struct{}, k, v string) {
	if m[k] == nil {
		m[k] = map[string]struct{}{}
	}
	m[k][v] = struct{}{}
}

func delFrom(m map[string]map[string]struct{}, k, v string) {
	delete(m[k], v)
	if len(m[k]) == 0 {
		delete(m, k)
	}
}

func (c *AddressCache) index(name string, e *addrEntry) {
	c.entries[name] = e
	if e.service {
		c.services[name] = struct{}{}
	}
	for _, a := range e.aliases {
		c.byAlias[a] = name
	}
	if e.node != "" {
		addTo(c.byNode, e.node, name)
	}
	for _, s := range e.services {
		addTo(c.endpoints, s, name)
	}
	for _, g := range e.gws {
		c.gwRefs[g]++
	}
}

func (c *AddressCache) unindex(name string) {
	e, ok := c.entries[name]
	if !ok {
		return
	}
	delete(c.entries, name)
	delete(c.services, name)
	for _, a := range e.aliases {
		if c.byAlias[a] == name {
			delete(c.byAlias, a)
		}
	}
	if e.node != "" {
		delFrom(c.byNode, e.node, name)
	}
	for _, s := range e.services {
		delFrom(c.endpoints, s, name)
	}
	for _, g := range e.gws {
		if c.gwRefs[g]--; c.gwRefs[g] <= 0 {
			delete(c.gwRefs, g)
		}
	}
}

// resolve maps a subscribed name (resource name or alias) to a resource name.
func (c *AddressCache) resolve(name string) (string, bool) {
	if _, ok := c.entries[name]; ok {
		return name, true
	}
	n, ok := c.byAlias[name]
	return n, ok
}

// addService adds a service and its endpoints to set.
func (c *AddressCache) addService(set map[string]struct{}, key string) {
	set[key] = struct{}{}
	for uid := range c.endpoints[key] {
		set[uid] = struct{}{}
	}
}

// desired is the set of resource names w should hold now.
func (c *AddressCache) desired(w *addrWatch) map[string]struct{} {
	if !w.scope.scoped || w.sub.IsWildcard() {
		out := make(map[string]struct{}, len(c.entries))
		for name := range c.entries {
			out[name] = struct{}{}
		}
		return out
	}
	out := map[string]struct{}{}
	subs := w.sub.SubscribedResources()
	if _, ok := subs[xds.NodeScopeName]; ok {
		// The services index, not every entry: this runs for each open
		// watch on every update.
		for name := range c.services {
			out[name] = struct{}{}
		}
		if w.scope.node != "" {
			for uid := range c.byNode[w.scope.node] {
				out[uid] = struct{}{}
			}
		}
		if _, ok := c.entries[w.scope.pod]; ok && w.scope.pod != "" {
			out[w.scope.pod] = struct{}{}
		}
		for ref := range c.gwRefs {
			if name, ok := c.resolve(ref); ok {
				if c.entries[name].service {
					c.addService(out, name)
				} else {
					out[name] = struct{}{}
				}
			}
		}
	}
	// What it was given stays while it exists, as istiod merges resolved
	// names into the subscription: a workload found by address keeps
	// coming when its address changes.
	for name := range w.sub.ReturnedResources() {
		if _, ok := c.entries[name]; ok {
			out[name] = struct{}{}
		}
	}
	for sub := range subs {
		name, ok := c.resolve(sub)
		if !ok {
			continue
		}
		if c.entries[name].service {
			c.addService(out, name)
		} else {
			out[name] = struct{}{}
		}
	}
	return out
}

// respond builds w's response, or nil when it has nothing to say. force
// answers even an empty diff (the first request of a stream).
func (c *AddressCache) respond(w *addrWatch, force bool) cachev3.DeltaResponse {
	// What this request asks for is sent even when the client holds it,
	// so the client sees its question answered (as istiod does).
	asked := map[string]struct{}{}
	for _, n := range w.req.GetResourceNamesSubscribe() {
		if name, ok := c.resolve(n); ok {
			asked[name] = struct{}{}
		}
	}
	resp, next := deltaResponse(xds.AddressType, c.seq, c.desired(w), w.sub.ReturnedResources(), func(name string) (*anypb.Any, string, []string) {
		e := c.entries[name]
		return e.res, e.version, e.aliases
	}, asked)
	// Names this request asked for that nothing answers: say so, so the
	// client stops waiting (Istio's on-demand does the same).
	for _, name := range w.req.GetResourceNamesSubscribe() {
		if _, ok := c.resolve(name); !ok && name != xds.NodeScopeName && name != "*" {
			resp.RemovedResources = append(resp.RemovedResources, name)
			force = true
		}
	}
	if !force && len(resp.Resources)+len(resp.RemovedResources) == 0 {
		return nil
	}
	return &cachev3.DeltaPassthroughResponse{DeltaRequest: w.req, NextVersionMap: next, DeltaDiscoveryResponse: resp}
}

// CreateDeltaWatch answers at once when the proxy lacks something (or this
// is its first request, or it asked for names), else on the next change.
func (c *AddressCache) CreateDeltaWatch(req *cachev3.DeltaRequest, sub cachev3.Subscription, out chan cachev3.DeltaResponse) (func(), error) {
	if req.GetTypeUrl() != xds.AddressType {
		return nil, fmt.Errorf("address cache cannot serve %q", req.GetTypeUrl())
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.watches.watch(&addrWatch{req: req, sub: sub, scope: scopeOfNode(req), out: out}), nil
}

// CreateWatch: Address is served over delta xDS only.
func (c *AddressCache) CreateWatch(*cachev3.Request, cachev3.Subscription, chan cachev3.Response) (func(), error) {
	return nil, errors.New("addresses are served over delta xDS only")
}

// Fetch: Address is served over delta xDS only.
func (c *AddressCache) Fetch(context.Context, *cachev3.Request) (cachev3.Response, error) {
	return nil, errors.New("addresses are served over delta xDS only")
}

// Scope keys the discovery server writes into each request's node (the
// authenticated caller, not what the client sent).
const (
	scopeRoleKey = "ambient.scope.role"
	scopeNodeKey = "ambient.scope.node"
	scopePodKey  = "ambient.scope.pod"
	// scopeNamespaceKey: a sidecar's pod's namespace (SidecarScopedCache).
	scopeNamespaceKey = "ambient.scope.namespace"
)

func scopeOfNode(req *cachev3.DeltaRequest) watchScope {
	md := req.GetNode().GetMetadata().GetFields()
	switch md[scopeRoleKey].GetStringValue() {
	case xds.RoleZtunnel:
		return watchScope{node: md[scopeNodeKey].GetStringValue(), scoped: true}
	case xds.RoleSidecar:
		return watchScope{pod: md[scopePodKey].GetStringValue(), scoped: true}
	}
	return watchScope{}
}

package discovery

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"sync"

	discoverypb "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	cachetypes "github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	xds "github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/meshapi"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi/security"
)

// SidecarScopedCache serves the authorization and L7 types. Every proxy
// but a sidecar receives them whole, from a LinearCache (a ztunnel serves
// any pod of its node, a waypoint any pod behind it). A sidecar serves one
// pod and receives only what can apply to it, as istiod scopes an Envoy
// sidecar (policies of the proxy's namespace and of the root namespace;
// routes exported to the proxy's namespace):
//
//   - authorization policies (L4 and L7) of its own namespace and of the
//     root namespace: a policy selects or targets only its own namespace's
//     workloads and services, except the root namespace's, which apply
//     mesh-wide; so every policy that can apply to the pod is sent;
//   - routes with a Service parent (GAMMA): a producer route (in the
//     Service's namespace) to every sidecar, since any pod may call any
//     Service; a consumer route (for a Service elsewhere) only to the
//     sidecars of the route's namespace, the only clients it applies to;
//   - never what only ingress gateways use (Gateways, ReferenceGrants,
//     TLS and TCP routes, routes attached to Gateways only);
//   - the Mesh settings, and any kind not named here (fail safe: sent).
//
// Which namespace a sidecar is in comes from its authenticated pod.
type SidecarScopedCache struct {
	all     *cachev3.LinearCache
	typeURL string
	mu      sync.Mutex
	seq     uint64
	root    string
	entries map[string]*scopedEntry
	watches watchSet[*scopedWatch]
}

type scopedEntry struct {
	res     *anypb.Any
	version string
	aud     audience
}

// audience is which sidecars need a resource.
type audience struct {
	everyone bool
	// namespaces whose sidecars need it; rootWide: everyone's when one of
	// them is the root namespace (a policy's namespace).
	namespaces []string
	rootWide   bool
}

func (a audience) includes(ns, root string) bool {
	return a.everyone || slices.Contains(a.namespaces, ns) || (a.rootWide && root != "" && slices.Contains(a.namespaces, root))
}

type scopedWatch struct {
	req *cachev3.DeltaRequest
	sub cachev3.Subscription
	ns  string
	out chan cachev3.DeltaResponse
}

// NewSidecarScopedCache returns an empty cache of typeURL (the
// authorization or the L7 type).
func NewSidecarScopedCache(typeURL string) *SidecarScopedCache {
	c := &SidecarScopedCache{all: cachev3.NewLinearCache(typeURL), typeURL: typeURL, entries: map[string]*scopedEntry{}}
	c.watches = newWatchSet(&c.mu, c.respond)
	return c
}

// audienceOf decides who among the sidecars needs m.
func audienceOf(m proto.Message) audience {
	switch r := m.(type) {
	case *security.Authorization:
		return audience{namespaces: []string{r.GetNamespace()}, rootWide: true}
	case *meshapi.L7Resource:
		return l7Audience(r)
	}
	return audience{everyone: true}
}

func l7Audience(r *meshapi.L7Resource) audience {
	switch r.GetKind() {
	case "AuthorizationPolicy":
		return audience{namespaces: []string{r.GetNamespace()}, rootWide: true}
	case "HTTPRoute", "GRPCRoute":
		return routeAudience(r)
	case "Gateway", "ReferenceGrant", "TLSRoute", "TCPRoute", xds.IngressUseWaypointKind:
		// Ingress gateways' only: a sidecar's engine ignores them.
		return audience{}
	}
	return audience{everyone: true}
}

// routeAudience: the sidecars a GAMMA route can apply to (see
// proxylib/route: a consumer route applies only to clients of its own
// namespace).
func routeAudience(r *meshapi.L7Resource) audience {
	var obj struct {
		Spec struct {
			ParentRefs []struct {
				Group     *string `json:"group"`
				Kind      *string `json:"kind"`
				Namespace *string `json:"namespace"`
			} `json:"parentRefs"`
		} `json:"spec"`
	}
	if err := json.Unmarshal(r.GetJson(), &obj); err != nil {
		return audience{everyone: true} // the engine reports it; never drop what might apply
	}
	var a audience
	for _, p := range obj.Spec.ParentRefs {
		if p.Kind == nil || *p.Kind != "Service" || (p.Group != nil && *p.Group != "" && *p.Group != "core") {
			continue
		}
		if p.Namespace == nil || *p.Namespace == "" || *p.Namespace == r.GetNamespace() {
			return audience{everyone: true} // a producer route
		}
		a.namespaces = []string{r.GetNamespace()} // a consumer route
	}
	return a
}

// SetRootNamespace sets the mesh root namespace, whose policies every
// sidecar receives.
func (c *SidecarScopedCache) SetRootNamespace(ns string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.root == ns {
		return
	}
	c.root = ns
	c.seq++
	c.watches.answer()
}

// UpdateResources replaces and removes resources for every proxy.
func (c *SidecarScopedCache) UpdateResources(update map[string]cachetypes.Resource, remove []string) error {
	errAll := c.all.UpdateResources(update, remove)
	c.mu.Lock()
	defer c.mu.Unlock()
	var errs []error
	for _, name := range remove {
		delete(c.entries, name)
	}
	for name, r := range update {
		b, err := encode.Marshal(r)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", name, err))
			continue
		}
		sum := sha256.Sum256(b)
		c.entries[name] = &scopedEntry{res: &anypb.Any{TypeUrl: c.typeURL, Value: b}, version: hex.EncodeToString(sum[:8]), aud: audienceOf(r)}
	}
	c.seq++
	c.watches.answer()
	return errors.Join(append(errs, errAll)...)
}

func (c *SidecarScopedCache) respond(w *scopedWatch, force bool) cachev3.DeltaResponse {
	subs := w.sub.SubscribedResources()
	want := map[string]struct{}{}
	for name, e := range c.entries {
		if _, named := subs[name]; (w.sub.IsWildcard() || named) && e.aud.includes(w.ns, c.root) {
			want[name] = struct{}{}
		}
	}
	resp, next := deltaResponse(c.typeURL, c.seq, want, w.sub.ReturnedResources(), func(name string) (*anypb.Any, string, []string) {
		e := c.entries[name]
		return e.res, e.version, nil
	}, nil)
	if !force && len(resp.Resources)+len(resp.RemovedResources) == 0 {
		return nil
	}
	return &cachev3.DeltaPassthroughResponse{DeltaRequest: w.req, NextVersionMap: next, DeltaDiscoveryResponse: resp}
}

// CreateDeltaWatch serves a sidecar its scope, anyone else everything.
func (c *SidecarScopedCache) CreateDeltaWatch(req *cachev3.DeltaRequest, sub cachev3.Subscription, out chan cachev3.DeltaResponse) (func(), error) {
	if req.GetTypeUrl() != c.typeURL {
		return nil, fmt.Errorf("%s cache cannot serve %q", c.typeURL, req.GetTypeUrl())
	}
	md := req.GetNode().GetMetadata().GetFields()
	if md[scopeRoleKey].GetStringValue() != xds.RoleSidecar {
		return c.all.CreateDeltaWatch(req, sub, out)
	}
	ns := md[scopeNamespaceKey].GetStringValue()
	if ns == "" {
		return nil, errors.New("sidecar stream without its pod's namespace")
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.watches.watch(&scopedWatch{req: req, sub: sub, ns: ns, out: out}), nil
}

// CreateWatch serves state-of-the-world streams whole (proxies use delta;
// this is for tools).
func (c *SidecarScopedCache) CreateWatch(req *cachev3.Request, sub cachev3.Subscription, out chan cachev3.Response) (func(), error) {
	return c.all.CreateWatch(req, sub, out)
}

// Fetch serves a one-off fetch whole.
func (c *SidecarScopedCache) Fetch(ctx context.Context, req *cachev3.Request) (cachev3.Response, error) {
	return c.all.Fetch(ctx, req)
}

// deltaResponse is the delta that brings a client holding have (name ->
// version) to want: the resources it lacks or holds at another version
// (and those in resend, sent anyway), and the removal of what it holds
// beyond want. It returns the versions the client holds after it.
func deltaResponse(typeURL string, seq uint64, want map[string]struct{}, have map[string]string,
	entry func(name string) (res *anypb.Any, version string, aliases []string), resend map[string]struct{}) (*discoverypb.DeltaDiscoveryResponse, map[string]string) {
	next := make(map[string]string, len(want))
	resp := &discoverypb.DeltaDiscoveryResponse{TypeUrl: typeURL, SystemVersionInfo: strconv.FormatUint(seq, 10)}
	for name := range want {
		res, version, aliases := entry(name)
		next[name] = version
		if _, ok := resend[name]; ok || have[name] != version {
			resp.Resources = append(resp.Resources, &discoverypb.Resource{Name: name, Version: version, Aliases: aliases, Resource: res})
		}
	}
	for name := range have {
		if _, ok := want[name]; !ok {
			resp.RemovedResources = append(resp.RemovedResources, name)
		}
	}
	return resp, next
}

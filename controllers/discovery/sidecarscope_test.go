package discovery

import (
	"sort"
	"testing"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoverypb "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	cachetypes "github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/stream/v3"
	"google.golang.org/protobuf/types/known/structpb"

	xds "github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/meshapi"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi/security"
)

func l7Res(kind, ns, name, js string) *meshapi.L7Resource {
	return &meshapi.L7Resource{Group: "g", Kind: kind, Namespace: ns, Name: name, Json: []byte(js)}
}

// openScopedWatch opens a wildcard watch of typeURL as the server scopes
// the stream of role (a sidecar's in namespace ns); with have, as an ACK
// of a client holding those versions (answered on change only).
func openScopedWatch(t *testing.T, c *SidecarScopedCache, typeURL, role, ns string, have map[string]string) (chan cachev3.DeltaResponse, func()) {
	t.Helper()
	md, _ := structpb.NewStruct(map[string]any{scopeRoleKey: role, scopeNamespaceKey: ns})
	req := &discoverypb.DeltaDiscoveryRequest{TypeUrl: typeURL, Node: &core.Node{Metadata: md}}
	if have != nil {
		req.ResponseNonce = "1" // an ACK: answered on change only
	}
	sub := stream.NewDeltaSubscription(nil, nil, have, true)
	out := make(chan cachev3.DeltaResponse, 1)
	cancel, err := c.CreateDeltaWatch(req, &sub, out)
	if err != nil {
		t.Fatal(err)
	}
	if cancel == nil {
		cancel = func() {}
	}
	return out, cancel
}

func names(t *testing.T, r cachev3.DeltaResponse) (got, removed []string) {
	t.Helper()
	resp, err := r.GetDeltaDiscoveryResponse()
	if err != nil {
		t.Fatal(err)
	}
	for _, x := range resp.Resources {
		got = append(got, x.Name)
	}
	sort.Strings(got)
	removed = append(removed, resp.RemovedResources...)
	sort.Strings(removed)
	return got, removed
}

// TestSidecarScopedCache: what a sidecar of each namespace receives of
// each kind of resource, and that everyone else receives everything.
func TestSidecarScopedCache(t *testing.T) {
	const root = "mesh-root"
	svc := func(ns string) string {
		return `{"spec":{"parentRefs":[{"kind":"Service","group":"","name":"api","namespace":"` + ns + `"}]}}`
	}
	l7 := NewSidecarScopedCache(xds.L7ResourceType)
	l7.SetRootNamespace(root)
	if err := l7.UpdateResources(map[string]cachetypes.Resource{
		"ap-own":     l7Res("AuthorizationPolicy", "own", "ap", `{}`),
		"ap-root":    l7Res("AuthorizationPolicy", root, "ap", `{}`),
		"ap-other":   l7Res("AuthorizationPolicy", "other", "ap", `{}`),
		"producer":   l7Res("HTTPRoute", "svc", "api", svc("svc")),
		"producer-2": l7Res("GRPCRoute", "svc", "api", `{"spec":{"parentRefs":[{"kind":"Service","name":"api"}]}}`),
		"consumer":   l7Res("HTTPRoute", "own", "mine", svc("svc")),
		"theirs":     l7Res("HTTPRoute", "other", "theirs", svc("svc")),
		"ingress":    l7Res("HTTPRoute", "svc", "edge", `{"spec":{"parentRefs":[{"name":"gw"}]}}`),
		"mixed":      l7Res("HTTPRoute", "svc", "both", `{"spec":{"parentRefs":[{"name":"gw"},{"kind":"Service","name":"api"}]}}`),
		"bad-json":   l7Res("HTTPRoute", "other", "bad", `{`),
		"gateway":    l7Res("Gateway", "svc", "gw", `{}`),
		"grant":      l7Res("ReferenceGrant", "svc", "g", `{}`),
		"tls":        l7Res("TLSRoute", "svc", "t", svc("svc")),
		"tcp":        l7Res("TCPRoute", "svc", "t", svc("svc")),
		"mesh":       l7Res(xds.MeshKind, root, "mesh", `{"rootNamespace":"`+root+`"}`),
		"iuw":        l7Res(xds.IngressUseWaypointKind, "own", "api", `{}`),
		"future":     l7Res("SomethingNew", "other", "x", `{}`),
	}, nil); err != nil {
		t.Fatal(err)
	}
	authz := NewSidecarScopedCache(xds.AuthorizationType)
	authz.SetRootNamespace(root)
	if err := authz.UpdateResources(map[string]cachetypes.Resource{
		"own/p":        &security.Authorization{Name: "p", Namespace: "own", Scope: security.Scope_NAMESPACE},
		"own/sel":      &security.Authorization{Name: "sel", Namespace: "own", Scope: security.Scope_WORKLOAD_SELECTOR},
		root + "/g":    &security.Authorization{Name: "g", Namespace: root, Scope: security.Scope_GLOBAL},
		root + "/sel":  &security.Authorization{Name: "sel", Namespace: root, Scope: security.Scope_WORKLOAD_SELECTOR},
		"other/p":      &security.Authorization{Name: "p", Namespace: "other", Scope: security.Scope_NAMESPACE},
		"other/sel-wl": &security.Authorization{Name: "sel-wl", Namespace: "other", Scope: security.Scope_WORKLOAD_SELECTOR},
	}, nil); err != nil {
		t.Fatal(err)
	}
	everyL7 := []string{"ap-other", "ap-own", "ap-root", "bad-json", "consumer", "future", "gateway", "grant", "ingress", "iuw", "mesh", "mixed", "producer", "producer-2", "tcp", "theirs", "tls"}
	tests := []struct {
		name     string
		cache    *SidecarScopedCache
		role, ns string
		want     []string
		typeURL  string
	}{
		{"sidecar's L7: its policies, the root's, producer and own consumer routes, mesh, unknown kinds, undecodable routes",
			l7, xds.RoleSidecar, "own", []string{"ap-own", "ap-root", "bad-json", "consumer", "future", "mesh", "mixed", "producer", "producer-2"}, xds.L7ResourceType},
		{"sidecar of the Service's namespace", l7, xds.RoleSidecar, "svc", []string{"ap-root", "bad-json", "future", "mesh", "mixed", "producer", "producer-2"}, xds.L7ResourceType},
		{"sidecar in the root namespace", l7, xds.RoleSidecar, root, []string{"ap-root", "bad-json", "future", "mesh", "mixed", "producer", "producer-2"}, xds.L7ResourceType},
		{"waypoint: everything", l7, xds.RoleWaypoint, "", everyL7, xds.L7ResourceType},
		{"sidecar's authorizations", authz, xds.RoleSidecar, "own", []string{"mesh-root/g", "mesh-root/sel", "own/p", "own/sel"}, xds.AuthorizationType},
		{"ztunnel: every authorization", authz, xds.RoleZtunnel, "", []string{"mesh-root/g", "mesh-root/sel", "other/p", "other/sel-wl", "own/p", "own/sel"}, xds.AuthorizationType},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			out, cancel := openScopedWatch(t, tc.cache, tc.typeURL, tc.role, tc.ns, nil)
			defer cancel()
			got, _ := names(t, <-out)
			if !equal(got, tc.want) {
				t.Errorf("resources %v\nwant %v", got, tc.want)
			}
		})
	}

	t.Run("a sidecar stream without its namespace is refused", func(t *testing.T) {
		md, _ := structpb.NewStruct(map[string]any{scopeRoleKey: xds.RoleSidecar})
		sub := stream.NewDeltaSubscription(nil, nil, nil, true)
		if _, err := authz.CreateDeltaWatch(&discoverypb.DeltaDiscoveryRequest{TypeUrl: xds.AuthorizationType, Node: &core.Node{Metadata: md}},
			&sub, make(chan cachev3.DeltaResponse, 1)); err == nil {
			t.Fatal("served a sidecar of no namespace")
		}
	})

	t.Run("changes reach only the sidecars they concern; a root change moves the root's policies", func(t *testing.T) {
		have := func(c *SidecarScopedCache, names ...string) map[string]string {
			m := map[string]string{}
			for _, n := range names {
				m[n] = c.entries[n].version
			}
			return m
		}
		own, cancelOwn := openScopedWatch(t, authz, xds.AuthorizationType, xds.RoleSidecar, "own", have(authz, "mesh-root/g", "mesh-root/sel", "own/p", "own/sel"))
		defer cancelOwn()
		other, cancelOther := openScopedWatch(t, authz, xds.AuthorizationType, xds.RoleSidecar, "other", have(authz, "mesh-root/g", "mesh-root/sel", "other/p", "other/sel-wl"))
		defer cancelOther()
		if len(own)+len(other) != 0 {
			t.Fatal("an up-to-date watch was answered")
		}
		if err := authz.UpdateResources(map[string]cachetypes.Resource{
			"other/p": &security.Authorization{Name: "p", Namespace: "other", Scope: security.Scope_NAMESPACE, Action: security.Action_DENY}}, nil); err != nil {
			t.Fatal(err)
		}
		if len(own) != 0 {
			t.Error("another namespace's policy change answered the sidecar of own")
		}
		if got, _ := names(t, <-other); !equal(got, []string{"other/p"}) {
			t.Errorf("other's sidecar got %v", got)
		}
		authz.SetRootNamespace("own")
		got, removed := names(t, <-own)
		if len(got) != 0 || !equal(removed, []string{"mesh-root/g", "mesh-root/sel"}) {
			t.Errorf("after the root moved to own: got %v, removed %v", got, removed)
		}
	})
}

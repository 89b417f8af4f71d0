package waypoint

import (
	"encoding/json"
	"slices"
	"strings"

	"k8s.io/apimachinery/pkg/api/equality"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/ambientmesh/ambient/proxylib/authz"
	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/route"
)

// l7Config is the decoded L7 configuration, swapped atomically on change.
type l7Config struct {
	// changed is closed when this configuration is replaced, so long-lived
	// TCP tunnels re-check their policy (reliability case 20).
	changed chan struct{}
	routes  *route.Table
	gateway *gwv1.Gateway // ingress mode: the Gateway served
	// grants are the ReferenceGrants (ingress mode): cross-namespace
	// backendRefs and certificateRefs they permit are served.
	grants   *route.Grants
	grantSet []route.Grant
	policies []*authz.Policy
	// broken holds namespaces with an AuthorizationPolicy we could not
	// decode: requests to them are denied (fail closed), since the policy
	// might have forbidden them.
	broken map[string]string
	// root is the mesh root namespace: the control plane's (its Mesh
	// resource) when it sends one, else Config.RootNamespace; "" fails
	// every policy check closed (mesh-wide policies could not be told).
	root string
	// ingressWaypoint (ingress mode): the Services, "<ns>/<name>", the
	// gateway reaches through their waypoint; any other goes straight to
	// its endpoints (Istio's istio.io/ingress-use-waypoint).
	ingressWaypoint map[string]bool
}

// rebuild decodes every L7Resource from discovery.
func (s *Server) rebuild() {
	cfg := &l7Config{broken: map[string]string{}, changed: make(chan struct{}), root: s.cfg.RootNamespace}
	var httpRoutes []*gwv1.HTTPRoute
	var grpcRoutes []*gwv1.GRPCRoute
	var l4 route.L4Routes
	for _, r := range s.cfg.State.L7Resources() {
		switch r.Kind {
		case "TLSRoute", "TCPRoute":
			if !s.cfg.Ingress {
				continue // waypoints serve TCP opaquely (no L4 routes yet)
			}
			if err := decodeL4Route(r.Kind, r.Namespace, r.Name, r.Json, &l4); err != nil {
				s.log.Error(err, "decoding route: its listeners refuse what it would route", "kind", r.Kind, "namespace", r.Namespace, "name", r.Name)
			}
		case "HTTPRoute":
			var hr gwv1.HTTPRoute
			if err := json.Unmarshal(r.Json, &hr); err != nil {
				s.log.Error(err, "decoding HTTPRoute", "namespace", r.Namespace, "name", r.Name)
				continue
			}
			hr.Namespace, hr.Name = r.Namespace, r.Name
			httpRoutes = append(httpRoutes, &hr)
		case "GRPCRoute":
			var gr gwv1.GRPCRoute
			if err := json.Unmarshal(r.Json, &gr); err != nil {
				s.log.Error(err, "decoding GRPCRoute", "namespace", r.Namespace, "name", r.Name)
				continue
			}
			gr.Namespace, gr.Name = r.Namespace, r.Name
			grpcRoutes = append(grpcRoutes, &gr)
		case "Gateway":
			if !s.cfg.Ingress || r.Namespace != s.cfg.Namespace || r.Name != s.cfg.Name {
				continue
			}
			var gw gwv1.Gateway
			if err := json.Unmarshal(r.Json, &gw); err != nil {
				s.log.Error(err, "decoding Gateway: no listeners served", "namespace", r.Namespace, "name", r.Name)
				continue
			}
			gw.Namespace, gw.Name = r.Namespace, r.Name
			cfg.gateway = &gw
		case "ReferenceGrant":
			if !s.cfg.Ingress {
				continue // mesh routes need no grant (route.BackendPermitted)
			}
			var rg gwv1.ReferenceGrant
			if err := json.Unmarshal(r.Json, &rg); err != nil {
				s.log.Error(err, "decoding ReferenceGrant: references it would permit are refused", "namespace", r.Namespace, "name", r.Name)
				continue
			}
			cfg.grantSet = append(cfg.grantSet, route.Grant{Namespace: r.Namespace, Spec: rg.Spec})
		case discovery.IngressUseWaypointKind:
			if s.cfg.Ingress && r.Group == discovery.MeshGroup {
				if cfg.ingressWaypoint == nil {
					cfg.ingressWaypoint = map[string]bool{}
				}
				cfg.ingressWaypoint[r.Namespace+"/"+r.Name] = true
			}
		case discovery.MeshKind:
			m, err := discovery.DecodeMesh(r)
			if err != nil || r.Group != discovery.MeshGroup {
				s.log.Error(err, "decoding the mesh settings: refusing what policy decides", "group", r.Group)
				m.RootNamespace = ""
			}
			cfg.root = m.RootNamespace // "" when broken: fail closed
		case "AuthorizationPolicy":
			p, err := authz.Decode(r.Json)
			if err != nil {
				s.log.Error(err, "decoding AuthorizationPolicy: denying its namespace", "namespace", r.Namespace, "name", r.Name)
				cfg.broken[r.Namespace] = r.Namespace + "/" + r.Name
				continue
			}
			p.Namespace, p.Name = r.Namespace, r.Name
			cfg.policies = append(cfg.policies, p)
		}
	}
	var tbl *route.Table
	var errs []error
	if s.cfg.Ingress {
		slices.SortFunc(cfg.grantSet, func(a, b route.Grant) int { return strings.Compare(a.Namespace, b.Namespace) })
		cfg.grants = route.NewGrants(cfg.grantSet)
		if cfg.gateway != nil {
			tbl, errs = route.BuildGateway(cfg.gateway, cfg.grants, httpRoutes, grpcRoutes, l4)
		}
	} else {
		tbl, errs = route.Build(httpRoutes, grpcRoutes)
	}
	for _, err := range errs {
		s.log.Info("route problem (affected rules answer 500)", "err", err.Error())
	}
	cfg.routes = tbl
	old := s.l7.Swap(cfg)
	if old != nil {
		close(old.changed)
	}
	// Grants decide which certificates the listeners may use.
	if f := s.onGateway.Load(); f != nil && (old == nil || !equality.Semantic.DeepEqual(old.gateway, cfg.gateway) ||
		!equality.Semantic.DeepEqual(old.grantSet, cfg.grantSet)) {
		(*f)()
	}
}

// decodeL4Route adds a TLSRoute or TCPRoute to l4.
func decodeL4Route(kind, ns, name string, js []byte, l4 *route.L4Routes) error {
	if kind == "TLSRoute" {
		r := &gwv1.TLSRoute{}
		if err := json.Unmarshal(js, r); err != nil {
			return err
		}
		r.Namespace, r.Name = ns, name
		l4.TLS = append(l4.TLS, r)
		return nil
	}
	r := &gwv1.TCPRoute{}
	if err := json.Unmarshal(js, r); err != nil {
		return err
	}
	r.Namespace, r.Name = ns, name
	l4.TCP = append(l4.TCP, r)
	return nil
}

// brokenFor reports a namespace whose policies could not be decoded, or
// that the mesh root namespace is unknown (its policies apply everywhere).
func (c *l7Config) brokenFor(ns string) (string, bool) {
	if c.root == "" {
		return "mesh root namespace unknown", true
	}
	if p, ok := c.broken[ns]; ok {
		return p, true
	}
	p, ok := c.broken[c.root]
	return p, ok
}

package main

import (
	"context"
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/ambientmesh/ambient/controllers/waypointbind"
)

// gatewayList shows the ingress Gateways (class istio) with their address,
// state, listeners and the routes attached to them, as the operator
// reports them in status.
func gatewayList(ctx context.Context, k *kube, o options, out io.Writer) error {
	var gws gwv1.GatewayList
	var opts []client.ListOption
	if !o.allNamespaces {
		opts = append(opts, client.InNamespace(k.namespace))
	}
	if err := k.c.List(ctx, &gws, opts...); err != nil {
		return fmt.Errorf("listing Gateways (are the Gateway API CRDs installed?): %w", err)
	}
	routes, err := listGatewayRoutes(ctx, k.c)
	if err != nil {
		return err
	}
	// Ingress classes: istio and every other class naming the operator's
	// controllerName. Without permission to list classes, istio only.
	classes := map[string]*gwv1.GatewayClass{}
	var gcs gwv1.GatewayClassList
	if err := k.c.List(ctx, &gcs); err == nil {
		for i := range gcs.Items {
			classes[gcs.Items[i].Name] = &gcs.Items[i]
		}
	}
	var ingress []gwv1.Gateway
	for _, gw := range gws.Items {
		if class := string(gw.Spec.GatewayClassName); waypointbind.IngressClass(class, classes[class]) {
			ingress = append(ingress, gw)
		}
	}
	if len(ingress) == 0 {
		where := "namespace " + k.namespace
		if o.allNamespaces {
			where = "any namespace"
		}
		fmt.Fprintf(out, "no ingress gateways (class %s, or another class of controller %s) in %s\n", waypointbind.IngressGatewayClass, waypointbind.ControllerName, where)
		return nil
	}
	return writeGateways(out, ingress, routes)
}

// gatewayRoute is what the table needs of a route of any kind.
type gatewayRoute struct {
	kind      string
	namespace string
	name      string
	parents   []gwv1.ParentReference
	status    []gwv1.RouteParentStatus
}

// listGatewayRoutes reads the route kinds an ingress Gateway serves:
// HTTPRoute and GRPCRoute on HTTP/HTTPS listeners, TLSRoute (passthrough)
// and TCPRoute. A kind whose CRD is not installed has no routes; HTTPRoute
// is required.
func listGatewayRoutes(ctx context.Context, c client.Client) ([]gatewayRoute, error) {
	var hrs gwv1.HTTPRouteList
	if err := c.List(ctx, &hrs); err != nil {
		return nil, fmt.Errorf("listing HTTPRoutes: %w", err)
	}
	var out []gatewayRoute
	add := func(kind string, m metav1.ObjectMeta, parents []gwv1.ParentReference, status gwv1.RouteStatus) {
		out = append(out, gatewayRoute{kind: kind, namespace: m.Namespace, name: m.Name, parents: parents, status: status.Parents})
	}
	for _, r := range hrs.Items {
		add("HTTPRoute", r.ObjectMeta, r.Spec.ParentRefs, r.Status.RouteStatus)
	}
	optional := func(list client.ObjectList, kind string) error {
		if err := c.List(ctx, list); err != nil && !meta.IsNoMatchError(err) && !apierrors.IsNotFound(err) {
			return fmt.Errorf("listing %ss: %w", kind, err)
		}
		return nil
	}
	var grs gwv1.GRPCRouteList
	var tls gwv1.TLSRouteList
	var tcp gwv1.TCPRouteList
	for _, l := range []struct {
		list client.ObjectList
		kind string
	}{{&grs, "GRPCRoute"}, {&tls, "TLSRoute"}, {&tcp, "TCPRoute"}} {
		if err := optional(l.list, l.kind); err != nil {
			return nil, err
		}
	}
	for _, r := range grs.Items {
		add("GRPCRoute", r.ObjectMeta, r.Spec.ParentRefs, r.Status.RouteStatus)
	}
	for _, r := range tls.Items {
		add("TLSRoute", r.ObjectMeta, r.Spec.ParentRefs, r.Status.RouteStatus)
	}
	for _, r := range tcp.Items {
		add("TCPRoute", r.ObjectMeta, r.Spec.ParentRefs, r.Status.RouteStatus)
	}
	return out, nil
}

// writeGateways renders one line per Gateway: its address, Programmed, its
// listeners (name:port/protocol and attached routes) and the routes whose
// parent it is, each with its Accepted state (routes other than HTTPRoutes
// named with their kind, as TLSRoute:ns/name).
func writeGateways(out io.Writer, gws []gwv1.Gateway, routes []gatewayRoute) error {
	tw := tabwriter.NewWriter(out, 0, 0, 3, ' ', 0)
	fmt.Fprintln(tw, "NAMESPACE\tNAME\tADDRESS\tPROGRAMMED\tLISTENERS\tROUTES")
	for _, gw := range gws {
		addr := "<none>"
		if len(gw.Status.Addresses) > 0 {
			addr = gw.Status.Addresses[0].Value
		}
		programmed := "Unknown"
		if c := meta.FindStatusCondition(gw.Status.Conditions, string(gwv1.GatewayConditionProgrammed)); c != nil {
			programmed = string(c.Status)
			if c.Status != "True" {
				programmed += " (" + c.Reason + ")"
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", gw.Namespace, gw.Name, addr, programmed, listenerSummary(gw), routeSummary(gw, routes))
	}
	return tw.Flush()
}

func listenerSummary(gw gwv1.Gateway) string {
	attached := map[gwv1.SectionName]int32{}
	for _, ls := range gw.Status.Listeners {
		attached[ls.Name] = ls.AttachedRoutes
	}
	var parts []string
	for _, l := range gw.Spec.Listeners {
		parts = append(parts, fmt.Sprintf("%s:%d/%s(%d routes)", l.Name, l.Port, l.Protocol, attached[l.Name]))
	}
	return strings.Join(parts, ",")
}

// routeSummary names the routes with a parentRef to gw, each with its
// Accepted condition from any controller ("?" before one reports).
func routeSummary(gw gwv1.Gateway, routes []gatewayRoute) string {
	var parts []string
	for _, r := range routes {
		for _, p := range r.parents {
			ns := r.namespace
			if p.Namespace != nil {
				ns = string(*p.Namespace)
			}
			if ns != gw.Namespace || string(p.Name) != gw.Name || (p.Kind != nil && *p.Kind != "Gateway") {
				continue
			}
			state := "?"
			for _, ps := range r.status {
				if string(ps.ParentRef.Name) != gw.Name || (ps.ParentRef.Kind != nil && *ps.ParentRef.Kind != "Gateway") {
					continue
				}
				if c := meta.FindStatusCondition(ps.Conditions, string(gwv1.RouteConditionAccepted)); c != nil {
					state = c.Reason
				}
			}
			name := fmt.Sprintf("%s/%s(%s)", r.namespace, r.name, state)
			if r.kind != "HTTPRoute" {
				name = r.kind + ":" + name
			}
			parts = append(parts, name)
			break
		}
	}
	if len(parts) == 0 {
		return "<none>"
	}
	sort.Strings(parts)
	return strings.Join(parts, ",")
}

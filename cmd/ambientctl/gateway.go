package main

import (
	"context"
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"

	"k8s.io/apimachinery/pkg/api/meta"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/ambientmesh/ambient/controllers/waypointbind"
)

// gatewayList shows the ingress Gateways (class istio) with their address,
// state, listeners and the routes attached to them, as the operator
// reports them in status.
func gatewayList(ctx context.Context, k *kube, o options, out io.Writer) error {
	var gws gwv1.GatewayList
	var hrs gwv1.HTTPRouteList
	var opts []client.ListOption
	if !o.allNamespaces {
		opts = append(opts, client.InNamespace(k.namespace))
	}
	if err := k.c.List(ctx, &gws, opts...); err != nil {
		return fmt.Errorf("listing Gateways (are the Gateway API CRDs installed?): %w", err)
	}
	if err := k.c.List(ctx, &hrs); err != nil {
		return fmt.Errorf("listing HTTPRoutes: %w", err)
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
	return writeGateways(out, ingress, hrs.Items)
}

// writeGateways renders one line per Gateway: its address, Programmed, its
// listeners (name:port/protocol and attached routes) and the routes whose
// parent it is, each with its Accepted state.
func writeGateways(out io.Writer, gws []gwv1.Gateway, routes []gwv1.HTTPRoute) error {
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

// routeSummary names the HTTPRoutes with a parentRef to gw, each with its
// Accepted condition from any controller ("?" before one reports).
func routeSummary(gw gwv1.Gateway, routes []gwv1.HTTPRoute) string {
	var parts []string
	for _, r := range routes {
		for _, p := range r.Spec.ParentRefs {
			ns := r.Namespace
			if p.Namespace != nil {
				ns = string(*p.Namespace)
			}
			if ns != gw.Namespace || string(p.Name) != gw.Name || (p.Kind != nil && *p.Kind != "Gateway") {
				continue
			}
			state := "?"
			for _, ps := range r.Status.Parents {
				if string(ps.ParentRef.Name) != gw.Name {
					continue
				}
				if c := meta.FindStatusCondition(ps.Conditions, string(gwv1.RouteConditionAccepted)); c != nil {
					state = c.Reason
				}
			}
			parts = append(parts, fmt.Sprintf("%s/%s(%s)", r.Namespace, r.Name, state))
			break
		}
	}
	if len(parts) == 0 {
		return "<none>"
	}
	sort.Strings(parts)
	return strings.Join(parts, ",")
}

package route

import (
	"encoding/json"
	"slices"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
)

// ListenerNamespacesAnnotation carries, on the Gateway the control plane
// sends an ingress gateway, the namespaces each listener's allowedRoutes
// selector matches ({"<listener>": ["ns", ...]}): the gateway cannot see
// namespace labels, the control plane can.
const ListenerNamespacesAnnotation = "mesh.ambient.dev/listener-namespaces"

// UsesSelectors reports whether any listener selects route namespaces by
// label (its result depends on namespace labels).
func UsesSelectors(gw *gwv1.Gateway) bool {
	for _, l := range gw.Spec.Listeners {
		if l.AllowedRoutes != nil && l.AllowedRoutes.Namespaces != nil && l.AllowedRoutes.Namespaces.From != nil &&
			*l.AllowedRoutes.Namespaces.From == gwv1.NamespacesFromSelector {
			return true
		}
	}
	return false
}

// ResolveSelectors returns gw with ListenerNamespacesAnnotation set from
// the labels of every namespace (name -> labels). A selector that does not
// parse matches no namespace (fail closed). gw itself is not changed.
func ResolveSelectors(gw *gwv1.Gateway, namespaces map[string]map[string]string) *gwv1.Gateway {
	out := gw.DeepCopy()
	if !UsesSelectors(gw) {
		delete(out.Annotations, ListenerNamespacesAnnotation)
		return out
	}
	selected := map[string][]string{}
	for _, l := range gw.Spec.Listeners {
		ns := l.AllowedRoutes
		if ns == nil || ns.Namespaces == nil || ns.Namespaces.From == nil || *ns.Namespaces.From != gwv1.NamespacesFromSelector {
			continue
		}
		names := []string{}
		if ns.Namespaces.Selector != nil {
			if sel, err := metav1.LabelSelectorAsSelector(ns.Namespaces.Selector); err == nil {
				for name, lbls := range namespaces {
					if sel.Matches(labels.Set(lbls)) {
						names = append(names, name)
					}
				}
			}
		}
		slices.Sort(names)
		selected[string(l.Name)] = names
	}
	js, _ := json.Marshal(selected)
	if out.Annotations == nil {
		out.Annotations = map[string]string{}
	}
	out.Annotations[ListenerNamespacesAnnotation] = string(js)
	return out
}

// selectedBy reports whether routeNS is among the namespaces the control
// plane resolved for listener l's selector (none when unresolved).
func selectedBy(gw *gwv1.Gateway, l gwv1.Listener, routeNS string) bool {
	var selected map[string][]string
	if err := json.Unmarshal([]byte(gw.Annotations[ListenerNamespacesAnnotation]), &selected); err != nil {
		return false
	}
	return slices.Contains(selected[string(l.Name)], routeNS)
}

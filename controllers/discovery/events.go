package discovery

import (
	"fmt"
	"sort"
	"strings"

	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/ambientmesh/ambient/controllers/policy"
	"github.com/ambientmesh/ambient/proxylib/kubeevents"
)

// Event reasons of the control plane.
const (
	// ReasonL7RulesDropped: an ALLOW AuthorizationPolicy lost rules in its
	// L4 form (on the policy).
	ReasonL7RulesDropped = "L7RulesDropped"
	// ReasonConfigRejected: a proxy NACKed a push (on the proxy's pod);
	// ReasonConfigAccepted: it accepted a later one.
	ReasonConfigRejected = "ConfigRejected"
	ReasonConfigAccepted = "ConfigAccepted"
)

// maxNamedTargets bounds the pods an event names.
const maxNamedTargets = 10

// reportDroppedRules records, when it changes, which rules of ap ztunnel
// drops and which workloads therefore deny what those rules would allow.
func (b *build) reportDroppedRules(ap *securityv1.AuthorizationPolicy) {
	if b.c.opts.Events == nil || !b.c.leading() {
		return
	}
	dropped := policy.DroppedL7Rules(b.mc.RootNamespace, ap)
	state := ""
	var ev kubeevents.Event
	if len(dropped) > 0 {
		note, err := b.droppedRulesNote(ap, dropped)
		if err != nil {
			b.c.log.Error(err, "describing the targets of a policy", "policy", client.ObjectKeyFromObject(ap))
			return
		}
		state = note
		ev = kubeevents.Event{Type: kubeevents.Warning, Reason: ReasonL7RulesDropped, Action: "TranslateToL4", Note: note}
	}
	// No event when rules stop being dropped: the policy was edited, and
	// the editor knows; the state is reset so a regression is reported.
	b.c.opts.Events.Transition(ap, kubeevents.Change{Topic: "l4-translation", State: state, Event: ev})
}

// droppedRulesNote: "spec.rules[1] (methods, paths) needs L7 attributes
// ztunnel cannot evaluate and is dropped at L4: workloads matching app=db in
// namespace app deny what only it allows, unless the connection comes
// through their waypoint (which enforces the whole policy); without a
// waypoint, denied always: app/db-0".
func (b *build) droppedRulesNote(ap *securityv1.AuthorizationPolicy, dropped []policy.DroppedRule) (string, error) {
	rules := make([]string, 0, len(dropped))
	for _, d := range dropped {
		rules = append(rules, fmt.Sprintf("spec.rules[%d] (%s)", d.Index, strings.Join(d.Attributes, ", ")))
	}
	bare, err := b.podsWithoutWaypoint(ap)
	if err != nil {
		return "", err
	}
	needs, is, only := "needs", "is", "it allows"
	if len(rules) > 1 {
		needs, is, only = "need", "are", "they allow"
	}
	note := fmt.Sprintf("%s %s L7 attributes ztunnel cannot evaluate and %s dropped at L4: %s deny what only %s, unless the connection comes through their waypoint (which enforces the whole policy)",
		strings.Join(rules, ", "), needs, is, b.policyScope(ap), only)
	if bare != "" {
		note += "; without a waypoint, denied always: " + bare
	}
	return note, nil
}

func (b *build) policyScope(ap *securityv1.AuthorizationPolicy) string {
	sel := ap.Spec.GetSelector().GetMatchLabels()
	where := "namespace " + ap.Namespace
	if ap.Namespace == b.mc.RootNamespace {
		where = "every namespace"
	}
	if len(sel) == 0 {
		return "all workloads in " + where
	}
	return fmt.Sprintf("workloads matching %s in %s", labels.SelectorFromSet(sel).String(), where)
}

// podsWithoutWaypoint names (up to maxNamedTargets) the pods ap selects
// that have no waypoint. Mesh-wide policies are not expanded.
func (b *build) podsWithoutWaypoint(ap *securityv1.AuthorizationPolicy) (string, error) {
	if ap.Namespace == b.mc.RootNamespace {
		return "", nil
	}
	var pods corev1.PodList
	if err := b.c.reader.List(b.ctx, &pods, client.InNamespace(ap.Namespace), noCopy); err != nil {
		return "", err
	}
	v, err := b.view(ap.Namespace)
	if err != nil {
		return "", err
	}
	sel := labels.SelectorFromSet(ap.Spec.GetSelector().GetMatchLabels())
	var names []string
	for i := range pods.Items {
		pod := &pods.Items[i]
		if !sel.Matches(labels.Set(pod.Labels)) || isWaypointPod(pod) || pod.Spec.HostNetwork {
			continue
		}
		sa := pod.Spec.ServiceAccountName
		if sa == "" {
			sa = "default"
		}
		if workloadWaypoint(b.mc, v, pod, sa) == nil {
			names = append(names, pod.Namespace+"/"+pod.Name)
		}
	}
	sort.Strings(names)
	if len(names) > maxNamedTargets {
		return fmt.Sprintf("%s and %d more", strings.Join(names[:maxNamedTargets], ", "), len(names)-maxNamedTargets), nil
	}
	return strings.Join(names, ", "), nil
}

// leading reports whether this replica records the model's Events (every
// replica computes the same model; one report each is enough).
func (c *Controller) leading() bool {
	if c.opts.Elected == nil {
		return true
	}
	select {
	case <-c.opts.Elected:
		return true
	default:
		return false
	}
}

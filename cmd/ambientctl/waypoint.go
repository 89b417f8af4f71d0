package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/yaml"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
	"github.com/ambientmesh/ambient/controllers/waypointbind"
)

// defaultWaypointName is the name of a namespace waypoint, as Istio's.
const defaultWaypointName = "waypoint"

// desiredWaypoint is the WaypointPolicy `waypoint apply` creates.
func desiredWaypoint(ns string, o options) *meshv1.WaypointPolicy {
	wp := &meshv1.WaypointPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: o.name},
		Spec:       meshv1.WaypointPolicySpec{Scope: meshv1.ScopeNamespace, TrafficType: meshv1.TrafficType(o.forTraffic)},
	}
	if o.serviceAccount != "" {
		wp.Spec.Scope = meshv1.ScopeServiceAccount
		wp.Spec.ServiceAccount = o.serviceAccount
		if wp.Name == "" {
			wp.Name = o.serviceAccount
		}
	}
	if wp.Name == "" {
		wp.Name = defaultWaypointName
	}
	return wp
}

func waypointCmd(ctx context.Context, k *kube, inv invocation, out io.Writer) error {
	switch inv.sub {
	case "generate":
		return waypointGenerate(k.namespace, inv.opts, out)
	case "apply":
		if err := waypointApply(ctx, k, inv.opts, out); err != nil || !inv.opts.enroll {
			return err
		}
		return enrollNamespace(ctx, k, desiredWaypoint(k.namespace, inv.opts).Name, inv.opts.overwrite, out)
	case "list":
		return waypointList(ctx, k, inv.opts, out)
	case "status":
		return waypointStatus(ctx, k, inv.opts, out)
	case "delete":
		return waypointDelete(ctx, k, inv, out)
	}
	return fmt.Errorf("unknown waypoint command %q", inv.sub)
}

func waypointApply(ctx context.Context, k *kube, o options, out io.Writer) error {
	want := desiredWaypoint(k.namespace, o)
	var have meshv1.WaypointPolicy
	err := k.c.Get(ctx, client.ObjectKeyFromObject(want), &have)
	switch {
	case apierrors.IsNotFound(err):
		if err := k.c.Create(ctx, want); err != nil {
			return fmt.Errorf("creating waypoint %s/%s: %w", want.Namespace, want.Name, err)
		}
		fmt.Fprintf(out, "waypoint %s/%s created\n", want.Namespace, want.Name)
	case err != nil:
		return err
	default:
		have.Spec.Scope, have.Spec.ServiceAccount, have.Spec.TrafficType = want.Spec.Scope, want.Spec.ServiceAccount, want.Spec.TrafficType
		if err := k.c.Update(ctx, &have); err != nil {
			return fmt.Errorf("updating waypoint %s/%s: %w", want.Namespace, want.Name, err)
		}
		fmt.Fprintf(out, "waypoint %s/%s applied\n", want.Namespace, want.Name)
	}
	if !o.wait {
		return nil
	}
	err = wait.PollUntilContextCancel(ctx, time.Second, true, func(ctx context.Context) (bool, error) {
		if err := k.c.Get(ctx, client.ObjectKeyFromObject(want), &have); err != nil {
			return false, nil
		}
		return meta.IsStatusConditionTrue(have.Status.Conditions, meshv1.ConditionReady), nil
	})
	if err != nil {
		c := meta.FindStatusCondition(have.Status.Conditions, meshv1.ConditionReady)
		if c != nil {
			return fmt.Errorf("waypoint %s/%s not ready: %s: %s", want.Namespace, want.Name, c.Reason, c.Message)
		}
		return fmt.Errorf("waypoint %s/%s not ready (no status yet: is the operator running?)", want.Namespace, want.Name)
	}
	fmt.Fprintf(out, "waypoint %s/%s ready at %s\n", want.Namespace, want.Name, have.Status.Address)
	return nil
}

func waypointList(ctx context.Context, k *kube, o options, out io.Writer) error {
	var list meshv1.WaypointPolicyList
	var opts []client.ListOption
	if !o.allNamespaces {
		opts = append(opts, client.InNamespace(k.namespace))
	}
	if err := k.c.List(ctx, &list, opts...); err != nil {
		return err
	}
	if o.output != "" && o.output != "table" {
		return writeObjects(out, list.Items, o.output)
	}
	if len(list.Items) == 0 {
		where := "namespace " + k.namespace
		if o.allNamespaces {
			where = "any namespace"
		}
		fmt.Fprintf(out, "no waypoints in %s\n", where)
		return nil
	}
	return writeWaypoints(out, list.Items, o.allNamespaces)
}

func writeWaypoints(out io.Writer, items []meshv1.WaypointPolicy, withNS bool) error {
	tw := tabwriter.NewWriter(out, 0, 0, 3, ' ', 0)
	if withNS {
		fmt.Fprint(tw, "NAMESPACE\t")
	}
	fmt.Fprintln(tw, "NAME\tSCOPE\tSERVICE ACCOUNT\tADDRESS\tREADY\tREASON")
	for _, wp := range items {
		if withNS {
			fmt.Fprintf(tw, "%s\t", wp.Namespace)
		}
		ready, reason := "Unknown", ""
		if c := meta.FindStatusCondition(wp.Status.Conditions, meshv1.ConditionReady); c != nil {
			ready, reason = string(c.Status), c.Reason
		}
		scope := string(wp.Spec.Scope)
		if scope == "" {
			scope = string(meshv1.ScopeNamespace)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", wp.Name, scope, orNone(wp.Spec.ServiceAccount), orNone(wp.Status.Address), ready, reason)
	}
	return tw.Flush()
}

func waypointDelete(ctx context.Context, k *kube, inv invocation, out io.Writer) error {
	names := inv.names
	if inv.opts.name != "" {
		names = append(names, inv.opts.name)
	}
	if inv.opts.serviceAccount != "" {
		names = append(names, inv.opts.serviceAccount)
	}
	if inv.opts.all {
		var list meshv1.WaypointPolicyList
		if err := k.c.List(ctx, &list, client.InNamespace(k.namespace)); err != nil {
			return err
		}
		for _, wp := range list.Items {
			names = append(names, wp.Name)
		}
	}
	for _, n := range names {
		wp := &meshv1.WaypointPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: k.namespace, Name: n}}
		if err := k.c.Delete(ctx, wp); err != nil {
			if apierrors.IsNotFound(err) {
				return fmt.Errorf("waypoint %s/%s not found", k.namespace, n)
			}
			return err
		}
		fmt.Fprintf(out, "waypoint %s/%s deleted\n", k.namespace, n)
	}
	return nil
}

// waypointGenerate prints the WaypointPolicy `waypoint apply` would create,
// as istioctl's `waypoint generate` prints its Gateway; nothing is sent.
func waypointGenerate(ns string, o options, out io.Writer) error {
	wp := desiredWaypoint(ns, o)
	wp.APIVersion, wp.Kind = meshv1.GroupVersion.String(), "WaypointPolicy"
	return writeObjects(out, wp, o.output)
}

// enrollLabels returns the namespace labels with istio.io/use-waypoint set
// to name. A label naming another waypoint is replaced only with
// overwrite, as istioctl's --enroll-namespace --overwrite.
func enrollLabels(labels map[string]string, name string, overwrite bool) (map[string]string, error) {
	if cur, ok := labels[waypointbind.UseWaypointLabel]; ok && cur != name && !overwrite {
		return nil, fmt.Errorf("namespace already uses waypoint %q (%s); pass --overwrite to replace it", cur, waypointbind.UseWaypointLabel)
	}
	outLabels := map[string]string{}
	for k, v := range labels {
		outLabels[k] = v
	}
	outLabels[waypointbind.UseWaypointLabel] = name
	return outLabels, nil
}

func enrollNamespace(ctx context.Context, k *kube, name string, overwrite bool, out io.Writer) error {
	ns := &corev1.Namespace{}
	if err := k.c.Get(ctx, client.ObjectKey{Name: k.namespace}, ns); err != nil {
		return err
	}
	labels, err := enrollLabels(ns.Labels, name, overwrite)
	if err != nil {
		return fmt.Errorf("namespace %s: %w", k.namespace, err)
	}
	base := ns.DeepCopy()
	ns.Labels = labels
	if err := k.c.Patch(ctx, ns, client.MergeFrom(base)); err != nil {
		return fmt.Errorf("labelling namespace %s: %w", k.namespace, err)
	}
	fmt.Fprintf(out, "namespace %s labelled %s=%s\n", k.namespace, waypointbind.UseWaypointLabel, name)
	return nil
}

// waypointStatus shows the readiness of the namespace's waypoints, or of
// the one --name names (a missing one is an error, as istioctl's).
func waypointStatus(ctx context.Context, k *kube, o options, out io.Writer) error {
	if o.name == "" {
		return waypointList(ctx, k, o, out)
	}
	var wp meshv1.WaypointPolicy
	if err := k.c.Get(ctx, client.ObjectKey{Namespace: k.namespace, Name: o.name}, &wp); err != nil {
		if apierrors.IsNotFound(err) {
			return fmt.Errorf("waypoint %s/%s not found", k.namespace, o.name)
		}
		return err
	}
	if o.output != "" && o.output != "table" {
		return writeObjects(out, []meshv1.WaypointPolicy{wp}, o.output)
	}
	return writeWaypoints(out, []meshv1.WaypointPolicy{wp}, false)
}

// writeObjects prints objects as a JSON or YAML list (-o json|yaml).
func writeObjects(out io.Writer, items any, output string) error {
	b, err := yaml.Marshal(items)
	if output == "json" {
		b, err = json.MarshalIndent(items, "", "  ")
		b = append(b, '\n')
	}
	if err != nil {
		return err
	}
	_, err = out.Write(b)
	return err
}

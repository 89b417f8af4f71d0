package main

import (
	"context"
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/duration"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
)

func status(ctx context.Context, k *kube, o options, out io.Writer) error {
	var meshes meshv1.AmbientMeshList
	if err := k.c.List(ctx, &meshes); err != nil {
		return fmt.Errorf("listing AmbientMesh: %w (is the operator's CRD installed?)", err)
	}
	if len(meshes.Items) == 0 {
		return fmt.Errorf("no AmbientMesh found: the mesh is not installed (apply config/samples or dist/install.yaml and an AmbientMesh)")
	}
	for _, m := range meshes.Items {
		writeMesh(out, &m, time.Now())
		ns := m.Spec.Namespace
		if o.meshNamespace != "" {
			ns = o.meshNamespace
		}
		if ns == "" {
			ns = defaultMeshNamespace
		}
		pods, err := k.cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "\nPods in %s:\n", ns)
		writePods(out, pods.Items, time.Now())
	}
	return nil
}

// writeMesh prints one AmbientMesh and its conditions.
func writeMesh(out io.Writer, m *meshv1.AmbientMesh, now time.Time) {
	fmt.Fprintf(out, "AmbientMesh %s: trust domain %s, namespace %s, ztunnels %s\n",
		m.Name, orNone(m.Spec.TrustDomain), orNone(m.Spec.Namespace), orNone(m.Status.ReadySummary))
	conds := append([]metav1.Condition(nil), m.Status.Conditions...)
	sort.SliceStable(conds, func(i, j int) bool { return conds[i].Type < conds[j].Type })
	if len(conds) == 0 {
		fmt.Fprintln(out, "  no conditions yet (is the operator running?)")
		return
	}
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "  CONDITION\tSTATUS\tREASON\tAGE\tMESSAGE")
	for _, c := range conds {
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\n", c.Type, c.Status, c.Reason, age(c.LastTransitionTime.Time, now), oneLine(c.Message))
	}
	_ = tw.Flush()
}

func writePods(out io.Writer, pods []corev1.Pod, now time.Time) {
	sort.Slice(pods, func(i, j int) bool { return pods[i].Name < pods[j].Name })
	tw := tabwriter.NewWriter(out, 0, 0, 3, ' ', 0)
	fmt.Fprintln(tw, "NAME\tNODE\tREADY\tSTATUS\tRESTARTS\tAGE")
	for _, p := range pods {
		ready, restarts := 0, int32(0)
		for _, cs := range p.Status.ContainerStatuses {
			if cs.Ready {
				ready++
			}
			restarts += cs.RestartCount
		}
		fmt.Fprintf(tw, "%s\t%s\t%d/%d\t%s\t%d\t%s\n", p.Name, orNone(p.Spec.NodeName), ready, len(p.Spec.Containers), p.Status.Phase, restarts, age(p.CreationTimestamp.Time, now))
	}
	_ = tw.Flush()
}

func age(t, now time.Time) string {
	if t.IsZero() {
		return "<unknown>"
	}
	return duration.HumanDuration(now.Sub(t))
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

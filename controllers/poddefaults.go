package controllers

import (
	"context"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// Production pod defaults: what the operator's pods get when the mesh
// spec says nothing. The figures follow Istio's charts where our proxies
// behave alike; ztunnel asks for less memory than Istio's (512Mi) because
// ours idles at ~14 MiB plus ~24 KiB per connection (docs/performance.md).
var (
	ztunnelResources = corev1.ResourceRequirements{
		Requests: resourceList("200m", "256Mi"),
	}
	nodeAgentResources = corev1.ResourceRequirements{
		Requests: resourceList("100m", "100Mi"),
	}
	// Waypoints are limited, as Istio's: one busy waypoint must not starve
	// its node, and the memory limit gives GOMEMLIMIT a real value.
	waypointResources = corev1.ResourceRequirements{
		Requests: resourceList("100m", "128Mi"),
		Limits:   resourceList("2", "1Gi"),
	}
)

// nodeCriticalPriority is the built-in class Istio gives ztunnel and its
// CNI agent: a node without them cannot run captured pods.
const nodeCriticalPriority = "system-node-critical"

func resourceList(cpu, memory string) corev1.ResourceList {
	return corev1.ResourceList{corev1.ResourceCPU: resource.MustParse(cpu), corev1.ResourceMemory: resource.MustParse(memory)}
}

// resourcesOr is the user's resources as written (even empty), else def.
func resourcesOr(set *corev1.ResourceRequirements, def corev1.ResourceRequirements) corev1.ResourceRequirements {
	if set != nil {
		return *set.DeepCopy()
	}
	return *def.DeepCopy()
}

func priorityClassOr(name string) string {
	if name == "" {
		return nodeCriticalPriority
	}
	return name
}

// restrictedPodSecurity is the pod-level half of the restricted Pod
// Security profile (the container's security context holds the rest:
// non-root, no privilege escalation, every capability dropped).
func restrictedPodSecurity() *corev1.PodSecurityContext {
	return &corev1.PodSecurityContext{
		RunAsNonRoot:   ptr.To(true),
		SeccompProfile: &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
	}
}

// spreadConstraints spread a proxy's replicas over nodes and zones, best
// effort: a small cluster still runs them all. They are set whatever the
// replica count, so an autoscaler changing it never rolls the pods.
func spreadConstraints(selector *metav1.LabelSelector) []corev1.TopologySpreadConstraint {
	spread := func(key string) corev1.TopologySpreadConstraint {
		return corev1.TopologySpreadConstraint{
			MaxSkew: 1, TopologyKey: key, WhenUnsatisfiable: corev1.ScheduleAnyway,
			LabelSelector: selector.DeepCopy(),
			// Spread each revision on its own: during a rollout the old
			// pods about to go do not skew where the new ones land.
			MatchLabelKeys: []string{appsv1.DefaultDeploymentUniqueLabelKey},
		}
	}
	return []corev1.TopologySpreadConstraint{spread(corev1.LabelHostname), spread(corev1.LabelTopologyZone)}
}

// disruptionBudget lets voluntary disruptions (drains, upgrades) take one
// replica of a proxy at a time. Pods that are not ready may always be
// evicted, so a broken replica never blocks a drain.
func disruptionBudget(meta metav1.ObjectMeta, selector *metav1.LabelSelector) *policyv1.PodDisruptionBudget {
	return &policyv1.PodDisruptionBudget{
		ObjectMeta: meta,
		Spec: policyv1.PodDisruptionBudgetSpec{
			MaxUnavailable:             ptr.To(intstr.FromInt32(1)),
			Selector:                   selector.DeepCopy(),
			UnhealthyPodEvictionPolicy: ptr.To(policyv1.AlwaysAllow),
		},
	}
}

// deleteOwned deletes obj if owner controls it (never a user's object of
// the same name); absent is fine.
func deleteOwned(ctx context.Context, c client.Client, obj, owner client.Object) error {
	if err := c.Get(ctx, client.ObjectKeyFromObject(obj), obj); err != nil {
		return client.IgnoreNotFound(err)
	}
	if !metav1.IsControlledBy(obj, owner) {
		return nil
	}
	if err := c.Delete(ctx, obj); err != nil && !apierrors.IsNotFound(err) {
		return err
	}
	return nil
}

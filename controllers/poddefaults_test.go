package controllers

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	autoscalingv1 "k8s.io/api/autoscaling/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	schedulingv1 "k8s.io/api/scheduling/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/restmapper"
	"k8s.io/client-go/scale"
	"k8s.io/client-go/util/retry"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
)

// dryRunPod asks the API server to admit a pod built from tmpl in ns,
// without creating it: the real admission chain (PodSecurity, Priority,
// the webhooks) judges it, as it would the pods the Deployment or
// DaemonSet controller creates (envtest runs neither, nor a kubelet).
func dryRunPod(ctx context.Context, ns string, tmpl corev1.PodTemplateSpec) (*corev1.Pod, error) {
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, GenerateName: "dry-run-", Labels: tmpl.Labels, Annotations: tmpl.Annotations},
		Spec:       *tmpl.Spec.DeepCopy(),
	}
	err := k8s.Create(ctx, pod, client.DryRunAll)
	return pod, err
}

func createRestrictedNamespace(t *testing.T, name string) {
	t.Helper()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{
		"pod-security.kubernetes.io/enforce":         "restricted",
		"pod-security.kubernetes.io/enforce-version": "latest",
	}}}
	if err := k8s.Create(context.Background(), ns); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = k8s.DeleteAllOf(context.Background(), &meshv1.WaypointPolicy{}, client.InNamespace(name))
	})
}

// TestWaypointPodsAdmittedUnderRestrictedPodSecurity: a namespace that
// enforces the restricted Pod Security profile admits the pods of its
// waypoint and of its ingress gateway.
func TestWaypointPodsAdmittedUnderRestrictedPodSecurity(t *testing.T) {
	ctx := context.Background()
	const ns = "wp-restricted"
	createRestrictedNamespace(t, ns)
	newMesh(t, "restricted", "mesh-restricted", nil)
	t.Cleanup(func() { _ = k8s.DeleteAllOf(ctx, &gwv1.Gateway{}, client.InNamespace(ns)) })
	if err := k8s.Create(ctx, &meshv1.WaypointPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "waypoint"}}); err != nil {
		t.Fatal(err)
	}
	gw := seedsIngressGateway(ns)
	if err := k8s.Create(ctx, gw); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"waypoint", "gateway-istio"} {
		t.Run(name, func(t *testing.T) {
			dep := &appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
			eventually(t, "deployment "+name, exists(dep))
			if _, err := dryRunPod(ctx, ns, dep.Spec.Template); err != nil {
				t.Fatalf("the %s pod is refused in a restricted namespace: %v", name, err)
			}
			// The admission is real: the same pod without its seccomp
			// profile is refused, for that reason.
			bare := dep.Spec.Template.DeepCopy()
			if bare.Spec.SecurityContext != nil {
				bare.Spec.SecurityContext.SeccompProfile = nil
			}
			for i := range bare.Spec.Containers {
				if sc := bare.Spec.Containers[i].SecurityContext; sc != nil {
					sc.SeccompProfile = nil
				}
			}
			if _, err := dryRunPod(ctx, ns, *bare); err == nil || !strings.Contains(err.Error(), "seccompProfile") {
				t.Fatalf("without a seccomp profile: %v, want refused for seccompProfile", err)
			}
		})
	}
}

// quantities builds a ResourceList from name=quantity pairs.
func quantities(kv ...string) corev1.ResourceList {
	l := corev1.ResourceList{}
	for i := 0; i < len(kv); i += 2 {
		l[corev1.ResourceName(kv[i])] = resource.MustParse(kv[i+1])
	}
	return l
}

func wantResources(t *testing.T, what string, have, want corev1.ResourceRequirements) {
	t.Helper()
	if !equality.Semantic.DeepEqual(have, want) {
		t.Errorf("%s resources: have %s, want %s", what, fmtResources(have), fmtResources(want))
	}
}

func fmtResources(r corev1.ResourceRequirements) string {
	list := func(l corev1.ResourceList) string {
		var parts []string
		for name, q := range l {
			parts = append(parts, string(name)+"="+q.String())
		}
		slices.Sort(parts)
		return "{" + strings.Join(parts, " ") + "}"
	}
	return "requests " + list(r.Requests) + " limits " + list(r.Limits)
}

// The defaults when neither the AmbientMesh nor the WaypointPolicy sets
// resources (docs/api-reference.md states them).
var (
	wantZtunnelDefaults  = corev1.ResourceRequirements{Requests: quantities("cpu", "200m", "memory", "256Mi")}
	wantNodeAgentDefault = corev1.ResourceRequirements{Requests: quantities("cpu", "100m", "memory", "100Mi")}
	wantWaypointDefaults = corev1.ResourceRequirements{
		Requests: quantities("cpu", "100m", "memory", "128Mi"),
		Limits:   quantities("cpu", "2", "memory", "1Gi"),
	}
)

// TestProxyResourceDefaults: with no resources in the mesh or the policy,
// ztunnel, the node agent and waypoints get requests (and waypoints
// limits, so GOMEMLIMIT resolves to 1Gi rather than the node's memory).
func TestProxyResourceDefaults(t *testing.T) {
	ctx := context.Background()
	const ns, meshNS = "wp-res", "mesh-res"
	createNamespace(t, ns)
	newMesh(t, "res", meshNS, nil)
	if err := k8s.Create(ctx, &meshv1.WaypointPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "waypoint"}}); err != nil {
		t.Fatal(err)
	}
	z := &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: meshNS, Name: ZtunnelName}}
	na := &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: meshNS, Name: NodeAgentName}}
	dep := &appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "waypoint"}}
	for _, o := range []client.Object{z, na, dep} {
		eventually(t, fmt.Sprintf("%T %s", o, o.GetName()), exists(o))
	}
	wantResources(t, "ztunnel", z.Spec.Template.Spec.Containers[0].Resources, wantZtunnelDefaults)
	wantResources(t, "node agent", na.Spec.Template.Spec.Containers[0].Resources, wantNodeAgentDefault)
	wc := dep.Spec.Template.Spec.Containers[0]
	wantResources(t, "waypoint", wc.Resources, wantWaypointDefaults)
	if i := slices.IndexFunc(wc.Env, func(e corev1.EnvVar) bool { return e.Name == "GOMEMLIMIT" }); i < 0 ||
		wc.Env[i].ValueFrom == nil || wc.Env[i].ValueFrom.ResourceFieldRef == nil || wc.Env[i].ValueFrom.ResourceFieldRef.Resource != "limits.memory" {
		t.Errorf("waypoint GOMEMLIMIT must come from limits.memory: %v", wc.Env)
	}
	// The API server accepts the pods (a request above its limit would not be).
	for _, tmpl := range []corev1.PodTemplateSpec{z.Spec.Template, na.Spec.Template} {
		if _, err := dryRunPod(ctx, meshNS, tmpl); err != nil {
			t.Errorf("pod refused: %v", err)
		}
	}
	if _, err := dryRunPod(ctx, ns, dep.Spec.Template); err != nil {
		t.Errorf("waypoint pod refused: %v", err)
	}
}

// TestWaypointScaledByHPAThroughScaleSubresource: a HorizontalPodAutoscaler
// targets a WaypointPolicy. What its controller does — read /scale for the
// current replicas and the pods' selector, write /scale with the new
// count — is done here through the API server, and the Deployment, its
// disruption budget and the status follow.
func TestWaypointScaledByHPAThroughScaleSubresource(t *testing.T) {
	ctx := context.Background()
	const ns = "wp-scale"
	createNamespace(t, ns)
	newMesh(t, "scale", "mesh-scale", nil)
	wp := &meshv1.WaypointPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "waypoint"}}
	if err := k8s.Create(ctx, wp); err != nil {
		t.Fatal(err)
	}
	hpa := &autoscalingv2.HorizontalPodAutoscaler{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "waypoint"},
		Spec: autoscalingv2.HorizontalPodAutoscalerSpec{
			ScaleTargetRef: autoscalingv2.CrossVersionObjectReference{APIVersion: meshv1.GroupVersion.String(), Kind: "WaypointPolicy", Name: "waypoint"},
			MinReplicas:    ptr.To[int32](1), MaxReplicas: 3,
			Metrics: []autoscalingv2.MetricSpec{{Type: autoscalingv2.ResourceMetricSourceType, Resource: &autoscalingv2.ResourceMetricSource{
				Name: corev1.ResourceCPU, Target: autoscalingv2.MetricTarget{Type: autoscalingv2.UtilizationMetricType, AverageUtilization: ptr.To[int32](80)},
			}}},
		},
	}
	if err := k8s.Create(ctx, hpa); err != nil {
		t.Fatal(err)
	}
	dep := &appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "waypoint"}}
	eventually(t, "deployment", exists(dep))
	pdb := &policyv1.PodDisruptionBudget{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "waypoint"}}
	if err := gone(pdb)(); err != nil {
		t.Errorf("one replica has a disruption budget: %v", err)
	}

	// The HPA controller resolves spec.scaleTargetRef to /scale: the
	// selector must select this waypoint's pods and no other's.
	target := scaleTargetOf(t, hpa)
	var sc *autoscalingv1.Scale
	eventually(t, "scale selector", func() error {
		var err error
		if sc, err = target.get(ctx); err != nil {
			return err
		}
		if sc.Status.Selector == "" {
			return fmt.Errorf("no selector in /scale status: %+v (the HPA controller refuses a target without one)", sc.Status)
		}
		return nil
	})
	sel, err := labels.Parse(sc.Status.Selector)
	if err != nil {
		t.Fatalf("selector %q: %v", sc.Status.Selector, err)
	}
	if !sel.Matches(labels.Set(dep.Spec.Template.Labels)) {
		t.Errorf("selector %q does not select the waypoint's pods %v", sel, dep.Spec.Template.Labels)
	}
	other := mergeLabels(dep.Spec.Template.Labels, map[string]string{LabelGatewayName: "other"})
	if sel.Matches(labels.Set(other)) {
		t.Errorf("selector %q selects another waypoint's pods", sel)
	}
	if sc.Spec.Replicas != 1 {
		t.Errorf("scale spec.replicas %d, want 1", sc.Spec.Replicas)
	}

	// Scale up as the HPA would under load: to its maximum.
	if err := target.set(ctx, hpa.Spec.MaxReplicas); err != nil {
		t.Fatalf("write /scale: %v", err)
	}
	eventually(t, "deployment at 3 replicas with a disruption budget", func() error {
		if err := exists(dep)(); err != nil {
			return err
		}
		if r := ptr.Deref(dep.Spec.Replicas, 0); r != 3 {
			return fmt.Errorf("deployment replicas %d", r)
		}
		return exists(pdb)()
	})
	if !controlledByName(pdb, "WaypointPolicy", "waypoint") {
		t.Errorf("disruption budget owners %v", pdb.OwnerReferences)
	}
	if mu := pdb.Spec.MaxUnavailable; mu == nil || mu.IntValue() != 1 || pdb.Spec.MinAvailable != nil {
		t.Errorf("disruption budget maxUnavailable %v minAvailable %v, want maxUnavailable 1", pdb.Spec.MaxUnavailable, pdb.Spec.MinAvailable)
	}
	if !equality.Semantic.DeepEqual(pdb.Spec.Selector, dep.Spec.Selector) {
		t.Errorf("disruption budget selector %v, deployment selector %v", pdb.Spec.Selector, dep.Spec.Selector)
	}
	// Replicas spread over nodes and zones (best effort: a one-node cluster
	// still runs them all).
	keys := map[string]bool{}
	for _, c := range dep.Spec.Template.Spec.TopologySpreadConstraints {
		if c.WhenUnsatisfiable != corev1.ScheduleAnyway || c.LabelSelector == nil || !slices.Equal(c.MatchLabelKeys, []string{appsv1.DefaultDeploymentUniqueLabelKey}) {
			t.Errorf("spread constraint %+v must be best effort and select the waypoint's pods of one revision", c)
			continue
		}
		if s, err := metav1.LabelSelectorAsSelector(c.LabelSelector); err != nil || !s.Matches(labels.Set(dep.Spec.Template.Labels)) {
			t.Errorf("spread constraint selector %v does not select the waypoint's pods", c.LabelSelector)
		}
		keys[c.TopologyKey] = true
	}
	if !keys[corev1.LabelHostname] || !keys[corev1.LabelTopologyZone] {
		t.Errorf("spread over %v, want %s and %s", keys, corev1.LabelHostname, corev1.LabelTopologyZone)
	}

	// The Deployment's pods come up: /scale reports them.
	setDeploymentStatus(t, ns, "waypoint", 3)
	eventually(t, "scale status", func() error {
		sc, err := target.get(ctx)
		if err != nil {
			return err
		}
		if sc.Status.Replicas != 3 || sc.Spec.Replicas != 3 {
			return fmt.Errorf("scale %+v / %+v", sc.Spec, sc.Status)
		}
		return nil
	})

	// Back to its minimum, one replica: the budget goes (with one replica
	// it would block every drain).
	if err := target.set(ctx, *hpa.Spec.MinReplicas); err != nil {
		t.Fatalf("write /scale: %v", err)
	}
	eventually(t, "disruption budget removed", gone(pdb))
	if err := exists(dep)(); err != nil || ptr.Deref(dep.Spec.Replicas, 0) != 1 {
		t.Errorf("deployment replicas %v (%v), want 1", ptr.Deref(dep.Spec.Replicas, 0), err)
	}
}

// scaleTarget is an HPA's target as its controller reaches it: the
// scaleTargetRef's apiVersion and kind mapped to a resource through
// discovery, then read and written with client-go's scale client (/scale).
type scaleTarget struct {
	scales scale.ScaleInterface
	gr     schema.GroupResource
	name   string
}

func scaleTargetOf(t *testing.T, hpa *autoscalingv2.HorizontalPodAutoscaler) scaleTarget {
	t.Helper()
	ref := hpa.Spec.ScaleTargetRef
	gv, err := schema.ParseGroupVersion(ref.APIVersion)
	if err != nil {
		t.Fatal(err)
	}
	dc, err := discovery.NewDiscoveryClientForConfig(restConfig)
	if err != nil {
		t.Fatal(err)
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(dc))
	mapping, err := mapper.RESTMapping(schema.GroupKind{Group: gv.Group, Kind: ref.Kind}, gv.Version)
	if err != nil {
		t.Fatalf("map %s %s: %v", ref.APIVersion, ref.Kind, err)
	}
	scales, err := scale.NewForConfig(restConfig, mapper, dynamic.LegacyAPIPathResolverFunc, scale.NewDiscoveryScaleKindResolver(dc))
	if err != nil {
		t.Fatal(err)
	}
	return scaleTarget{scales: scales.Scales(hpa.Namespace), gr: mapping.Resource.GroupResource(), name: ref.Name}
}

func (s scaleTarget) get(ctx context.Context) (*autoscalingv1.Scale, error) {
	return s.scales.Get(ctx, s.gr, s.name, metav1.GetOptions{})
}

// set writes /scale as the HPA does, again on a conflict with the
// operator's own writes.
func (s scaleTarget) set(ctx context.Context, replicas int32) error {
	return retry.RetryOnConflict(retry.DefaultRetry, func() error {
		sc, err := s.get(ctx)
		if err != nil {
			return err
		}
		sc.Spec.Replicas = replicas
		_, err = s.scales.Update(ctx, s.gr, sc, metav1.UpdateOptions{})
		return err
	})
}

func controlledByName(obj client.Object, kind, name string) bool {
	ref := metav1.GetControllerOf(obj)
	return ref != nil && ref.Kind == kind && ref.Name == name
}

// TestProxyResourcesFromSpec: resources set in the AmbientMesh or the
// WaypointPolicy are used as written ({} means none); unsetting them
// brings the defaults back.
func TestProxyResourcesFromSpec(t *testing.T) {
	ctx := context.Background()
	const ns, meshNS = "wp-res-spec", "mesh-res-spec"
	createNamespace(t, ns)
	zt := corev1.ResourceRequirements{Requests: quantities("cpu", "50m"), Limits: quantities("memory", "512Mi")}
	mw := corev1.ResourceRequirements{Limits: quantities("memory", "256Mi")}
	own := corev1.ResourceRequirements{Requests: quantities("cpu", "300m", "memory", "64Mi")}
	newMesh(t, "res-spec", meshNS, func(m *meshv1.AmbientMesh) {
		m.Spec.Ztunnel.Resources = zt.DeepCopy()
		m.Spec.NodeAgent.Resources = &corev1.ResourceRequirements{}
		m.Spec.Waypoint.Resources = mw.DeepCopy()
	})
	for _, wp := range []*meshv1.WaypointPolicy{
		{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "meshwide"}},
		{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "own"}, Spec: meshv1.WaypointPolicySpec{
			Scope: meshv1.ScopeServiceAccount, ServiceAccount: "reviews", Resources: own.DeepCopy()}},
	} {
		if err := k8s.Create(ctx, wp); err != nil {
			t.Fatal(err)
		}
	}
	z := &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: meshNS, Name: ZtunnelName}}
	na := &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: meshNS, Name: NodeAgentName}}
	meshwide := &appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "meshwide"}}
	ownDep := &appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "own"}}
	for _, o := range []client.Object{z, na, meshwide, ownDep} {
		eventually(t, fmt.Sprintf("%T %s", o, o.GetName()), exists(o))
	}
	wantResources(t, "ztunnel", z.Spec.Template.Spec.Containers[0].Resources, zt)
	wantResources(t, "node agent", na.Spec.Template.Spec.Containers[0].Resources, corev1.ResourceRequirements{})
	wantResources(t, "waypoint from the mesh", meshwide.Spec.Template.Spec.Containers[0].Resources, mw)
	wantResources(t, "waypoint with its own", ownDep.Spec.Template.Spec.Containers[0].Resources, own)

	// Unset in the mesh: the defaults come back (fields the operator no
	// longer applies are removed, not left behind).
	if err := updateMesh(t, "res-spec", func(m *meshv1.AmbientMesh) {
		m.Spec.Ztunnel.Resources, m.Spec.NodeAgent.Resources, m.Spec.Waypoint.Resources = nil, nil, nil
	}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "defaults back", func() error {
		for _, o := range []client.Object{z, na, meshwide} {
			if err := exists(o)(); err != nil {
				return err
			}
		}
		for what, pair := range map[string][2]corev1.ResourceRequirements{
			"ztunnel":    {z.Spec.Template.Spec.Containers[0].Resources, wantZtunnelDefaults},
			"node agent": {na.Spec.Template.Spec.Containers[0].Resources, wantNodeAgentDefault},
			"waypoint":   {meshwide.Spec.Template.Spec.Containers[0].Resources, wantWaypointDefaults},
		} {
			if !equality.Semantic.DeepEqual(pair[0], pair[1]) {
				return fmt.Errorf("%s: %v / %v", what, pair[0].Requests, pair[0].Limits)
			}
		}
		return nil
	})
}

// TestNodeDaemonSetPriorityClass: ztunnel and node-agent pods are
// admitted (the Priority admission resolves the class) as
// system-node-critical, as Istio runs its node components: the last pods a
// kubelet evicts, able to preempt to land on a full node; or with the
// class the mesh names.
func TestNodeDaemonSetPriorityClass(t *testing.T) {
	ctx := context.Background()
	custom := &schedulingv1.PriorityClass{ObjectMeta: metav1.ObjectMeta{Name: "ambient-node-test"}, Value: 1000000}
	if err := k8s.Create(ctx, custom); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = k8s.Delete(ctx, custom) })
	for _, tc := range []struct {
		name, class, wantClass string
		wantPriority           int32
	}{
		{"default", "", "system-node-critical", 2000001000},
		{"from the mesh", custom.Name, custom.Name, custom.Value},
	} {
		t.Run(tc.name, func(t *testing.T) {
			meshNS := "mesh-prio-" + strings.ReplaceAll(tc.name, " ", "-")
			newMesh(t, "prio", meshNS, func(m *meshv1.AmbientMesh) {
				m.Spec.Ztunnel.PriorityClassName = tc.class
				m.Spec.NodeAgent.PriorityClassName = tc.class
			})
			for _, name := range []string{ZtunnelName, NodeAgentName} {
				ds := &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: meshNS, Name: name}}
				eventually(t, name, exists(ds))
				pod, err := dryRunPod(ctx, meshNS, ds.Spec.Template)
				if err != nil {
					t.Fatalf("%s pod refused: %v", name, err)
				}
				if pod.Spec.PriorityClassName != tc.wantClass || ptr.Deref(pod.Spec.Priority, 0) != tc.wantPriority {
					t.Errorf("%s pod priority %q=%v, want %s=%d", name, pod.Spec.PriorityClassName, ptr.Deref(pod.Spec.Priority, 0), tc.wantClass, tc.wantPriority)
				}
			}
		})
	}
}

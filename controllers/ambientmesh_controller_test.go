package controllers

import (
	"context"
	"fmt"
	"k8s.io/utils/ptr"
	"slices"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	crmetrics "sigs.k8s.io/controller-runtime/pkg/metrics"

	dto "github.com/prometheus/client_model/go"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
)

// newMesh creates an AmbientMesh and removes it (waiting until it is gone)
// when the test ends, so the next test can create its own.
func newMesh(t *testing.T, name, ns string, mutate func(*meshv1.AmbientMesh)) *meshv1.AmbientMesh {
	t.Helper()
	mesh := &meshv1.AmbientMesh{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: meshv1.AmbientMeshSpec{Namespace: ns}}
	if mutate != nil {
		mutate(mesh)
	}
	if err := k8s.Create(context.Background(), mesh); err != nil {
		t.Fatalf("create mesh: %v", err)
	}
	t.Cleanup(func() { deleteMesh(t, name) })
	return mesh
}

func deleteMesh(t *testing.T, name string) {
	t.Helper()
	mesh := &meshv1.AmbientMesh{ObjectMeta: metav1.ObjectMeta{Name: name}}
	_ = client.IgnoreNotFound(k8s.Delete(context.Background(), mesh))
	eventually(t, "mesh "+name+" deleted", gone(mesh))
}

// setDaemonSetStatus plays the DaemonSet controller (envtest has none).
func setDaemonSetStatus(t *testing.T, ns, name string, desired, ready int32) {
	t.Helper()
	eventually(t, "DaemonSet status "+name, func() error {
		ds := &appsv1.DaemonSet{}
		if err := k8s.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: name}, ds); err != nil {
			return err
		}
		ds.Status = appsv1.DaemonSetStatus{
			ObservedGeneration: ds.Generation, DesiredNumberScheduled: desired, CurrentNumberScheduled: desired,
			UpdatedNumberScheduled: desired, NumberReady: ready, NumberAvailable: ready,
		}
		return k8s.Status().Update(context.Background(), ds)
	})
}

func TestAmbientMeshCreateStatusAndIdempotence(t *testing.T) {
	ctx := context.Background()
	const ns = "mesh-create"
	newMesh(t, "create", ns, nil)

	// Defaults applied by the CRD schema.
	mesh := waitCondition(t, "create", meshv1.ConditionCAReady, metav1.ConditionTrue, meshv1.ReasonCAIssued)
	if mesh.Spec.TrustDomain != "cluster.local" || mesh.Spec.Ztunnel.Transport != meshv1.TransportHTTP2 || mesh.Spec.CA.WorkloadCertTTL.Duration != 24*time.Hour {
		t.Fatalf("schema defaults not applied: %+v", mesh.Spec)
	}
	// Every child exists, labelled and owned by the mesh.
	children := []client.Object{
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}},
		&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: ZtunnelName}},
		&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: NodeAgentName}},
		&rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: NodeAgentName}},
		&rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: NodeAgentName}},
		&corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: ControlPlaneService}},
		&appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: ZtunnelName}},
		&appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: NodeAgentName}},
		&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: CASecretName}},
		&corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: RootCertConfigMap}},
		&corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: RootCertConfigMap}},
	}
	for _, c := range children {
		eventually(t, fmt.Sprintf("%T %s", c, c.GetName()), exists(c))
		if c.GetLabels()[LabelMesh] != "create" {
			t.Errorf("%T %s: missing mesh label: %v", c, c.GetName(), c.GetLabels())
		}
		if _, isNS := c.(*corev1.Namespace); !isNS && !metav1.IsControlledBy(c, mesh) {
			t.Errorf("%T %s: not controlled by the mesh: %v", c, c.GetName(), c.GetOwnerReferences())
		}
	}
	// The ztunnel pod spec carries the contract of docs/interfaces.md.
	z := children[6].(*appsv1.DaemonSet)
	zc := z.Spec.Template.Spec.Containers[0]
	if zc.Image != testDefaults.ZtunnelImage || z.Spec.Template.Spec.HostNetwork {
		t.Errorf("ztunnel image %q hostNetwork %v", zc.Image, z.Spec.Template.Spec.HostNetwork)
	}
	if env := envMap(zc.Env); env["XDS_ADDRESS"] != "ambient-controlplane.mesh-create.svc:15010" || env["TRUST_DOMAIN"] != "cluster.local" || env["HBONE_TRANSPORT"] != "HTTP2" {
		t.Errorf("ztunnel env: %v", env)
	}
	// The Go runtime's soft memory limit follows the container's limit.
	if i := slices.IndexFunc(zc.Env, func(e corev1.EnvVar) bool { return e.Name == "GOMEMLIMIT" }); i < 0 ||
		zc.Env[i].ValueFrom == nil || zc.Env[i].ValueFrom.ResourceFieldRef == nil || zc.Env[i].ValueFrom.ResourceFieldRef.Resource != "limits.memory" {
		t.Errorf("ztunnel GOMEMLIMIT must come from limits.memory: %v", zc.Env)
	}
	if caps := zc.SecurityContext.Capabilities.Add; len(caps) != 3 || *zc.SecurityContext.Privileged {
		t.Errorf("ztunnel must be unprivileged with NET_ADMIN/SYS_ADMIN/NET_RAW, got %v", caps)
	}
	// ztunnel upgrades surge (the API server accepted it: maxSurge needs
	// maxUnavailable 0) and drain within the termination grace period.
	if ru := z.Spec.UpdateStrategy.RollingUpdate; z.Spec.UpdateStrategy.Type != appsv1.RollingUpdateDaemonSetStrategyType || ru == nil ||
		ru.MaxSurge == nil || ru.MaxSurge.IntValue() != 1 || ru.MaxUnavailable == nil || ru.MaxUnavailable.IntValue() != 0 {
		t.Errorf("ztunnel update strategy %+v, want RollingUpdate maxSurge 1 maxUnavailable 0", z.Spec.UpdateStrategy.RollingUpdate)
	}
	if len(zc.Ports) != 2 || zc.Ports[0].HostPort != 0 || zc.Ports[1].HostPort != 0 {
		t.Errorf("ztunnel ports %+v: a surged pod must not need host ports", zc.Ports)
	}
	drainGrace, err := time.ParseDuration(envMap(zc.Env)["DRAIN_GRACE"])
	if grace := z.Spec.Template.Spec.TerminationGracePeriodSeconds; err != nil || grace == nil || drainGrace <= 0 || drainGrace >= time.Duration(*grace)*time.Second {
		t.Errorf("ztunnel DRAIN_GRACE %q must be positive and shorter than terminationGracePeriodSeconds %v", envMap(zc.Env)["DRAIN_GRACE"], z.Spec.Template.Spec.TerminationGracePeriodSeconds)
	}
	// The node agent holds host port 15022 and the CNI socket: it cannot surge.
	if ru := children[7].(*appsv1.DaemonSet).Spec.UpdateStrategy.RollingUpdate; ru == nil || ru.MaxSurge != nil && ru.MaxSurge.IntValue() != 0 || ru.MaxUnavailable.IntValue() != 1 {
		t.Errorf("node agent update strategy %+v, want maxUnavailable 1 without surge", ru)
	}
	na := children[7].(*appsv1.DaemonSet).Spec.Template.Spec
	if !na.HostNetwork || !*na.Containers[0].SecurityContext.Privileged || envMap(na.Containers[0].Env)["EXCLUDED_NAMESPACES"] != "kube-system,mesh-create" {
		t.Errorf("node agent spec: hostNetwork %v env %v", na.HostNetwork, na.Containers[0].Env)
	}
	// Trust bundle has the root only, never a key.
	cm := children[10].(*corev1.ConfigMap)
	if !strings.Contains(cm.Data[RootCertKey], "BEGIN CERTIFICATE") || strings.Contains(cm.Data[RootCertKey], "PRIVATE KEY") {
		t.Errorf("trust bundle content: %q", cm.Data[RootCertKey])
	}
	// A namespace created later gets the trust bundle too.
	if err := k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "late-ns"}}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "trust bundle in late-ns", exists(&corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: "late-ns", Name: RootCertConfigMap}}))

	// Status transitions: nothing scheduled yet → not ready; DaemonSets
	// partly ready → still not ready; all ready → Ready.
	waitCondition(t, "create", meshv1.ConditionZtunnelReady, metav1.ConditionFalse, meshv1.ReasonDaemonSetNotReady)
	waitCondition(t, "create", meshv1.ConditionReady, metav1.ConditionFalse, meshv1.ReasonComponentsNotReady)
	setDaemonSetStatus(t, ns, ZtunnelName, 3, 1)
	setDaemonSetStatus(t, ns, NodeAgentName, 3, 3)
	waitCondition(t, "create", meshv1.ConditionNodeAgentReady, metav1.ConditionTrue, meshv1.ReasonDaemonSetReady)
	mesh = waitCondition(t, "create", meshv1.ConditionReady, metav1.ConditionFalse, meshv1.ReasonComponentsNotReady)
	eventually(t, "readySummary 1/3", func() error {
		if s := getMesh(t, "create").Status.ReadySummary; s != "1/3" {
			return fmt.Errorf("readySummary %q", s)
		}
		return nil
	})
	setDaemonSetStatus(t, ns, ZtunnelName, 3, 3)
	mesh = waitCondition(t, "create", meshv1.ConditionReady, metav1.ConditionTrue, meshv1.ReasonAllComponentsReady)
	if mesh.Status.Ztunnel != (meshv1.RolloutStatus{Desired: 3, Ready: 3}) || mesh.Status.RootCertExpiry == nil {
		t.Errorf("status counts/expiry: %+v", mesh.Status)
	}

	// Reconciling twice more changes nothing: no object and no status write.
	before := resourceVersions(t, append(children, mesh))
	r := &AmbientMeshReconciler{Client: k8s, APIReader: k8s, Defaults: testDefaults, RetryInterval: time.Hour}
	for i := 0; i < 2; i++ {
		if _, err := r.Reconcile(ctx, ctrl.Request{NamespacedName: client.ObjectKey{Name: "create"}}); err != nil {
			t.Fatalf("reconcile %d: %v", i, err)
		}
	}
	after := resourceVersions(t, append(children, mesh))
	for k, v := range before {
		if after[k] != v {
			t.Errorf("%s changed by an idle reconcile: resourceVersion %s → %s", k, v, after[k])
		}
	}
}

func envMap(env []corev1.EnvVar) map[string]string {
	m := map[string]string{}
	for _, e := range env {
		m[e.Name] = e.Value
	}
	return m
}

func resourceVersions(t *testing.T, objs []client.Object) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, o := range objs {
		if err := k8s.Get(context.Background(), client.ObjectKeyFromObject(o), o); err != nil {
			t.Fatal(err)
		}
		out[fmt.Sprintf("%T %s/%s", o, o.GetNamespace(), o.GetName())] = o.GetResourceVersion()
	}
	return out
}

func TestAmbientMeshUpdateAndDriftRevert(t *testing.T) {
	ctx := context.Background()
	const ns = "mesh-drift"
	newMesh(t, "drift", ns, nil)
	ds := &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: ZtunnelName}}
	eventually(t, "ztunnel DaemonSet", exists(ds))

	t.Run("spec update rolls into the DaemonSets", func(t *testing.T) {
		if err := updateMesh(t, "drift", func(mesh *meshv1.AmbientMesh) {
			mesh.Spec.Ztunnel.LogLevel = "debug"
			mesh.Spec.Ztunnel.Transport = meshv1.TransportHTTP3
			mesh.Spec.Capture.ExcludedNamespaces = []string{"kube-system", "legacy"}
		}); err != nil {
			t.Fatal(err)
		}
		eventually(t, "ztunnel env updated", func() error {
			got := &appsv1.DaemonSet{}
			if err := k8s.Get(ctx, client.ObjectKeyFromObject(ds), got); err != nil {
				return err
			}
			env := envMap(got.Spec.Template.Spec.Containers[0].Env)
			if env["LOG_LEVEL"] != "debug" || env["HBONE_TRANSPORT"] != "HTTP3" {
				return fmt.Errorf("env %v", env)
			}
			return nil
		})
		eventually(t, "node agent exclusions updated", func() error {
			got := &appsv1.DaemonSet{}
			if err := k8s.Get(ctx, client.ObjectKey{Namespace: ns, Name: NodeAgentName}, got); err != nil {
				return err
			}
			if v := envMap(got.Spec.Template.Spec.Containers[0].Env)["EXCLUDED_NAMESPACES"]; v != "kube-system,legacy,mesh-drift" {
				return fmt.Errorf("EXCLUDED_NAMESPACES=%q", v)
			}
			return nil
		})
		if m := getMesh(t, "drift"); m.Generation < 2 {
			t.Fatalf("generation %d", m.Generation)
		}
		waitCondition(t, "drift", meshv1.ConditionReconciled, metav1.ConditionTrue, meshv1.ReasonReconciled)
	})

	t.Run("manual edit of the DaemonSet is reverted", func(t *testing.T) {
		got := &appsv1.DaemonSet{}
		if err := k8s.Get(ctx, client.ObjectKeyFromObject(ds), got); err != nil {
			t.Fatal(err)
		}
		got.Spec.Template.Spec.Containers[0].Image = "evil/ztunnel:latest"
		if err := k8s.Update(ctx, got); err != nil {
			t.Fatal(err)
		}
		eventually(t, "image reverted", func() error {
			if err := k8s.Get(ctx, client.ObjectKeyFromObject(ds), got); err != nil {
				return err
			}
			if img := got.Spec.Template.Spec.Containers[0].Image; img != testDefaults.ZtunnelImage {
				return fmt.Errorf("image %q", img)
			}
			return nil
		})
	})

	for _, obj := range []client.Object{
		&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: ZtunnelName}},
		&appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: NodeAgentName}},
		&corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: ControlPlaneService}},
		&rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: NodeAgentName}},
		&corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: RootCertConfigMap}},
	} {
		t.Run(fmt.Sprintf("deleted %T is recreated", obj), func(t *testing.T) {
			eventually(t, "exists", exists(obj))
			uid := obj.GetUID()
			if err := k8s.Delete(ctx, obj); err != nil {
				t.Fatal(err)
			}
			eventually(t, "recreated", func() error {
				if err := exists(obj)(); err != nil {
					return err
				}
				if obj.GetUID() == uid {
					return fmt.Errorf("still the old object")
				}
				return nil
			})
		})
	}

	t.Run("edited trust bundle is restored", func(t *testing.T) {
		cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: RootCertConfigMap}}
		eventually(t, "exists", exists(cm))
		want := cm.Data[RootCertKey]
		cm.Data[RootCertKey] = "tampered"
		if err := k8s.Update(ctx, cm); err != nil {
			t.Fatal(err)
		}
		eventually(t, "restored", func() error {
			if err := exists(cm)(); err != nil {
				return err
			}
			if cm.Data[RootCertKey] != want {
				return fmt.Errorf("data %q", cm.Data[RootCertKey])
			}
			return nil
		})
	})
}

// reconcileCount reads controller-runtime's reconcile counter for the mesh controller.
func reconcileCount(t *testing.T) float64 {
	t.Helper()
	families, err := metricsRegistryGather()
	if err != nil {
		t.Fatal(err)
	}
	return sumCounter(families, "controller_runtime_reconcile_total", "ambientmesh")
}

func metricsRegistryGather() ([]*dto.MetricFamily, error) { return crmetrics.Registry.Gather() }

// sumCounter adds a counter over every label set of one controller.
func sumCounter(families []*dto.MetricFamily, name, controller string) float64 {
	var n float64
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "controller" && l.GetValue() == controller {
					n += m.GetCounter().GetValue()
				}
			}
		}
	}
	return n
}

func TestAmbientMeshBringYourOwnCA(t *testing.T) {
	ctx := context.Background()
	const ns = "mesh-byo"
	newMesh(t, "byo", ns, func(m *meshv1.AmbientMesh) {
		m.Spec.TrustDomain = "byo.example"
		m.Spec.CA.Type = meshv1.CAFromSecret
		m.Spec.CA.SecretRef = &corev1.LocalObjectReference{Name: "user-ca"}
	})

	// Missing Secret: a specific reason, and retries at RetryInterval rather
	// than in a hot loop. A hot loop would reconcile thousands of times in
	// the window; RetryInterval allows about one per 500ms.
	mesh := waitCondition(t, "byo", meshv1.ConditionReady, metav1.ConditionFalse, meshv1.ReasonCASecretMissing)
	if c := findCondition(mesh, meshv1.ConditionCAReady); c.Reason != meshv1.ReasonCASecretMissing || !strings.Contains(c.Message, "user-ca") {
		t.Fatalf("CAReady: %+v", c)
	}
	start := reconcileCount(t)
	time.Sleep(3 * time.Second)
	if n := reconcileCount(t) - start; n > 12 {
		t.Fatalf("%v reconciles in 3s while the CA Secret is missing: hot loop", n)
	}

	// Invalid Secret: the watch picks it up; reason says invalid.
	user := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "user-ca"}, Data: map[string][]byte{
		"tls.crt": []byte("not a certificate"), "tls.key": []byte("nope"),
	}}
	if err := k8s.Create(ctx, user); err != nil {
		t.Fatal(err)
	}
	waitCondition(t, "byo", meshv1.ConditionCAReady, metav1.ConditionFalse, meshv1.ReasonCASecretInvalid)

	// A CA for another trust domain is refused as well.
	user.Data = userCAData(t, "other.example")
	if err := k8s.Update(ctx, user); err != nil {
		t.Fatal(err)
	}
	eventually(t, "trust domain mismatch reported", func() error {
		c := findCondition(getMesh(t, "byo"), meshv1.ConditionCAReady)
		if c == nil || !strings.Contains(c.Message, "other.example") {
			return fmt.Errorf("%+v", c)
		}
		return nil
	})

	// Valid Secret: CA ready, mirrored into ambient-ca, its root published.
	user.Data = userCAData(t, "byo.example")
	if err := k8s.Update(ctx, user); err != nil {
		t.Fatal(err)
	}
	waitCondition(t, "byo", meshv1.ConditionCAReady, metav1.ConditionTrue, meshv1.ReasonCAIssued)
	mirror := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: CASecretName}}
	eventually(t, "ambient-ca mirror", exists(mirror))
	if string(mirror.Data[CASecretKey]) == "" || string(mirror.Data[CASecretRootCert]) != string(user.Data["tls.crt"]) {
		t.Errorf("mirror does not hold the user's CA")
	}
	cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: RootCertConfigMap}}
	eventually(t, "trust bundle is the user's root", func() error {
		if err := exists(cm)(); err != nil {
			return err
		}
		if cm.Data[RootCertKey] != string(user.Data["tls.crt"]) {
			return fmt.Errorf("bundle differs")
		}
		return nil
	})

	// Deleting the mesh keeps the user's Secret but removes the mirror.
	deleteMesh(t, "byo")
	eventually(t, "mirror removed", gone(mirror))
	if err := exists(user)(); err != nil {
		t.Fatalf("user's CA Secret was deleted: %v", err)
	}
}

func findCondition(mesh *meshv1.AmbientMesh, t string) *metav1.Condition {
	for i := range mesh.Status.Conditions {
		if mesh.Status.Conditions[i].Type == t {
			return &mesh.Status.Conditions[i]
		}
	}
	return nil
}

func TestAmbientMeshDeletionReleasesPodsThenCleansUp(t *testing.T) {
	ctx := context.Background()
	const ns = "mesh-delete"
	newMesh(t, "delete", ns, nil)
	ztunnel := &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: ZtunnelName}}
	cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: RootCertConfigMap}}
	eventually(t, "ztunnel", exists(ztunnel))
	eventually(t, "trust bundle", exists(cm))

	// A pod the node agent captured (as it marks them).
	if err := k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "app-delete"}}); err != nil {
		t.Fatal(err)
	}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "app-delete", Name: "app", Annotations: map[string]string{meshRedirectionLabel: "enabled"}},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "app:1"}}},
	}
	if err := k8s.Create(ctx, pod); err != nil {
		t.Fatal(err)
	}
	podGeneration := pod.Generation

	if err := k8s.Delete(ctx, &meshv1.AmbientMesh{ObjectMeta: metav1.ObjectMeta{Name: "delete"}}); err != nil {
		t.Fatal(err)
	}
	// While the pod is captured, the node components stay so traffic keeps flowing.
	waitCondition(t, "delete", meshv1.ConditionReady, metav1.ConditionFalse, meshv1.ReasonReleasingPods)
	if err := exists(ztunnel)(); err != nil {
		t.Fatalf("ztunnel removed before pods were released: %v", err)
	}
	// The node agent releases the pod (clears the annotation).
	if err := k8s.Get(ctx, client.ObjectKeyFromObject(pod), pod); err != nil {
		t.Fatal(err)
	}
	delete(pod.Annotations, meshRedirectionLabel)
	if err := k8s.Update(ctx, pod); err != nil {
		t.Fatal(err)
	}
	eventually(t, "mesh gone", gone(&meshv1.AmbientMesh{ObjectMeta: metav1.ObjectMeta{Name: "delete"}}))
	for _, obj := range []client.Object{
		ztunnel,
		&appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: NodeAgentName}},
		&corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: ControlPlaneService}},
		&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: ZtunnelName}},
		&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: CASecretName}},
		&rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: NodeAgentName}},
		&rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: NodeAgentName}},
		cm,
		&corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: "app-delete", Name: RootCertConfigMap}},
	} {
		if err := gone(obj)(); err != nil {
			t.Errorf("%T: %v", obj, err)
		}
	}
	// The namespace the mesh created is deleted (it stays Terminating here:
	// envtest runs no namespace controller).
	nsObj := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}
	if err := exists(nsObj)(); err == nil && nsObj.DeletionTimestamp.IsZero() {
		t.Errorf("mesh namespace not deleted")
	}
	// The pod was never restarted or modified by the operator.
	if err := k8s.Get(ctx, client.ObjectKeyFromObject(pod), pod); err != nil {
		t.Fatalf("pod: %v", err)
	}
	if pod.Generation != podGeneration {
		t.Errorf("pod spec changed: generation %d → %d", podGeneration, pod.Generation)
	}
}

func TestAmbientMeshDeletionGivesUpWaitingAfterTimeout(t *testing.T) {
	ctx := context.Background()
	newMesh(t, "stuck", "mesh-stuck", nil)
	eventually(t, "ztunnel", exists(&appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: "mesh-stuck", Name: ZtunnelName}}))
	if err := k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "app-stuck"}}); err != nil {
		t.Fatal(err)
	}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "app-stuck", Name: "app", Annotations: map[string]string{meshRedirectionLabel: "enabled"}},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "app:1"}}},
	}
	if err := k8s.Create(ctx, pod); err != nil {
		t.Fatal(err)
	}
	// No node agent answers: deletion still completes once ReleaseTimeout passes.
	deleteMesh(t, "stuck")
	if err := k8s.Delete(ctx, pod); err != nil {
		t.Fatal(err)
	}
}

// TestZtunnelWorkerThreads: spec.ztunnel.workerThreads becomes ztunnel's
// WORKER_THREADS (its most GOMAXPROCS); out-of-range values are refused by
// the API server.
func TestZtunnelWorkerThreads(t *testing.T) {
	ctx := context.Background()
	const ns = "mesh-workers"
	newMesh(t, "workers", ns, func(m *meshv1.AmbientMesh) { m.Spec.Ztunnel.WorkerThreads = ptr.To(int32(1)) })
	ds := &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: ZtunnelName}}
	eventually(t, "ztunnel DaemonSet", exists(ds))
	if got := envMap(ds.Spec.Template.Spec.Containers[0].Env)["WORKER_THREADS"]; got != "1" {
		t.Fatalf("ztunnel WORKER_THREADS %q, want 1", got)
	}
	bad := &meshv1.AmbientMesh{ObjectMeta: metav1.ObjectMeta{Name: "workers-zero"}, Spec: meshv1.AmbientMeshSpec{Namespace: "mesh-workers-zero"}}
	bad.Spec.Ztunnel.WorkerThreads = ptr.To(int32(0))
	if err := k8s.Create(ctx, bad); err == nil {
		k8s.Delete(ctx, bad)
		t.Fatal("workerThreads 0 accepted")
	}
}

// TestZtunnelTerminationGracePeriod: spec.ztunnel.terminationGracePeriodSeconds
// sets the ztunnel pods' grace period, and ztunnel drains for 5 s less
// (long-lived connections survive an upgrade while they are shorter);
// values too short to drain in are refused by the API server.
func TestZtunnelTerminationGracePeriod(t *testing.T) {
	ctx := context.Background()
	const ns = "mesh-grace"
	newMesh(t, "grace", ns, func(m *meshv1.AmbientMesh) { m.Spec.Ztunnel.TerminationGracePeriodSeconds = ptr.To(int64(120)) })
	ds := &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: ZtunnelName}}
	eventually(t, "ztunnel DaemonSet", exists(ds))
	if g := ds.Spec.Template.Spec.TerminationGracePeriodSeconds; g == nil || *g != 120 {
		t.Fatalf("ztunnel terminationGracePeriodSeconds %v, want 120", g)
	}
	if got := envMap(ds.Spec.Template.Spec.Containers[0].Env)["DRAIN_GRACE"]; got != "1m55s" {
		t.Fatalf("ztunnel DRAIN_GRACE %q, want 1m55s", got)
	}
	bad := &meshv1.AmbientMesh{ObjectMeta: metav1.ObjectMeta{Name: "grace-short"}, Spec: meshv1.AmbientMeshSpec{Namespace: "mesh-grace-short"}}
	bad.Spec.Ztunnel.TerminationGracePeriodSeconds = ptr.To(int64(5))
	if err := k8s.Create(ctx, bad); err == nil {
		k8s.Delete(ctx, bad)
		t.Fatal("terminationGracePeriodSeconds 5 accepted")
	}
}

func TestZtunnelGrace(t *testing.T) {
	for _, tc := range []struct {
		secs          *int64
		period, drain time.Duration
	}{
		{nil, 30 * time.Second, 25 * time.Second},
		{ptr.To(int64(90)), 90 * time.Second, 85 * time.Second},
		{ptr.To(int64(3)), 30 * time.Second, 25 * time.Second}, // below the margin (the CRD refuses it): default
	} {
		period, drain := ztunnelGrace(meshv1.ZtunnelSpec{TerminationGracePeriodSeconds: tc.secs})
		if period != tc.period || drain != tc.drain {
			t.Errorf("ztunnelGrace(%v) = %v, %v; want %v, %v", tc.secs, period, drain, tc.period, tc.drain)
		}
	}
}

// TestInboundCaptureMode: spec.capture.inboundMode reaches the node agents
// (INBOUND_CAPTURE, NAT by default) and condition InboundCapture; TPROXY
// asked of the iptables backend is reported (False, Ready False) and still
// given to the node agents, which refuse it, never turned into NAT; values
// outside NAT/TPROXY are refused by the API server.
func TestInboundCaptureMode(t *testing.T) {
	ctx := context.Background()
	const ns, name = "mesh-inbound", "inbound"
	newMesh(t, name, ns, nil)
	ds := &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: NodeAgentName}}
	agentEnv := func(want string) {
		t.Helper()
		eventually(t, "node agent INBOUND_CAPTURE="+want, func() error {
			if err := k8s.Get(ctx, client.ObjectKeyFromObject(ds), ds); err != nil {
				return err
			}
			if got := envMap(ds.Spec.Template.Spec.Containers[0].Env)["INBOUND_CAPTURE"]; got != want {
				return fmt.Errorf("INBOUND_CAPTURE %q", got)
			}
			return nil
		})
	}
	agentEnv("NAT")
	if m := getMesh(t, name); m.Spec.Capture.InboundMode != meshv1.InboundNAT {
		t.Fatalf("inboundMode defaulted to %q, want NAT", m.Spec.Capture.InboundMode)
	}
	waitCondition(t, name, meshv1.ConditionInboundCapture, metav1.ConditionTrue, "NAT")

	if err := updateMesh(t, name, func(m *meshv1.AmbientMesh) { m.Spec.Capture.InboundMode = meshv1.InboundTPROXY }); err != nil {
		t.Fatal(err)
	}
	agentEnv("TPROXY")
	waitCondition(t, name, meshv1.ConditionInboundCapture, metav1.ConditionTrue, "TPROXY")

	if err := updateMesh(t, name, func(m *meshv1.AmbientMesh) { m.Spec.Capture.Redirection = meshv1.RedirectionIPTables }); err != nil {
		t.Fatal(err)
	}
	m := waitCondition(t, name, meshv1.ConditionInboundCapture, metav1.ConditionFalse, meshv1.ReasonTPROXYNeedsNFTables)
	if c := meta.FindStatusCondition(m.Status.Conditions, meshv1.ConditionReady); c == nil || c.Status != metav1.ConditionFalse || c.Reason != meshv1.ReasonTPROXYNeedsNFTables {
		t.Fatalf("Ready = %+v, want False %s", c, meshv1.ReasonTPROXYNeedsNFTables)
	}
	agentEnv("TPROXY") // fail closed in the node agent, not NAT behind the user's back
	if got := envMap(ds.Spec.Template.Spec.Containers[0].Env)["REDIRECTION_BACKEND"]; got != "iptables" {
		t.Fatalf("REDIRECTION_BACKEND %q", got)
	}

	if err := updateMesh(t, name, func(m *meshv1.AmbientMesh) { m.Spec.Capture.InboundMode = "tproxy" }); err == nil {
		t.Fatal("inboundMode tproxy (lower case) accepted")
	}
	if err := updateMesh(t, name, func(m *meshv1.AmbientMesh) {
		m.Spec.Capture.InboundMode, m.Spec.Capture.Redirection = meshv1.InboundNAT, meshv1.RedirectionNFTables
	}); err != nil {
		t.Fatal(err)
	}
	agentEnv("NAT")
	waitCondition(t, name, meshv1.ConditionInboundCapture, metav1.ConditionTrue, "NAT")
}

// TestCertTTLChangeRollsNoProxy: spec.ca.workloadCertTTL is the CA's
// business (proxies ask for its lifetime), so changing it leaves the
// ztunnel and waypoint pod templates alone: a rollout of every proxy for
// a certificate setting would break new connections mid-rotation.
func TestCertTTLChangeRollsNoProxy(t *testing.T) {
	withTTL := func(ttl time.Duration) *meshv1.AmbientMesh {
		return &meshv1.AmbientMesh{ObjectMeta: metav1.ObjectMeta{Name: "default"},
			Spec: meshv1.AmbientMeshSpec{Namespace: "mesh-root", CA: meshv1.CASpec{WorkloadCertTTL: metav1.Duration{Duration: ttl}}}}
	}
	long, short := withTTL(24*time.Hour), withTTL(10*time.Minute)
	if a, b := DesiredZtunnel(long, Defaults{}).Spec.Template, DesiredZtunnel(short, Defaults{}).Spec.Template; !equality.Semantic.DeepEqual(a, b) {
		t.Errorf("ztunnel template depends on workloadCertTTL:\n%v\n%v", a.Spec.Containers[0].Env, b.Spec.Containers[0].Env)
	}
	w := Waypoint{Name: "wp", Namespace: "app", TrafficType: meshv1.TrafficService, Replicas: 1, Image: "waypoint:test"}
	_, a, _ := DesiredWaypoint(w, long)
	_, b, _ := DesiredWaypoint(w, short)
	if !equality.Semantic.DeepEqual(a.Spec.Template, b.Spec.Template) {
		t.Errorf("waypoint template depends on workloadCertTTL:\n%v\n%v", a.Spec.Template.Spec.Containers[0].Env, b.Spec.Template.Spec.Containers[0].Env)
	}
}

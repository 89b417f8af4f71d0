package controllers

import (
	"context"
	"fmt"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
)

// hostPaths maps a pod's hostPath volumes by name.
func hostPaths(ds *appsv1.DaemonSet) map[string]string {
	out := map[string]string{}
	for _, v := range ds.Spec.Template.Spec.Volumes {
		if v.HostPath != nil {
			out[v.Name] = v.HostPath.Path
		}
	}
	return out
}

// The node agent mounts the distribution's CNI directories: its platform's
// defaults, overridden by explicit directories; the paths inside the
// container (and so its environment) do not change.
func TestNodeAgentCNIDirectories(t *testing.T) {
	for _, tc := range []struct {
		name         string
		cni          meshv1.CNISpec
		conf, binDir string
	}{
		{"unset is standard", meshv1.CNISpec{}, "/etc/cni/net.d", "/opt/cni/bin"},
		{"gke keeps binaries under /home/kubernetes", meshv1.CNISpec{Platform: meshv1.CNIPlatformGKE}, "/etc/cni/net.d", "/home/kubernetes/bin"},
		{"k3s", meshv1.CNISpec{Platform: meshv1.CNIPlatformK3s}, "/var/lib/rancher/k3s/agent/etc/cni/net.d", "/var/lib/rancher/k3s/data/current/bin"},
		{"k3d", meshv1.CNISpec{Platform: meshv1.CNIPlatformK3d}, "/var/lib/rancher/k3s/agent/etc/cni/net.d", "/bin"},
		{"microk8s", meshv1.CNISpec{Platform: meshv1.CNIPlatformMicroK8s}, "/var/snap/microk8s/current/args/cni-network", "/var/snap/microk8s/current/opt/cni/bin"},
		{"explicit directories win over the platform", meshv1.CNISpec{Platform: meshv1.CNIPlatformK3s, ConfDir: "/etc/custom/net.d", BinDir: "/usr/libexec/cni"}, "/etc/custom/net.d", "/usr/libexec/cni"},
		{"one explicit directory keeps the other default", meshv1.CNISpec{BinDir: "/usr/libexec/cni"}, "/etc/cni/net.d", "/usr/libexec/cni"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mesh := &meshv1.AmbientMesh{ObjectMeta: metav1.ObjectMeta{Name: "m"}, Spec: meshv1.AmbientMeshSpec{Namespace: "ambient-system"}}
			mesh.Spec.NodeAgent.CNI = tc.cni
			ds := DesiredNodeAgent(mesh, Defaults{NodeAgentImage: "agent:test"})
			paths := hostPaths(ds)
			if paths["cni-net-dir"] != tc.conf || paths["cni-bin-dir"] != tc.binDir {
				t.Fatalf("host paths conf %q bin %q, want %q %q", paths["cni-net-dir"], paths["cni-bin-dir"], tc.conf, tc.binDir)
			}
			env := envMap(ds.Spec.Template.Spec.Containers[0].Env)
			if env["CNI_CONF_DIR"] != "/host/etc/cni/net.d" || env["CNI_BIN_DIR"] != "/host/opt/cni/bin" {
				t.Fatalf("container paths changed: %q %q", env["CNI_CONF_DIR"], env["CNI_BIN_DIR"])
			}
		})
	}
}

// auto and OpenShift mount the host's / (HostToContainer) and pass host
// paths: none for auto (the agent detects them on each node, explicit ones
// win), OpenShift's fixed ones (the agent follows multus to its delegate).
func TestNodeAgentCNIHostRoot(t *testing.T) {
	for _, tc := range []struct {
		name              string
		cni               meshv1.CNISpec
		wantConf, wantBin string
	}{
		{"auto detects both", meshv1.CNISpec{Platform: meshv1.CNIPlatformAuto}, "", ""},
		{"auto with a conf dir", meshv1.CNISpec{Platform: meshv1.CNIPlatformAuto, ConfDir: "/etc/custom/net.d"}, "/etc/custom/net.d", ""},
		{"openshift", meshv1.CNISpec{Platform: meshv1.CNIPlatformOpenShift}, "/etc/kubernetes/cni/net.d", "/var/lib/cni/bin"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mesh := &meshv1.AmbientMesh{ObjectMeta: metav1.ObjectMeta{Name: "m"}, Spec: meshv1.AmbientMeshSpec{Namespace: "ambient-system"}}
			mesh.Spec.NodeAgent.CNI = tc.cni
			ds := DesiredNodeAgent(mesh, Defaults{NodeAgentImage: "agent:test"})
			paths := hostPaths(ds)
			if paths["host-root"] != "/" || paths["cni-net-dir"] != "" || paths["cni-bin-dir"] != "" {
				t.Fatalf("host paths %v: want the host's / only for CNI", paths)
			}
			c := ds.Spec.Template.Spec.Containers[0]
			env := envMap(c.Env)
			if env["CNI_HOST_ROOT"] != cniHostRoot || env["CNI_CONF_DIR"] != tc.wantConf || env["CNI_BIN_DIR"] != tc.wantBin {
				t.Fatalf("env root %q conf %q bin %q", env["CNI_HOST_ROOT"], env["CNI_CONF_DIR"], env["CNI_BIN_DIR"])
			}
			var mounted bool
			for _, m := range c.VolumeMounts {
				if m.Name == "host-root" {
					mounted = m.MountPath == cniHostRoot && m.MountPropagation != nil && *m.MountPropagation == corev1.MountPropagationHostToContainer
				}
			}
			if !mounted {
				t.Fatalf("host root not mounted at %s with HostToContainer: %+v", cniHostRoot, c.VolumeMounts)
			}
		})
	}
}

// The API server refuses directories that are not absolute host paths and
// platforms it does not know, and the operator renders what it accepted.
func TestNodeAgentCNIValidation(t *testing.T) {
	ctx := context.Background()
	for _, bad := range []meshv1.CNISpec{
		{ConfDir: "etc/cni/net.d"},
		{BinDir: "../opt/cni/bin"},
		{Platform: "openshift-next"},
	} {
		m := &meshv1.AmbientMesh{ObjectMeta: metav1.ObjectMeta{Name: "cni-bad"}, Spec: meshv1.AmbientMeshSpec{Namespace: "mesh-cni-bad"}}
		m.Spec.NodeAgent.CNI = bad
		if err := k8s.Create(ctx, m); err == nil {
			k8s.Delete(ctx, m)
			t.Fatalf("cni %+v accepted", bad)
		}
	}
	const ns = "mesh-cni-k3s"
	newMesh(t, "cni-k3s", ns, func(m *meshv1.AmbientMesh) { m.Spec.NodeAgent.CNI.Platform = meshv1.CNIPlatformK3s })
	ds := &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: NodeAgentName}}
	eventually(t, "node agent DaemonSet", exists(ds))
	if got := hostPaths(ds)["cni-net-dir"]; got != "/var/lib/rancher/k3s/agent/etc/cni/net.d" {
		t.Fatalf("k3s mesh mounts %q", got)
	}
	// Switching the mesh to auto, then openshift: accepted, and the agent is
	// re-rendered with the host's / mounted instead of the two directories.
	for _, p := range []meshv1.CNIPlatform{meshv1.CNIPlatformAuto, meshv1.CNIPlatformOpenShift} {
		// Again on a conflict with the operator's own writes.
		if err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
			m := &meshv1.AmbientMesh{}
			if err := k8s.Get(ctx, client.ObjectKey{Name: "cni-k3s"}, m); err != nil {
				return err
			}
			m.Spec.NodeAgent.CNI.Platform = p
			return k8s.Update(ctx, m)
		}); err != nil {
			t.Fatalf("platform %s refused: %v", p, err)
		}
		eventually(t, "node agent DaemonSet re-rendered for "+string(p), func() error {
			ds := &appsv1.DaemonSet{}
			if err := k8s.Get(ctx, client.ObjectKey{Namespace: ns, Name: NodeAgentName}, ds); err != nil {
				return err
			}
			paths, env := hostPaths(ds), envMap(ds.Spec.Template.Spec.Containers[0].Env)
			if paths["host-root"] != "/" || paths["cni-net-dir"] != "" || env["CNI_HOST_ROOT"] != cniHostRoot {
				return fmt.Errorf("host paths %v, CNI_HOST_ROOT %q", paths, env["CNI_HOST_ROOT"])
			}
			return nil
		})
	}
}

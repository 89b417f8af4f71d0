package agent

import (
	"context"
	"errors"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
	"github.com/ambientmesh/ambient/cmd/ambient-cni/internal/cniinstall"
	"github.com/ambientmesh/ambient/proxylib/discovery/selection"
)

// meshUninstalled reports whether no AmbientMesh remains (none, all being
// deleted, or the CRD gone). A node agent stopping while a mesh exists is
// a restart or upgrade and must leave pods captured.
func meshUninstalled(ctx context.Context, c client.Reader) (bool, error) {
	list := &unstructured.UnstructuredList{}
	list.SetGroupVersionKind(meshv1.GroupVersion.WithKind("AmbientMeshList"))
	err := c.List(ctx, list)
	if meta.IsNoMatchError(err) || apierrors.IsNotFound(err) {
		return true, nil
	}
	if err != nil {
		return false, err
	}
	for _, m := range list.Items {
		if m.GetDeletionTimestamp() == nil {
			return false, nil
		}
	}
	return true, nil
}

// onShutdown releases every pod of the node and removes the CNI plugin
// when the mesh is being uninstalled; otherwise it changes nothing.
func (a *Agent) onShutdown(ctx context.Context, c client.Client, o Options) error {
	gone, err := meshUninstalled(ctx, c)
	if err != nil {
		a.Log.Error(err, "cannot tell whether the mesh is uninstalled; keeping pods captured")
		return err
	}
	if !gone {
		a.Log.Info("stopping; pods stay captured (the mesh still exists)")
		return nil
	}
	a.Log.Info("mesh uninstalled: releasing every captured pod on this node")
	var errs []error
	if o.CNIConfDir != "" {
		errs = append(errs, cniinstall.UninstallConfig(o.CNIConfDir))
	}
	if o.CNIBinDir != "" {
		errs = append(errs, cniinstall.UninstallBinary(o.CNIBinDir))
	}
	a.Client = c // the manager's cache has stopped
	keys := map[types.NamespacedName]bool{}
	for k := range a.Captured() {
		keys[k] = true
	}
	var pods corev1.PodList
	if err := c.List(ctx, &pods, client.MatchingFieldsSelector{Selector: fields.OneTermEqualSelector("spec.nodeName", a.NodeName)}); err != nil {
		errs = append(errs, err)
	}
	byKey := map[types.NamespacedName]*corev1.Pod{}
	for i := range pods.Items {
		p := &pods.Items[i]
		k := client.ObjectKeyFromObject(p)
		byKey[k] = p
		if p.Annotations[selection.RedirectionAnnotation] == selection.RedirectionEnabled {
			keys[k] = true
		}
	}
	a.opMu.Lock()
	defer a.opMu.Unlock()
	for k := range keys {
		errs = append(errs, a.release(ctx, k, byKey[k]))
	}
	if a.Probes != nil {
		errs = append(errs, a.Probes.Remove(a.HostNS))
	}
	return errors.Join(errs...)
}

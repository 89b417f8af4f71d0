package nodeagent

import (
	"context"
	"errors"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
	"github.com/ambientmesh/ambient/proxylib/discovery/selection"
	"github.com/ambientmesh/ambient/proxylib/nodeagent/cniinstall"
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
	a.Client = c // the manager has stopped
	return a.releaseAll(ctx, c, o)
}

// releaseAll removes the CNI plugin and releases every pod of the node that
// this process captured or that carries the capture annotation.
func (a *Agent) releaseAll(ctx context.Context, c client.Client, o Options) error {
	var errs []error
	if o.installsCNI() {
		confDir, binDir, err := o.cniDirs()
		switch {
		case errors.Is(err, cniinstall.ErrNoConfig): // never installed
		case err != nil:
			errs = append(errs, err)
		default:
			if confDir != "" {
				errs = append(errs, cniinstall.UninstallConfigIn(o.CNIHostRoot, confDir))
			}
			if binDir != "" {
				errs = append(errs, cniinstall.UninstallBinary(binDir))
			}
		}
	}
	keys := map[types.NamespacedName]bool{}
	for k := range a.Captured() {
		keys[k] = true
	}
	var pods corev1.PodList
	// No field selector: the manager's cache (already limited to this node)
	// has no index for it; a direct client filters here instead.
	if err := c.List(ctx, &pods); err != nil {
		errs = append(errs, err)
	}
	byKey := map[types.NamespacedName]*corev1.Pod{}
	for i := range pods.Items {
		p := &pods.Items[i]
		if p.Spec.NodeName != a.NodeName {
			continue
		}
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

// meshRemoving reports whether the named AmbientMesh is being deleted (or
// already gone): node agents then release every pod while still running,
// so the operator can finish the removal (docs/interfaces.md, Mesh removal).
func meshRemoving(ctx context.Context, c client.Reader, name string) (bool, error) {
	u := &unstructured.Unstructured{}
	u.SetGroupVersionKind(meshv1.GroupVersion.WithKind("AmbientMesh"))
	err := c.Get(ctx, client.ObjectKey{Name: name}, u)
	if apierrors.IsNotFound(err) || meta.IsNoMatchError(err) {
		return true, nil
	}
	if err != nil {
		return false, err
	}
	return u.GetDeletionTimestamp() != nil, nil
}

// watchMeshRemoval polls the mesh; on removal it releases every pod and
// removes the CNI plugin, and stops capturing; if the mesh comes back, it
// captures again.
func (a *Agent) watchMeshRemoval(ctx context.Context, c client.Client, o Options) error {
	for {
		removing, err := meshRemoving(ctx, c, o.MeshName)
		switch {
		case err != nil:
			a.Log.V(1).Info("cannot read the mesh", "err", err.Error())
		case removing && !a.removing.Load():
			a.removing.Store(true)
			a.Log.Info("mesh is being removed: releasing every captured pod on this node", "mesh", o.MeshName)
			if err := a.releaseAll(ctx, c, o); err != nil {
				a.Log.Error(err, "releasing pods for mesh removal")
				a.removing.Store(false) // retry on the next poll
			}
		case !removing && a.removing.Load():
			a.removing.Store(false)
			a.Log.Info("mesh is back: capturing again", "mesh", o.MeshName)
			if err := a.InitialSync(ctx, c, false); err != nil {
				a.Log.Error(err, "re-capture after mesh came back")
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(2 * time.Second):
		}
	}
}

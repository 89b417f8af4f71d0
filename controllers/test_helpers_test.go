package controllers

import (
	"context"
	"fmt"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
)

const waitTimeout = 30 * time.Second

// eventually polls cond until it returns nil or the timeout passes.
func eventually(t *testing.T, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	var err error
	for time.Now().Before(deadline) {
		if err = cond(); err == nil {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s: %v", what, err)
}

func getMesh(t *testing.T, name string) *meshv1.AmbientMesh {
	t.Helper()
	m := &meshv1.AmbientMesh{}
	if err := k8s.Get(context.Background(), client.ObjectKey{Name: name}, m); err != nil {
		t.Fatalf("get mesh: %v", err)
	}
	return m
}

// waitCondition waits until the mesh's condition has status and reason, for
// the current generation.
func waitCondition(t *testing.T, name, condType string, status metav1.ConditionStatus, reason string) *meshv1.AmbientMesh {
	t.Helper()
	var mesh *meshv1.AmbientMesh
	eventually(t, fmt.Sprintf("%s=%s/%s", condType, status, reason), func() error {
		mesh = getMesh(t, name)
		c := meta.FindStatusCondition(mesh.Status.Conditions, condType)
		if c == nil {
			return fmt.Errorf("no condition; status %+v", mesh.Status)
		}
		if c.Status != status || c.Reason != reason || mesh.Status.ObservedGeneration != mesh.Generation {
			return fmt.Errorf("have %s/%s (%s) at generation %d/%d", c.Status, c.Reason, c.Message, mesh.Status.ObservedGeneration, mesh.Generation)
		}
		return nil
	})
	return mesh
}

// exists returns nil when obj can be read.
func exists(obj client.Object) func() error {
	return func() error { return k8s.Get(context.Background(), client.ObjectKeyFromObject(obj), obj) }
}

// gone returns nil once obj is not found.
func gone(obj client.Object) func() error {
	return func() error {
		err := k8s.Get(context.Background(), client.ObjectKeyFromObject(obj), obj)
		if apierrors.IsNotFound(err) {
			return nil
		}
		if err != nil {
			return err
		}
		return fmt.Errorf("%s/%s still exists", obj.GetNamespace(), obj.GetName())
	}
}

// updateMesh applies mutate to the latest mesh, retrying on conflicts with
// the operator's own writes.
func updateMesh(t *testing.T, name string, mutate func(*meshv1.AmbientMesh)) error {
	t.Helper()
	return retry.RetryOnConflict(retry.DefaultRetry, func() error {
		m := getMesh(t, name)
		mutate(m)
		return k8s.Update(context.Background(), m)
	})
}

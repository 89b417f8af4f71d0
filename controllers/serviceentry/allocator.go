package serviceentry

import (
	"context"
	"time"

	"github.com/go-logr/logr"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/runtime/schema"
	toolscache "k8s.io/client-go/tools/cache"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// GVK is the ServiceEntry kind the allocator watches.
var GVK = schema.GroupVersionKind{Group: "networking.istio.io", Version: "v1", Kind: "ServiceEntry"}

// +kubebuilder:rbac:groups=networking.istio.io,resources=serviceentries/status,verbs=update

// Allocator writes auto-allocated VIPs into ServiceEntry status (Plan),
// on the leader only. It waits for the ServiceEntry CRD, which may be
// installed after the operator starts.
type Allocator struct {
	Client    client.Client // status writes
	Reader    client.Reader // cached reads
	Informers cache.Informers
	Mapper    meta.RESTMapper
	Log       logr.Logger
	// Poll is how often the CRD is looked for (default 10s).
	Poll time.Duration

	cursor Cursor
}

// NeedLeaderElection: one writer.
func (a *Allocator) NeedLeaderElection() bool { return true }

// Start runs until ctx ends.
func (a *Allocator) Start(ctx context.Context) error {
	if a.Poll <= 0 {
		a.Poll = 10 * time.Second
	}
	for !a.installed() {
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(a.Poll):
		}
	}
	kick := make(chan struct{}, 1)
	signal := func(any) {
		select {
		case kick <- struct{}{}:
		default:
		}
	}
	inf, err := a.Informers.GetInformer(ctx, &networkingv1.ServiceEntry{})
	if err != nil {
		return err
	}
	if _, err := inf.AddEventHandler(toolscache.ResourceEventHandlerFuncs{
		AddFunc: signal, UpdateFunc: func(_, o any) { signal(o) }, DeleteFunc: signal,
	}); err != nil {
		return err
	}
	if !toolscache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
		return nil
	}
	a.Log.Info("allocating ServiceEntry VIPs", "ipv4", IPv4Range.String(), "ipv6", IPv6Range.String())
	signal(nil)
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-kick:
		case <-retry.C:
		}
		if err := a.Sync(ctx); err != nil {
			a.Log.Error(err, "allocating ServiceEntry VIPs; retrying")
			retry.Reset(2 * time.Second)
		}
	}
}

func (a *Allocator) installed() bool {
	_, err := a.Mapper.RESTMapping(GVK.GroupKind(), GVK.Version)
	return err == nil
}

// Sync writes the planned addresses once; a write that lost a race
// (conflict) is retried from the newer object by the event it causes.
func (a *Allocator) Sync(ctx context.Context) error {
	var list networkingv1.ServiceEntryList
	if err := a.Reader.List(ctx, &list); err != nil {
		return err
	}
	plan, planErr := Plan(list.Items, &a.cursor)
	for _, se := range list.Items {
		want, ok := plan[client.ObjectKeyFromObject(se)]
		if !ok {
			continue
		}
		upd := se.DeepCopy()
		upd.Status.Addresses = want
		if err := a.Client.Status().Update(ctx, upd); err != nil && !apierrors.IsConflict(err) && !apierrors.IsNotFound(err) {
			return err
		}
		a.Log.V(1).Info("ServiceEntry VIPs", "serviceentry", client.ObjectKeyFromObject(se).String(), "addresses", len(want))
	}
	if planErr != nil {
		a.Log.Error(planErr, "ServiceEntry VIP range")
	}
	return nil
}

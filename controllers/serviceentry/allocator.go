package serviceentry

import (
	"context"
	"time"

	"github.com/go-logr/logr"
	"google.golang.org/protobuf/types/known/timestamppb"
	metav1alpha1 "istio.io/api/meta/v1alpha1"
	networkingv1alpha3 "istio.io/api/networking/v1alpha3"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	toolscache "k8s.io/client-go/tools/cache"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// GVK is the ServiceEntry kind the allocator watches.
var GVK = schema.GroupVersionKind{Group: "networking.istio.io", Version: "v1", Kind: "ServiceEntry"}

// +kubebuilder:rbac:groups=networking.istio.io,resources=serviceentries/status,verbs=update

// Allocator writes auto-allocated VIPs into ServiceEntry status (Plan),
// and an Accepted=False condition on entries the mesh cannot serve
// (Problem), on the leader only. It waits for the ServiceEntry CRD, which may be
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
	// written: the statuses this allocator wrote, by entry, with the
	// resourceVersion they replaced; while the cache still shows that
	// version, the plan uses what was written (no address handed out twice
	// because the cache lags our own writes).
	written map[types.NamespacedName]writtenStatus
}

type writtenStatus struct {
	replaced  string
	addresses []*networkingv1alpha3.ServiceEntryAddress
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
	a.overlayWritten(list.Items)
	plan, planErr := Plan(list.Items, &a.cursor)
	for _, se := range list.Items {
		want, newAddrs := plan[client.ObjectKeyFromObject(se)]
		conds, newConds := conditions(se)
		if !newAddrs && !newConds {
			continue
		}
		upd := se.DeepCopy()
		if newAddrs {
			upd.Status.Addresses = want
		}
		upd.Status.Conditions = conds
		if err := a.Client.Status().Update(ctx, upd); err != nil {
			if apierrors.IsConflict(err) || apierrors.IsNotFound(err) {
				continue
			}
			return err
		}
		if a.written == nil {
			a.written = map[types.NamespacedName]writtenStatus{}
		}
		a.written[client.ObjectKeyFromObject(se)] = writtenStatus{replaced: se.ResourceVersion, addresses: upd.Status.Addresses}
		a.Log.V(1).Info("ServiceEntry status", "serviceentry", client.ObjectKeyFromObject(se).String(), "addresses", len(upd.Status.Addresses), "problem", Problem(se))
	}
	if planErr != nil {
		a.Log.Error(planErr, "ServiceEntry VIP range")
	}
	return nil
}

// overlayWritten replaces, in the listed entries, the statuses the cache
// has not caught up with by what this allocator wrote (on copies), and
// forgets writes the cache shows.
func (a *Allocator) overlayWritten(items []*networkingv1.ServiceEntry) {
	seen := map[types.NamespacedName]bool{}
	for i, se := range items {
		key := client.ObjectKeyFromObject(se)
		seen[key] = true
		w, ok := a.written[key]
		if !ok {
			continue
		}
		if se.ResourceVersion != w.replaced {
			delete(a.written, key)
			continue
		}
		cp := se.DeepCopy()
		cp.Status.Addresses = w.addresses
		items[i] = cp
	}
	for key := range a.written {
		if !seen[key] {
			delete(a.written, key)
		}
	}
}

// conditions are se's status conditions with ours (ConditionAccepted)
// set to False when Problem reports one and removed otherwise; changed
// reports whether that differs from what se has. Other writers'
// conditions are kept.
func conditions(se *networkingv1.ServiceEntry) ([]*metav1alpha1.IstioCondition, bool) {
	problem := Problem(se)
	var out []*metav1alpha1.IstioCondition
	var ours *metav1alpha1.IstioCondition
	for _, c := range se.Status.GetConditions() {
		if c.GetType() == ConditionAccepted {
			ours = c
			continue
		}
		out = append(out, c)
	}
	if problem == "" {
		return out, ours != nil
	}
	if ours != nil && ours.GetStatus() == "False" && ours.GetReason() == ReasonInvalidAddress &&
		ours.GetMessage() == problem && ours.GetObservedGeneration() == se.Generation {
		return se.Status.GetConditions(), false
	}
	return append(out, &metav1alpha1.IstioCondition{Type: ConditionAccepted, Status: "False", Reason: ReasonInvalidAddress,
		Message: problem, ObservedGeneration: se.Generation, LastTransitionTime: timestamppb.Now()}), true
}

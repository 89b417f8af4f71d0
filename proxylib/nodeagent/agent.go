// Package nodeagent is the node agent: it watches the pods of its node and
// their namespaces, decides capture with the shared selection rules,
// installs in-pod redirection and hands each captured pod's network
// namespace to ztunnel; it reverses all of it when a pod leaves the mesh.
// Pods are never restarted.
package nodeagent

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/ambientmesh/ambient/proxylib/discovery/selection"
	"github.com/ambientmesh/ambient/proxylib/inpod"
	"github.com/ambientmesh/ambient/proxylib/kubeevents"
	"github.com/ambientmesh/ambient/proxylib/netnsutil"
	"github.com/ambientmesh/ambient/proxylib/redirect"
)

// Agent holds the node's capture state.
type Agent struct {
	NodeName   string
	Selection  selection.Config
	Client     client.Client // reads may be cached; writes go to the API
	API        client.Reader // uncached reads (CNI path: the pod is brand new)
	Redirector redirect.Redirector
	// DNSRedirector installs the same rules plus DNS capture (UDP and TCP
	// port 53 to ztunnel's DNS proxy); nil: DNS is never captured.
	DNSRedirector redirect.Redirector
	// DNSCapture is the mesh's default (AmbientMesh spec.capture.dnsCapture);
	// a pod's ambient.istio.io/dns-capture annotation overrides it.
	DNSCapture bool
	Syncer     *inpod.Syncer
	Resolver   *Resolver
	// Probes, when set, SNATs the node's own connections (kubelet probes)
	// to captured pods in HostNS (nil: this process's namespace).
	Probes *redirect.ProbeSNAT
	HostNS *os.File
	Log    logr.Logger
	// Events records captures, releases and capture failures on the Pod
	// (nil: none).
	Events *kubeevents.Recorder

	opMu     sync.Mutex  // one pod operation at a time (controller and CNI requests)
	removing atomic.Bool // the mesh is being removed: capture nothing
	mu       sync.Mutex
	captured map[types.NamespacedName]*captured
}

type captured struct {
	uid   types.UID
	netns *os.File // kept open while captured: the namespace stays valid
	ips   []netip.Addr
	// nameservers are the pod's resolvers (its resolv.conf), once found.
	nameservers []string
}

func (a *Agent) init() {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.captured == nil {
		a.captured = map[types.NamespacedName]*captured{}
	}
}

// Captured lists the pods the agent currently captures (for tests/debug).
func (a *Agent) Captured() map[types.NamespacedName]types.UID {
	a.init()
	a.mu.Lock()
	defer a.mu.Unlock()
	out := map[types.NamespacedName]types.UID{}
	for k, c := range a.captured {
		out[k] = c.uid
	}
	return out
}

// errRetry asks the caller to try again later (sandbox not ready yet).
var errRetry = errors.New("retry later")

// Sync brings one pod to its desired state. netnsPath is the CNI
// plugin's namespace path, empty when unknown.
func (a *Agent) Sync(ctx context.Context, r client.Reader, key types.NamespacedName, netnsPath string) (bool, selection.Reason, error) {
	a.init()
	a.opMu.Lock()
	defer a.opMu.Unlock()
	var pod corev1.Pod
	if err := r.Get(ctx, key, &pod); err != nil {
		if apierrors.IsNotFound(err) {
			return false, "pod deleted", a.release(ctx, key, nil)
		}
		return false, "", err
	}
	if pod.Spec.NodeName != a.NodeName && netnsPath == "" {
		return false, "pod is on another node", nil
	}
	if a.removing.Load() {
		return false, "mesh is being removed", a.release(ctx, key, &pod)
	}
	if pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
		return false, "pod finished", a.release(ctx, key, &pod)
	}
	var ns corev1.Namespace
	nsp := &ns
	if err := r.Get(ctx, types.NamespacedName{Name: pod.Namespace}, &ns); err != nil {
		if !apierrors.IsNotFound(err) {
			return false, "", err
		}
		nsp = nil
	}
	want, reason := selection.Decide(a.Selection, nsp, &pod)
	if !want {
		return false, reason, a.release(ctx, key, &pod)
	}
	return true, reason, a.capture(ctx, &pod, netnsPath)
}

// Event reasons of the node agent, recorded on the Pod when its capture
// state changes.
const (
	ReasonCaptured      = "Captured"
	ReasonReleased      = "Released"
	ReasonCaptureFailed = "CaptureFailed"
)

const (
	stateCaptured = "captured"
	stateReleased = "released"
)

// capture redirects the pod's traffic to ztunnel and reports the outcome
// when it differs from the last one.
func (a *Agent) capture(ctx context.Context, pod *corev1.Pod, netnsPath string) error {
	marked := markedCaptured(pod) // before install annotates it
	err := a.install(ctx, pod, netnsPath)
	if errors.Is(err, errRetry) { // the sandbox is not there yet: not a failure
		return err
	}
	ch := kubeevents.Change{Topic: "capture", State: stateCaptured, Event: kubeevents.Event{Type: kubeevents.Normal,
		Reason: ReasonCaptured, Action: "Capture", Note: "traffic redirected to ztunnel on node " + a.NodeName}}
	if marked {
		ch.Assume = stateCaptured // an earlier agent captured it: re-adoption is no news
	}
	if err != nil {
		ch.State = "failed: " + err.Error()
		ch.Event = kubeevents.Event{Type: kubeevents.Warning, Reason: ReasonCaptureFailed, Action: "Capture", Note: err.Error()}
	}
	a.Events.Transition(pod, ch)
	return err
}

func markedCaptured(pod *corev1.Pod) bool {
	return pod.Annotations[selection.RedirectionAnnotation] == selection.RedirectionEnabled
}

func (a *Agent) install(ctx context.Context, pod *corev1.Pod, netnsPath string) error {
	key := client.ObjectKeyFromObject(pod)
	a.mu.Lock()
	cur := a.captured[key]
	a.mu.Unlock()
	if cur != nil && cur.uid != pod.UID { // same name, new pod
		if err := a.release(ctx, key, nil); err != nil {
			return err
		}
		cur = nil
	}
	var ns *os.File
	var err error
	switch {
	case netnsPath != "":
		ns, err = openNetns(netnsPath)
	case cur != nil:
		ns = cur.netns
	default:
		ns, err = a.Resolver.Resolve(pod)
		if errors.Is(err, errNoNetns) {
			return fmt.Errorf("%w: %v", errRetry, err)
		}
	}
	if err != nil {
		return fmt.Errorf("netns of %s: %w", key, err)
	}
	adopt := func() {
		if cur == nil || cur.netns != ns {
			if cur != nil {
				cur.netns.Close()
			}
			a.mu.Lock()
			a.captured[key] = &captured{uid: pod.UID, netns: ns, ips: nsAddrs(ns)}
			a.mu.Unlock()
		}
	}
	dns := a.DNSRedirector != nil && selection.CaptureDNS(a.DNSCapture, pod)
	rd := a.Redirector
	if dns {
		rd = a.DNSRedirector
	}
	// Installed is false when the rules are those of the other DNS choice
	// (a changed annotation or mesh setting): Install replaces them.
	if ok, err := rd.Installed(ns); err != nil || !ok {
		if err := rd.Install(ns); err != nil {
			if cur == nil || cur.netns != ns {
				ns.Close()
			}
			return fmt.Errorf("install redirection for %s: %w", key, err)
		}
		a.Log.Info("redirection installed", "pod", key, "dnsCapture", dns)
	}
	if cur == nil || cur.netns != ns {
		// Two ztunnels share the pod's ports during an upgrade; when the old
		// one closes its listeners, queued connections move to the new one.
		if err := netnsutil.EnableListenerMigration(ns); err != nil {
			a.Log.Info("listener migration unavailable (kernel < 5.14?): a ztunnel upgrade may reset connections queued on the old instance", "pod", key, "err", err.Error())
		}
	}
	adopt() // rules are in place: from here the pod counts as captured
	if a.Probes != nil && (cur == nil || cur.netns != ns) {
		a.mu.Lock()
		ips := a.captured[key].ips
		a.mu.Unlock()
		if err := a.Probes.AddPod(a.HostNS, ips); err != nil {
			return fmt.Errorf("probe SNAT for %s: %w", key, err)
		}
	}
	// PreserveSource tells ztunnel the return path for transparent dials is
	// in place (Install put it there with the rules), InboundTPROXY how
	// inbound connections reach it.
	var nameservers []string
	if dns {
		nameservers = a.nameservers(key, ns)
	}
	wp := inpod.Pod{UID: string(pod.UID), Info: inpod.WorkloadInfo{Name: pod.Name, Namespace: pod.Namespace,
		ServiceAccount: pod.Spec.ServiceAccountName, PreserveSource: rd.PreservesSource(),
		CaptureDNS: dns, DNSNameservers: nameservers, InboundTPROXY: rd.InboundTPROXY()}, Netns: ns}
	if err := a.Syncer.Upsert(ctx, wp); err != nil {
		// The Syncer delivers it later (refusals are retried, a broken
		// connection resends everything); meanwhile the rules make the
		// pod's traffic fail closed, never bypass the mesh.
		a.Log.Info("ztunnel has not taken the pod yet; it will be retried", "pod", key, "reason", err.Error())
	}
	return a.setAnnotation(ctx, pod, true)
}

// nameservers are the captured pod's resolvers, read once from the
// resolv.conf of a process in its namespace (an app container: the sandbox
// has none). Until one runs they are unknown and ztunnel uses its defaults;
// the pod's next update (its containers starting) sends them.
func (a *Agent) nameservers(key types.NamespacedName, ns *os.File) []string {
	a.mu.Lock()
	c := a.captured[key]
	var known []string
	if c != nil {
		known = c.nameservers
	}
	a.mu.Unlock()
	if len(known) > 0 || c == nil || a.Resolver == nil {
		return known
	}
	found := podNameservers(a.Resolver.ProcRoot, ns)
	if len(found) > 0 {
		a.mu.Lock()
		c.nameservers = found
		a.mu.Unlock()
	}
	return found
}

// release undoes capture and reports it on the pod. pod is nil when the
// object is gone.
func (a *Agent) release(ctx context.Context, key types.NamespacedName, pod *corev1.Pod) error {
	if pod == nil {
		a.Events.ForgetKey(kubeevents.Key(&corev1.Pod{}, key.Namespace, key.Name))
		_, err := a.undo(ctx, key, nil)
		return err
	}
	marked := markedCaptured(pod)
	undone, err := a.undo(ctx, key, pod)
	if err == nil && undone {
		ch := kubeevents.Change{Topic: "capture", State: stateReleased, Event: kubeevents.Event{Type: kubeevents.Normal,
			Reason: ReasonReleased, Action: "Release", Note: "redirection to ztunnel removed on node " + a.NodeName}}
		if marked {
			ch.Assume = stateCaptured
		}
		a.Events.Transition(pod, ch)
	}
	return err
}

// undo removes what capture installed; undone reports whether there was
// anything (a pod this agent or an earlier one captured).
func (a *Agent) undo(ctx context.Context, key types.NamespacedName, pod *corev1.Pod) (undone bool, err error) {
	a.mu.Lock()
	cur := a.captured[key]
	a.mu.Unlock()
	var errs []error
	ns := (*os.File)(nil)
	uid := types.UID("")
	var ips []netip.Addr
	if cur != nil {
		ns, uid, ips = cur.netns, cur.uid, cur.ips
	} else if pod != nil && markedCaptured(pod) {
		// Captured by an earlier agent process: find the namespace to clean it.
		uid, ips = pod.UID, podIPs(pod)
		if f, err := a.Resolver.Resolve(pod); err == nil {
			ns = f
		}
	}
	if a.Probes != nil {
		if err := a.Probes.RemovePod(a.HostNS, ips); err != nil {
			errs = append(errs, fmt.Errorf("probe SNAT of %s: %w", key, err))
		}
	}
	if uid != "" {
		if err := a.Syncer.Remove(ctx, string(uid)); err != nil {
			errs = append(errs, fmt.Errorf("release %s in ztunnel: %w", key, err))
		}
	}
	if ns != nil {
		if err := a.Redirector.Remove(ns); err != nil {
			errs = append(errs, fmt.Errorf("remove redirection of %s: %w", key, err))
		} else {
			a.Log.Info("redirection removed", "pod", key)
		}
		ns.Close()
	}
	if cur != nil {
		a.mu.Lock()
		delete(a.captured, key)
		a.mu.Unlock()
	}
	if pod != nil {
		errs = append(errs, a.setAnnotation(ctx, pod, false))
	}
	return uid != "", errors.Join(errs...)
}

// setAnnotation marks a captured pod `ambient.istio.io/redirection: enabled`
// and unmarks it on release (a user's `disabled` is never touched).
func (a *Agent) setAnnotation(ctx context.Context, pod *corev1.Pod, enabled bool) error {
	v, has := pod.Annotations[selection.RedirectionAnnotation]
	if enabled == (has && v == selection.RedirectionEnabled) || (!enabled && v != selection.RedirectionEnabled) {
		return nil
	}
	var patch []byte
	if enabled {
		patch = fmt.Appendf(nil, `{"metadata":{"annotations":{%q:%q}}}`, selection.RedirectionAnnotation, selection.RedirectionEnabled)
	} else {
		patch = fmt.Appendf(nil, `{"metadata":{"annotations":{%q:null}}}`, selection.RedirectionAnnotation)
	}
	err := a.Client.Patch(ctx, pod, client.RawPatch(types.MergePatchType, patch))
	if apierrors.IsNotFound(err) {
		return nil
	}
	return err
}

// ReleaseSandbox handles CNI DEL: the sandbox (and its namespace) is going away.
func (a *Agent) ReleaseSandbox(ctx context.Context, key types.NamespacedName) error {
	a.init()
	a.opMu.Lock()
	defer a.opMu.Unlock()
	return a.release(ctx, key, nil)
}

// InitialSync reconciles every pod on the node, then starts the ztunnel
// syncer, so ztunnel's first snapshot after an agent restart contains
// every pod that is still captured (and ztunnel drops only stale ones).
func (a *Agent) InitialSync(ctx context.Context, r client.Reader, startSyncer bool) error {
	a.init()
	var pods corev1.PodList
	if err := r.List(ctx, &pods); err != nil {
		return err
	}
	for i := range pods.Items {
		p := &pods.Items[i]
		if p.Spec.NodeName != a.NodeName {
			continue
		}
		key := client.ObjectKeyFromObject(p)
		for attempt := 0; ; attempt++ {
			_, _, err := a.Sync(ctx, r, key, "")
			if err == nil {
				break
			}
			if !errors.Is(err, errRetry) || attempt >= 3 {
				a.Log.Error(err, "initial sync of pod", "pod", key)
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	if startSyncer {
		go a.Syncer.Run(ctx)
	}
	return nil
}

package nodeagent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"github.com/go-logr/logr"

	"github.com/ambientmesh/ambient/proxylib/discovery/selection"
	"github.com/ambientmesh/ambient/proxylib/inpod"
	"github.com/ambientmesh/ambient/proxylib/kubeevents"
	"github.com/ambientmesh/ambient/proxylib/nodeagent/cniapi"
	"github.com/ambientmesh/ambient/proxylib/nodeagent/cniinstall"
	"github.com/ambientmesh/ambient/proxylib/redirect"
)

// Options configure a node agent process.
type Options struct {
	NodeName      string
	MeshName      string // AmbientMesh to follow for removal ("" = only on shutdown)
	Selection     selection.Config
	ZtunnelSocket string // inpod.DefaultSocketPath
	CNISocket     string // cniapi.DefaultSocketPath
	StateDir      string // CNI records, e.g. /var/run/ambient/pods
	ProcRoot      string // "/proc"
	Redirect      redirect.Config
	Redirector    redirect.Redirector // nil: nftables with Redirect
	// DNSRedirector is Redirector with DNS capture (Redirect.WithDNS());
	// nil with a nil Redirector: nftables. DNSCapture is the mesh's default,
	// which a pod's ambient.istio.io/dns-capture annotation overrides.
	DNSRedirector redirect.Redirector
	DNSCapture    bool
	// HealthAddr serves /healthz and /readyz (ready after the initial sync,
	// when the capture rules passed their preflight (redirect.Preflight)
	// and, when installing, once the CNI plugin is configured). Empty: off.
	HealthAddr string
	// CNIBinDir/CNIConfDir, when set, receive the plugin binary and its
	// chained entry in the primary network configuration.
	CNIBinDir, CNIConfDir string
	// CNIHostRoot, when set, is the host's / mounted here: CNIBinDir and
	// CNIConfDir are then host paths under it, detected when empty.
	CNIHostRoot string
	// ProbeSNAT rewrites the node's own connections to captured pods
	// (kubelet probes) to a link-local source the pod rules let through.
	// HostNetns is the node namespace path ("" = this process's).
	ProbeSNAT bool
	HostNetns string
	// PluginConf is the plugin's conflist entry (agentSocket etc.).
	PluginConf map[string]any
	Log        logr.Logger
}

// EventSource names the node agent in the Events it records.
const EventSource = "ambient-node-agent"

// Run runs the node agent until ctx ends.
func Run(ctx context.Context, cfg *rest.Config, o Options) error {
	if o.NodeName == "" {
		return errors.New("node name is required")
	}
	if o.ProcRoot == "" {
		o.ProcRoot = "/proc"
	}
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		return err
	}
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme:                 scheme,
		Logger:                 o.Log,
		Metrics:                metricsserver.Options{BindAddress: "0"},
		HealthProbeBindAddress: "0",
		Cache: cache.Options{ByObject: map[client.Object]cache.ByObject{
			&corev1.Pod{}: {Field: fields.OneTermEqualSelector("spec.nodeName", o.NodeName)},
		}},
	})
	if err != nil {
		return err
	}
	a := &Agent{
		NodeName:      o.NodeName,
		Selection:     o.Selection,
		Client:        mgr.GetClient(),
		API:           mgr.GetAPIReader(),
		Redirector:    o.Redirector,
		DNSRedirector: o.DNSRedirector,
		DNSCapture:    o.DNSCapture,
		Syncer:        inpod.NewSyncer(o.ZtunnelSocket, o.Log.WithName("zds")),
		Resolver:      &Resolver{Store: &Store{Dir: o.StateDir}, ProcRoot: o.ProcRoot},
		Log:           o.Log,
		Events:        kubeevents.New(mgr.GetEventRecorder(EventSource)),
	}
	if a.Redirector == nil {
		a.Redirector = redirect.NewNFTables(o.Redirect)
		if a.DNSRedirector == nil {
			a.DNSRedirector = redirect.NewNFTables(o.Redirect.WithDNS())
		}
	}
	// The capture rules are tried once in a scratch namespace: a kernel
	// that lacks what they need (nft_tproxy for TPROXY capture, policy
	// routing) is named here, once, and keeps this agent not ready. Each
	// capture still fails closed on its own (the pod does not start).
	preflightErr := redirect.Preflight(a.Redirector)
	if preflightErr == nil && a.DNSRedirector != nil {
		preflightErr = redirect.Preflight(a.DNSRedirector)
	}
	if preflightErr != nil {
		o.Log.Error(preflightErr, "capture rules cannot be installed on this node: no pod can be captured, and this agent stays not ready")
	}
	if o.ProbeSNAT {
		if o.HostNetns != "" {
			if a.HostNS, err = openNetns(o.HostNetns); err != nil {
				return err
			}
			defer a.HostNS.Close()
		}
		a.Probes = &redirect.ProbeSNAT{}
		if err := a.Probes.Ensure(a.HostNS); err != nil {
			return err
		}
	}
	var synced, cniReady atomic.Bool
	cniReady.Store(!o.installsCNI())
	if err := a.setupController(mgr); err != nil {
		return err
	}
	// Initial pass before ztunnel hears anything (see InitialSync).
	if err := mgr.Add(manager(func(ctx context.Context) error {
		if !mgr.GetCache().WaitForCacheSync(ctx) {
			return errors.New("cache did not sync")
		}
		if o.MeshName != "" {
			// Know about a removal in progress before capturing anything.
			if removing, err := meshRemoving(ctx, mgr.GetAPIReader(), o.MeshName); err == nil && removing {
				a.removing.Store(true)
			}
		}
		if err := a.InitialSync(ctx, mgr.GetClient(), true); err != nil {
			return err
		}
		synced.Store(true)
		<-ctx.Done()
		return nil
	})); err != nil {
		return err
	}
	if o.MeshName != "" {
		if err := mgr.Add(manager(func(ctx context.Context) error {
			if !mgr.GetCache().WaitForCacheSync(ctx) {
				return nil
			}
			return a.watchMeshRemoval(ctx, mgr.GetClient(), o)
		})); err != nil {
			return err
		}
	}
	if o.installsCNI() {
		if err := mgr.Add(manager(func(ctx context.Context) error { return keepCNIInstalled(ctx, o, &cniReady, &a.removing) })); err != nil {
			return err
		}
	}
	if o.HealthAddr != "" {
		if err := mgr.Add(manager(func(ctx context.Context) error {
			return serveHealth(ctx, o.HealthAddr, func() error {
				switch {
				case preflightErr != nil:
					return preflightErr
				case !synced.Load():
					return errors.New("initial sync not done")
				case !cniReady.Load():
					return errors.New("CNI plugin not installed yet")
				}
				return nil
			})
		})); err != nil {
			return err
		}
	}
	if err := mgr.Add(manager(func(ctx context.Context) error { return a.ServeCNI(ctx, o.CNISocket) })); err != nil {
		return err
	}
	err = mgr.Start(ctx)
	// Uninstall check with a fresh deadline: ctx is already done.
	sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if c, cerr := client.New(cfg, client.Options{Scheme: scheme}); cerr == nil {
		_ = a.onShutdown(sctx, c, o)
	}
	return err
}

type manager func(context.Context) error

func (m manager) Start(ctx context.Context) error { return m(ctx) }

func (a *Agent) setupController(mgr ctrl.Manager) error {
	nsToPods := handler.EnqueueRequestsFromMapFunc(func(ctx context.Context, o client.Object) []reconcile.Request {
		var pods corev1.PodList
		if err := mgr.GetClient().List(ctx, &pods, client.InNamespace(o.GetName())); err != nil {
			a.Log.Error(err, "list pods of namespace", "namespace", o.GetName())
			return nil
		}
		reqs := make([]reconcile.Request, 0, len(pods.Items))
		for _, p := range pods.Items {
			reqs = append(reqs, reconcile.Request{NamespacedName: client.ObjectKeyFromObject(&p)})
		}
		return reqs
	})
	return ctrl.NewControllerManagedBy(mgr).
		Named("ambient-node-agent").
		// One agent per process in production; tests restart agents in one process.
		WithOptions(controller.Options{SkipNameValidation: ptr.To(true)}).
		For(&corev1.Pod{}).
		Watches(&corev1.Namespace{}, nsToPods, builder.WithPredicates()).
		Complete(reconcile.Func(func(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
			captured, reason, err := a.Sync(ctx, mgr.GetClient(), req.NamespacedName, "")
			if errors.Is(err, errRetry) {
				return reconcile.Result{RequeueAfter: time.Second}, nil
			}
			if err == nil {
				a.Log.V(1).Info("pod synced", "pod", req.NamespacedName, "captured", captured, "reason", string(reason))
			}
			return reconcile.Result{}, err
		}))
}

// keepCNIInstalled keeps the plugin binary and its chained entry in place:
// it re-checks periodically, since the cluster's network plugin may
// (re)write its configuration after us and the directories may move.
func keepCNIInstalled(ctx context.Context, o Options, ready, removing *atomic.Bool) error {
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	installedIn := "" // refreshed once per directory: an upgrade replaces an old binary
	for {
		if !removing.Load() { // the mesh is going away: the plugin stays out
			ok, bin := installCNIOnce(o, exe, installedIn)
			installedIn = bin
			ready.Store(ok || ready.Load())
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(5 * time.Second):
		}
	}
}

// installCNIOnce installs what is missing; it reports whether the plugin is
// in place and the binary directory it is in.
func installCNIOnce(o Options, exe, installedIn string) (bool, string) {
	confDir, binDir, err := o.cniDirs()
	if errors.Is(err, cniinstall.ErrNoConfig) {
		o.Log.V(1).Info("waiting for the cluster network plugin's configuration")
		return false, installedIn
	}
	if err != nil {
		o.Log.Error(err, "locate the CNI directories")
		return false, installedIn
	}
	if binDir != "" {
		_, statErr := os.Stat(filepath.Join(binDir, cniinstall.PluginType))
		if binDir != installedIn || statErr != nil {
			if err := cniinstall.InstallBinary(exe, binDir); err != nil {
				o.Log.Error(err, "install CNI binary", "dir", binDir)
				return false, installedIn
			}
			installedIn = binDir
		}
	}
	changed, err := cniinstall.InstallConfigIn(o.CNIHostRoot, confDir, o.PluginConf)
	switch {
	case err == nil:
		if changed {
			o.Log.Info("CNI plugin configured", "dir", confDir, "bin", binDir)
		}
		return true, installedIn
	case errors.Is(err, cniinstall.ErrNoConfig):
		o.Log.V(1).Info("waiting for the cluster network plugin's configuration", "dir", confDir)
	default:
		o.Log.Error(err, "configure CNI plugin", "dir", confDir)
	}
	return false, installedIn
}

// serveHealth serves /healthz and /readyz; notReady says why the agent is
// not ready (nil: ready), in the 503's body.
func serveHealth(ctx context.Context, addr string, notReady func() error) error {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusOK) })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if err := notReady(); err != nil {
			http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		w.WriteHeader(http.StatusOK)
	})
	srv := &http.Server{Addr: addr, Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() { <-ctx.Done(); srv.Close() }()
	if err := srv.ListenAndServe(); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// ServeCNI serves the CNI plugin's requests on a unix socket until ctx ends.
func (a *Agent) ServeCNI(ctx context.Context, path string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return err
	}
	_ = os.Remove(path)
	ln, err := net.Listen("unix", path)
	if err != nil {
		return err
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+cniapi.PathAdd, a.handleAdd)
	mux.HandleFunc("POST "+cniapi.PathDel, a.handleDel)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() { <-ctx.Done(); srv.Close() }()
	if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

func decodeEvent(w http.ResponseWriter, r *http.Request) (cniapi.PodEvent, bool) {
	var ev cniapi.PodEvent
	if err := json.NewDecoder(io.LimitReader(r.Body, 64<<10)).Decode(&ev); err != nil || ev.PodName == "" || ev.PodNamespace == "" {
		http.Error(w, fmt.Sprintf("bad request: %v", err), http.StatusBadRequest)
		return ev, false
	}
	return ev, true
}

// handleAdd captures a new sandbox before its containers start.
func (a *Agent) handleAdd(w http.ResponseWriter, r *http.Request) {
	ev, ok := decodeEvent(w, r)
	if !ok {
		return
	}
	key := types.NamespacedName{Namespace: ev.PodNamespace, Name: ev.PodName}
	var pod corev1.Pod
	if err := a.API.Get(r.Context(), key, &pod); err != nil {
		http.Error(w, fmt.Sprintf("get pod %s: %v", key, err), http.StatusServiceUnavailable)
		return
	}
	if ev.PodUID != "" && string(pod.UID) != ev.PodUID {
		http.Error(w, fmt.Sprintf("pod %s has uid %s, runtime says %s", key, pod.UID, ev.PodUID), http.StatusConflict)
		return
	}
	netnsPath := a.reachableNetns(ev)
	if ev.Netns != "" {
		if err := a.Resolver.Store.Put(Record{UID: string(pod.UID), ContainerID: ev.ContainerID, Netns: ev.Netns, PodName: ev.PodName, PodNamespace: ev.PodNamespace}); err != nil {
			a.Log.Error(err, "record sandbox", "pod", key)
		}
	}
	// Give a (re)starting ztunnel a moment so the pod's listeners exist
	// before its containers start. If ztunnel stays away the pod is still
	// captured (rules in place, traffic fails closed) and ztunnel receives
	// it in its next snapshot.
	select {
	case <-a.Syncer.Synced():
	case <-time.After(5 * time.Second):
		a.Log.Info("ztunnel not connected; pod will be handed over when it is", "pod", key)
	case <-r.Context().Done():
	}
	captured, reason, err := a.Sync(r.Context(), a.API, key, netnsPath)
	if err != nil {
		http.Error(w, fmt.Sprintf("capture %s: %v", key, err), http.StatusInternalServerError)
		return
	}
	a.Log.Info("CNI add", "pod", key, "captured", captured, "reason", string(reason))
	_ = json.NewEncoder(w).Encode(cniapi.AddResponse{Captured: captured, Reason: string(reason)})
}

// reachableNetns picks a path to the sandbox's namespace that this process
// can open: the runtime's path, or the plugin's open descriptor via /proc.
func (a *Agent) reachableNetns(ev cniapi.PodEvent) string {
	if f, err := openNetns(ev.Netns); err == nil {
		f.Close()
		return ev.Netns
	}
	if ev.PluginPID > 0 && ev.NetnsFD >= 0 {
		p := filepath.Join(a.Resolver.ProcRoot, strconv.Itoa(ev.PluginPID), "fd", strconv.Itoa(ev.NetnsFD))
		if f, err := openNetns(p); err == nil {
			f.Close()
			return p
		}
	}
	return ev.Netns // let Sync report the error
}

// handleDel releases a sandbox that is being torn down.
func (a *Agent) handleDel(w http.ResponseWriter, r *http.Request) {
	ev, ok := decodeEvent(w, r)
	if !ok {
		return
	}
	key := types.NamespacedName{Namespace: ev.PodNamespace, Name: ev.PodName}
	if err := a.ReleaseSandbox(r.Context(), key); err != nil {
		a.Log.Error(err, "CNI del", "pod", key) // best effort: the sandbox is going away anyway
	}
	if rec, ok := a.Resolver.Store.ByContainer(ev.ContainerID); ok && ev.ContainerID != "" {
		a.Resolver.Store.Delete(rec.UID)
	}
	w.WriteHeader(http.StatusNoContent)
}

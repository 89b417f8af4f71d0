// Package controlplane runs the mesh's control-plane servers inside the
// operator's manager: discovery (delta xDS, :15010), the CA
// (CreateCertificate, :15012) and the debug endpoint (:15014, HTTPS). Both gRPC
// servers use TLS with a certificate for ambient-controlplane.<ns>.svc issued
// by the mesh CA (Secret <ns>/ambient-ca, written by the operator).
package controlplane

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sort"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	securityv1beta1 "istio.io/client-go/pkg/apis/security/v1beta1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwv1beta1 "sigs.k8s.io/gateway-api/apis/v1beta1"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
	"github.com/ambientmesh/ambient/controllers/caserver"
	"github.com/ambientmesh/ambient/controllers/discovery"
	"github.com/ambientmesh/ambient/controllers/httpauth"
	"github.com/ambientmesh/ambient/controllers/proxyauth"
	"github.com/ambientmesh/ambient/controllers/serviceentry"
	"github.com/ambientmesh/ambient/proxylib/ca"
	"github.com/ambientmesh/ambient/proxylib/caclient/capb/caservice"
	"github.com/ambientmesh/ambient/proxylib/kubeevents"
)

// Options configure the control plane.
type Options struct {
	// Namespace of the mesh (and of Secret ambient-ca) until an AmbientMesh
	// names another.
	Namespace string
	// Listen addresses; empty disables that server.
	XDSAddress, CAAddress, DebugAddress string
	// Listeners, when set, replace the addresses (tests).
	XDSListener, CAListener, DebugListener net.Listener
	// ServiceName of the control-plane Service (for the serving certificate).
	ServiceName string
	// CASecretName holds the signing CA (ca.crt, ca.key, root.crt).
	CASecretName string
	Log          logr.Logger
	// Events records what operators act on: policies translated with
	// dropped rules, pushes refused by a proxy. SetupWithManager defaults it
	// to the manager's recorder; nil records nothing.
	Events *kubeevents.Recorder
	// Elected closes when this replica leads; policy Events are recorded
	// by the leader only (SetupWithManager: mgr.Elected()).
	Elected <-chan struct{}
	// CAWatcher watches the CA Secret so every replica (the leader writes
	// it, followers only read) signs with the new CA as soon as it is
	// written; SetupWithManager builds one. Nil: only the periodic reload.
	CAWatcher client.WithWatch
	// CAReload is the periodic reload of the CA Secret besides the watch
	// (default a minute).
	CAReload time.Duration
}

// EventSource names the control plane in the Events it records.
const EventSource = "ambient-controlplane"

func (o *Options) defaults() {
	if o.Namespace == "" {
		o.Namespace = "ambient-system"
	}
	if o.ServiceName == "" {
		o.ServiceName = "ambient-controlplane"
	}
	if o.CASecretName == "" {
		o.CASecretName = "ambient-ca"
	}
}

// Setup registers the control plane with mgr. It runs on every replica (no
// leader election needed: it only reads): each replica's caches watch the
// API, and each loads the CA the leader wrote from Secret ambient-ca,
// watching it for changes. Register Ready as the manager's readiness.
func Setup(mgr ctrl.Manager, o Options) error {
	_, err := SetupWithManager(mgr, o)
	return err
}

// SetupWithManager is Setup, returning the control plane (tests, benchmarks).
func SetupWithManager(mgr ctrl.Manager, o Options) (*ControlPlane, error) {
	o.defaults()
	if o.Events == nil {
		o.Events = kubeevents.New(mgr.GetEventRecorder(EventSource))
	}
	if o.Elected == nil {
		o.Elected = mgr.Elected()
	}
	if err := AddToScheme(mgr.GetScheme()); err != nil {
		return nil, err
	}
	if err := mgr.GetFieldIndexer().IndexField(context.Background(), &corev1.Pod{}, caserver.NodeIndexField, func(obj client.Object) []string {
		if n := obj.(*corev1.Pod).Spec.NodeName; n != "" {
			return []string{n}
		}
		return nil
	}); err != nil {
		return nil, fmt.Errorf("indexing pods by node: %w", err)
	}
	if o.CAWatcher == nil {
		w, err := client.NewWithWatch(mgr.GetConfig(), client.Options{Scheme: mgr.GetScheme(), Mapper: mgr.GetRESTMapper()})
		if err != nil {
			return nil, fmt.Errorf("CA Secret watch client: %w", err)
		}
		o.CAWatcher = w
	}
	cp := New(mgr.GetCache(), mgr.GetClient(), mgr.GetAPIReader(), o)
	if err := cp.Discovery.Register(context.Background(), mgr.GetCache(), mgr.GetRESTMapper()); err != nil {
		return nil, err
	}
	// ServiceEntry VIPs are allocated by the leader and kept in status.
	if err := mgr.Add(&serviceentry.Allocator{Client: mgr.GetClient(), Reader: mgr.GetCache(), Informers: mgr.GetCache(),
		Mapper: mgr.GetRESTMapper(), Log: o.Log.WithName("serviceentry-vips")}); err != nil {
		return nil, err
	}
	return cp, mgr.Add(cp)
}

// AddToScheme registers the kinds the control plane watches besides the
// operator's own: Istio security (v1, v1beta1), Istio networking's
// ServiceEntry and WorkloadEntry (v1) and the Gateway API (v1, and v1beta1
// for ReferenceGrants).
func AddToScheme(s *runtime.Scheme) error {
	for _, add := range []func(*runtime.Scheme) error{securityv1.AddToScheme, securityv1beta1.AddToScheme, networkingv1.AddToScheme, gwv1.Install, gwv1beta1.Install} {
		if err := add(s); err != nil {
			return err
		}
	}
	return nil
}

// RBAC of the control plane (collected by `make manifests`):
// +kubebuilder:rbac:groups="",resources=pods;services;namespaces,verbs=get;list;watch
// +kubebuilder:rbac:groups="",resources=nodes,verbs=get;list;watch
// +kubebuilder:rbac:groups="",resources=secrets,verbs=get;list;watch
// +kubebuilder:rbac:groups=apps,resources=replicasets;deployments,verbs=get
// +kubebuilder:rbac:groups=discovery.k8s.io,resources=endpointslices,verbs=get;list;watch
// +kubebuilder:rbac:groups=authentication.k8s.io,resources=tokenreviews,verbs=create
// +kubebuilder:rbac:groups=authorization.k8s.io,resources=subjectaccessreviews,verbs=create
// +kubebuilder:rbac:groups=security.istio.io,resources=authorizationpolicies;peerauthentications,verbs=get;list;watch
// +kubebuilder:rbac:groups=networking.istio.io,resources=serviceentries;workloadentries,verbs=get;list;watch
// +kubebuilder:rbac:groups=gateway.networking.k8s.io,resources=gateways;httproutes;grpcroutes;tlsroutes;tcproutes;referencegrants,verbs=get;list;watch
// +kubebuilder:rbac:groups=mesh.ambient.dev,resources=ambientmeshes;waypointpolicies,verbs=get;list;watch
// +kubebuilder:rbac:groups=events.k8s.io,resources=events,verbs=create;patch

// ControlPlane is the runnable holding the three servers.
type ControlPlane struct {
	opts      Options
	cache     interface{ WaitForCacheSync(context.Context) bool }
	reader    client.Reader
	apiReader client.Reader
	Discovery *discovery.Controller
	Auth      *proxyauth.Authenticator
	certs     *certSource
	// serving is set once the servers listen; caMissing while the CA
	// Secret does not exist yet (see Ready).
	serving, caMissing atomic.Bool
}

// New builds the control plane over a cache-backed reader (which must index
// pods by NodeIndexField), a client for TokenReviews and an uncached reader
// for Secrets.
func New(cache client.Reader, c client.Client, apiReader client.Reader, o Options) *ControlPlane {
	o.defaults()
	d := discovery.NewController(cache, discovery.Options{MeshNamespace: o.Namespace, Log: o.Log.WithName("discovery"), Events: o.Events, Elected: o.Elected})
	cp := &ControlPlane{opts: o, reader: cache, apiReader: apiReader, Discovery: d}
	if w, ok := cache.(interface{ WaitForCacheSync(context.Context) bool }); ok {
		cp.cache = w
	}
	cp.Auth = &proxyauth.Authenticator{
		Client: c, Pods: cache, APIReader: apiReader,
		MeshNamespace: func() string { return cp.meshSettings(context.Background()).namespace },
		IsL7Proxy:     d.IsL7Proxy,
	}
	cp.certs = &certSource{load: cp.loadAuthority, dnsNames: cp.dnsNames, log: o.Log.WithName("serving-cert"),
		every: o.CAReload, changed: make(chan struct{}, 1)}
	return cp
}

// NeedLeaderElection: every replica serves.
func (cp *ControlPlane) NeedLeaderElection() bool { return false }

type meshSettings struct {
	namespace, trustDomain, clusterDomain string
	workloadTTL                           time.Duration
}

func (cp *ControlPlane) meshSettings(ctx context.Context) meshSettings {
	s := meshSettings{namespace: cp.opts.Namespace, trustDomain: "cluster.local", clusterDomain: "cluster.local", workloadTTL: 24 * time.Hour}
	var meshes meshv1.AmbientMeshList
	if err := cp.reader.List(ctx, &meshes); err == nil && len(meshes.Items) > 0 {
		sort.Slice(meshes.Items, func(i, j int) bool {
			return meshes.Items[i].CreationTimestamp.Before(&meshes.Items[j].CreationTimestamp)
		})
		m := meshes.Items[0].Spec
		if m.Namespace != "" {
			s.namespace = m.Namespace
		}
		if m.TrustDomain != "" {
			s.trustDomain = m.TrustDomain
		}
		if m.ClusterDomain != "" {
			s.clusterDomain = m.ClusterDomain
		}
		if m.CA.WorkloadCertTTL.Duration > 0 {
			s.workloadTTL = m.CA.WorkloadCertTTL.Duration
		}
	}
	return s
}

func (cp *ControlPlane) dnsNames() []string {
	m := cp.meshSettings(context.Background())
	ns, svc := m.namespace, cp.opts.ServiceName
	return []string{svc + "." + ns + ".svc", svc + "." + ns + ".svc." + m.clusterDomain, svc + "." + ns, svc}
}

// loadAuthority reads the CA Secret from the API server (Secrets are never
// cached by the operator).
func (cp *ControlPlane) loadAuthority(ctx context.Context) (*ca.Authority, error) {
	var s corev1.Secret
	key := client.ObjectKey{Namespace: cp.meshSettings(ctx).namespace, Name: cp.opts.CASecretName}
	if err := cp.apiReader.Get(ctx, key, &s); err != nil {
		return nil, fmt.Errorf("reading CA secret %s: %w", key, err)
	}
	return ca.LoadAuthority(s.Data["ca.crt"], s.Data["ca.key"], s.Data["root.crt"])
}

// Start waits for the caches, then runs the model and the servers.
func (cp *ControlPlane) Start(ctx context.Context) error {
	log := cp.opts.Log
	if cp.cache != nil && !cp.cache.WaitForCacheSync(ctx) {
		return errors.New("control plane: caches did not sync")
	}
	go cp.Discovery.Run(ctx)
	go cp.Discovery.WatchLateCRDs(ctx, 10*time.Second)
	if cp.opts.CAWatcher != nil {
		go cp.watchCA(ctx)
	}
	// The CA Secret may not exist yet (the operator writes it once an
	// AmbientMesh exists): wait for it without failing the manager.
	for {
		err := cp.certs.refresh(ctx)
		cp.caMissing.Store(apierrors.IsNotFound(err))
		if err == nil {
			break
		}
		log.Info("waiting for the mesh CA", "reason", err.Error())
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(5 * time.Second):
		case <-cp.certs.changed:
		}
	}
	go cp.certs.run(ctx)
	errs := make(chan error, 3)
	running := 0
	if lis, err := listen(cp.opts.XDSListener, cp.opts.XDSAddress); err != nil {
		return err
	} else if lis != nil {
		srv := &discovery.Server{Controller: cp.Discovery, Auth: cp.Auth, TLS: cp.certs.tlsConfig(), Log: log.WithName("xds"), Events: cp.opts.Events}
		running++
		go func() { errs <- srv.Serve(ctx, lis) }()
	}
	if lis, err := listen(cp.opts.CAListener, cp.opts.CAAddress); err != nil {
		return err
	} else if lis != nil {
		running++
		go func() { errs <- cp.serveCA(ctx, lis) }()
	}
	if lis, err := listen(cp.opts.DebugListener, cp.opts.DebugAddress); err != nil {
		return err
	} else if lis != nil {
		// The dump lists every workload and policy: only callers whose RBAC
		// grants GET on the URL (see config/rbac/controlplane_debug_role.yaml).
		// It takes bearer tokens, so it speaks TLS only (the serving
		// certificate of xDS and the CA, HTTP/1.1).
		guard := &httpauth.Authorizer{Client: cp.Auth.Client, Log: cp.opts.Log.WithName("debug")}
		hs := &http.Server{Handler: guard.Handler(cp.Discovery.DebugHandler()), ReadHeaderTimeout: 5 * time.Second}
		tlsCfg := cp.certs.tlsConfig()
		tlsCfg.NextProtos = []string{"http/1.1"}
		lis = tls.NewListener(lis, tlsCfg)
		go func() {
			<-ctx.Done()
			_ = hs.Close()
		}()
		running++
		go func() {
			if err := hs.Serve(lis); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errs <- err
				return
			}
			errs <- nil
		}()
	}
	cp.serving.Store(true)
	defer cp.serving.Store(false)
	for ; running > 0; running-- {
		if err := <-errs; err != nil {
			return err
		}
	}
	return nil
}

// Ready is the replica's readiness (a healthz.Checker): ready once discovery
// and the CA listen, and also while no CA Secret exists at all (a new
// install: no proxy can need this replica yet, and the webhooks needed to
// create the AmbientMesh must be reachable). Readiness never depends on
// leadership: every replica serves.
func (cp *ControlPlane) Ready(*http.Request) error {
	if cp.serving.Load() || cp.caMissing.Load() {
		return nil
	}
	return errors.New("control plane not serving yet (caches syncing or mesh CA unreadable)")
}

// watchCA nudges a CA reload whenever Secret <mesh-ns>/<CASecretName>
// changes; the leader writes it, every replica signs with it. The watch
// selects that one Secret by name, so no other Secret reaches this process.
func (cp *ControlPlane) watchCA(ctx context.Context) {
	for ctx.Err() == nil {
		ns := cp.meshSettings(ctx).namespace
		w, err := cp.opts.CAWatcher.Watch(ctx, &corev1.SecretList{}, client.InNamespace(ns),
			client.MatchingFieldsSelector{Selector: fields.OneTermEqualSelector("metadata.name", cp.opts.CASecretName)})
		if err != nil {
			cp.opts.Log.Info("watching the CA Secret failed; retrying", "error", err.Error())
		} else {
			for ev := range w.ResultChan() {
				if ev.Type == watch.Error {
					break
				}
				cp.certs.nudge()
			}
			w.Stop()
		}
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}

func listen(l net.Listener, addr string) (net.Listener, error) {
	if l != nil || addr == "" {
		return l, nil
	}
	return net.Listen("tcp", addr)
}

// CAServer returns the CreateCertificate implementation (for tests and Start).
func (cp *ControlPlane) CAServer() *caserver.Server {
	return &caserver.Server{
		Auth:      cp.Auth,
		Authority: cp.certs.authority,
		Config: func(ctx context.Context) caserver.Config {
			s := cp.meshSettings(ctx)
			return caserver.Config{TrustDomain: s.trustDomain, WorkloadCertTTL: s.workloadTTL}
		},
		Pods:      cp.reader,
		IsL7Proxy: cp.Discovery.IsL7Proxy,
		Log:       cp.opts.Log.WithName("ca"),
	}
}

func (cp *ControlPlane) serveCA(ctx context.Context, lis net.Listener) error {
	gs := grpc.NewServer(grpc.Creds(credentials.NewTLS(cp.certs.tlsConfig())), grpc.MaxRecvMsgSize(64<<10))
	caservice.RegisterIstioCertificateServiceServer(gs, cp.CAServer())
	go func() {
		<-ctx.Done()
		gs.Stop()
	}()
	cp.opts.Log.Info("serving CA", "address", lis.Addr().String())
	if err := gs.Serve(lis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return err
	}
	return nil
}

// ServingTLS returns the servers' TLS config (tests).
func (cp *ControlPlane) ServingTLS(ctx context.Context) (*tls.Config, error) {
	if err := cp.certs.refresh(ctx); err != nil {
		return nil, err
	}
	return cp.certs.tlsConfig(), nil
}

// Package proxyauth authenticates the mesh's proxies (ztunnel, waypoints)
// when they call the control plane: the bearer token is a projected
// service-account token (audience "ambient-mesh") checked with TokenReview,
// and the pod it is bound to must be a ztunnel or waypoint of this mesh, or
// a pod running the mesh's sidecar (which may act only as itself).
package proxyauth

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc/metadata"
	appsv1 "k8s.io/api/apps/v1"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/ambientmesh/ambient/proxylib/discovery/selection"
)

// Roles of authenticated callers.
const (
	RoleZtunnel  = "ztunnel"
	RoleWaypoint = "waypoint"
	// RoleSidecar is the sidecar of the pod the token is bound to.
	RoleSidecar = "sidecar"
)

// Token claims the API server puts in user.extra for pod-bound tokens.
const (
	extraPodName = "authentication.kubernetes.io/pod-name"
	extraPodUID  = "authentication.kubernetes.io/pod-uid"
)

// Caller is an authenticated proxy.
type Caller struct {
	Role           string
	Namespace      string
	ServiceAccount string
	Pod            *corev1.Pod
	// NodeName of a ztunnel (its pod's spec.nodeName).
	NodeName string
}

// Errors; the servers map them to gRPC codes.
var (
	ErrUnauthenticated = errors.New("unauthenticated")
	ErrForbidden       = errors.New("forbidden")
)

// Authenticator checks tokens. Safe for concurrent use.
type Authenticator struct {
	// Client creates TokenReviews.
	Client client.Client
	// Pods reads pods (the manager's cache); APIReader is used on a cache miss
	// (a proxy that just started may not be in the cache yet).
	Pods, APIReader client.Reader
	// Audience of accepted tokens (default "ambient-mesh").
	Audience string
	// MeshNamespace returns the mesh namespace, where ztunnel runs.
	MeshNamespace func() string
	// ZtunnelServiceAccount is ztunnel's service account (default "ztunnel").
	ZtunnelServiceAccount string
	// IsL7Proxy reports whether name in namespace is the service account
	// (and Deployment) of an L7 proxy: a waypoint or an ingress gateway.
	IsL7Proxy func(namespace, name string) bool
	// CacheTTL keeps successful TokenReviews for this long (default 30s).
	CacheTTL time.Duration
	Now      func() time.Time

	mu    sync.Mutex
	cache map[[32]byte]cachedReview
}

type cachedReview struct {
	status authnv1.TokenReviewStatus
	until  time.Time
}

func (a *Authenticator) now() time.Time {
	if a.Now != nil {
		return a.Now()
	}
	return time.Now()
}

// BearerToken extracts the token of a gRPC call.
func BearerToken(ctx context.Context) (string, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	vals := md.Get("authorization")
	if len(vals) != 1 {
		return "", fmt.Errorf("%w: expected one authorization header", ErrUnauthenticated)
	}
	tok, ok := strings.CutPrefix(vals[0], "Bearer ")
	if !ok || tok == "" {
		return "", fmt.Errorf("%w: authorization is not a bearer token", ErrUnauthenticated)
	}
	return tok, nil
}

// AuthenticateContext authenticates the bearer token of a gRPC call.
func (a *Authenticator) AuthenticateContext(ctx context.Context) (*Caller, error) {
	tok, err := BearerToken(ctx)
	if err != nil {
		return nil, err
	}
	return a.Authenticate(ctx, tok)
}

// Authenticate reviews token and resolves the calling proxy.
func (a *Authenticator) Authenticate(ctx context.Context, token string) (*Caller, error) {
	st, err := a.review(ctx, token)
	if err != nil {
		return nil, err
	}
	ns, sa, ok := parseServiceAccount(st.User.Username)
	if !ok {
		return nil, fmt.Errorf("%w: %q is not a service account", ErrForbidden, st.User.Username)
	}
	podName, podUID := first(st.User.Extra[extraPodName]), first(st.User.Extra[extraPodUID])
	if podName == "" || podUID == "" {
		return nil, fmt.Errorf("%w: token is not bound to a pod", ErrForbidden)
	}
	pod, err := a.pod(ctx, ns, podName)
	if err != nil {
		return nil, err
	}
	if string(pod.UID) != podUID || pod.Spec.ServiceAccountName != sa {
		return nil, fmt.Errorf("%w: token is bound to a pod that no longer exists", ErrForbidden)
	}
	if pod.DeletionTimestamp != nil || pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
		return nil, fmt.Errorf("%w: calling pod %s/%s is terminating", ErrForbidden, ns, podName)
	}
	caller := &Caller{Namespace: ns, ServiceAccount: sa, Pod: pod}
	ztunnelSA := a.ZtunnelServiceAccount
	if ztunnelSA == "" {
		ztunnelSA = "ztunnel"
	}
	switch {
	case ns == a.MeshNamespace() && sa == ztunnelSA:
		if pod.Spec.NodeName == "" {
			return nil, fmt.Errorf("%w: ztunnel pod %s is not scheduled", ErrForbidden, podName)
		}
		caller.Role, caller.NodeName = RoleZtunnel, pod.Spec.NodeName
	case a.isWaypointPod(ctx, pod):
		caller.Role = RoleWaypoint
	case ns != a.MeshNamespace() && selection.HBONESidecar(pod):
		// Whoever may create pods in the namespace may make one look
		// injected: the role grants only what the pod's own service account
		// is entitled to anyway (its identity, the mesh's discovery).
		caller.Role = RoleSidecar
	default:
		return nil, fmt.Errorf("%w: %s/%s (pod %s) is neither a ztunnel, a waypoint nor a sidecar of this mesh", ErrForbidden, ns, sa, podName)
	}
	return caller, nil
}

// isWaypointPod: the pod names an existing waypoint, runs as that
// waypoint's service account (named after it, as the operator and Istio
// deploy waypoints) and was created by the waypoint's own Deployment. Labels
// and service accounts are the pod author's to choose, so anyone allowed to
// create pods in the namespace could copy them; the controller chain pod →
// ReplicaSet → Deployment (UIDs checked against the API server) is not.
func (a *Authenticator) isWaypointPod(ctx context.Context, pod *corev1.Pod) bool {
	if a.IsL7Proxy == nil {
		return false
	}
	for _, k := range []string{"gateway.networking.k8s.io/gateway-name", "mesh.ambient.dev/waypoint"} {
		name := pod.Labels[k]
		if name == "" {
			continue
		}
		// A waypoint's objects are named after it, an ingress gateway's
		// <gateway>-istio (IngressObjectName).
		for _, obj := range []string{name, IngressObjectName(name)} {
			if obj == pod.Spec.ServiceAccountName && a.IsL7Proxy(pod.Namespace, obj) {
				return a.ownedByWaypointDeployment(ctx, pod, obj)
			}
		}
	}
	return false
}

// IngressObjectName names the ServiceAccount, Deployment and Service of
// the ingress gateway of Gateway name, as Istio does.
func IngressObjectName(gateway string) string { return gateway + "-istio" }

// WaypointDeploymentLabel marks the Deployments the operator runs for
// waypoints (controllers.LabelGatewayManaged, as Istio labels them).
const WaypointDeploymentLabel, WaypointDeploymentValue = "gateway.istio.io/managed", "istio.io-mesh-controller"

// ownedByWaypointDeployment: pod's controller is a ReplicaSet whose
// controller is the operator's Deployment for waypoint name.
func (a *Authenticator) ownedByWaypointDeployment(ctx context.Context, pod *corev1.Pod, name string) bool {
	reader := a.APIReader
	if reader == nil {
		reader = a.Pods
	}
	ref := metav1.GetControllerOf(pod)
	if ref == nil || ref.Kind != "ReplicaSet" || ref.APIVersion != "apps/v1" {
		return false
	}
	var rs appsv1.ReplicaSet
	if err := reader.Get(ctx, client.ObjectKey{Namespace: pod.Namespace, Name: ref.Name}, &rs); err != nil || rs.UID != ref.UID {
		return false
	}
	dref := metav1.GetControllerOf(&rs)
	if dref == nil || dref.Kind != "Deployment" || dref.APIVersion != "apps/v1" || dref.Name != name {
		return false
	}
	var dep appsv1.Deployment
	if err := reader.Get(ctx, client.ObjectKey{Namespace: pod.Namespace, Name: name}, &dep); err != nil || dep.UID != dref.UID {
		return false
	}
	return dep.Labels[WaypointDeploymentLabel] == WaypointDeploymentValue
}

func (a *Authenticator) pod(ctx context.Context, ns, name string) (*corev1.Pod, error) {
	var pod corev1.Pod
	err := a.Pods.Get(ctx, client.ObjectKey{Namespace: ns, Name: name}, &pod)
	if apierrors.IsNotFound(err) && a.APIReader != nil {
		err = a.APIReader.Get(ctx, client.ObjectKey{Namespace: ns, Name: name}, &pod)
	}
	if apierrors.IsNotFound(err) {
		return nil, fmt.Errorf("%w: calling pod %s/%s not found", ErrForbidden, ns, name)
	}
	if err != nil {
		return nil, fmt.Errorf("looking up calling pod: %w", err)
	}
	return &pod, nil
}

func (a *Authenticator) review(ctx context.Context, token string) (authnv1.TokenReviewStatus, error) {
	key := sha256.Sum256([]byte(token))
	now := a.now()
	a.mu.Lock()
	if c, ok := a.cache[key]; ok && now.Before(c.until) {
		a.mu.Unlock()
		return c.status, nil
	}
	a.mu.Unlock()
	aud := a.Audience
	if aud == "" {
		aud = "ambient-mesh"
	}
	tr := &authnv1.TokenReview{Spec: authnv1.TokenReviewSpec{Token: token, Audiences: []string{aud}}}
	if err := a.Client.Create(ctx, tr); err != nil {
		return authnv1.TokenReviewStatus{}, fmt.Errorf("token review: %w", err)
	}
	if !tr.Status.Authenticated || tr.Status.Error != "" {
		return authnv1.TokenReviewStatus{}, fmt.Errorf("%w: token rejected: %s", ErrUnauthenticated, tr.Status.Error)
	}
	if !contains(tr.Status.Audiences, aud) {
		return authnv1.TokenReviewStatus{}, fmt.Errorf("%w: token audience is not %q", ErrUnauthenticated, aud)
	}
	ttl := a.CacheTTL
	if ttl == 0 {
		ttl = 30 * time.Second
	}
	a.mu.Lock()
	if a.cache == nil || len(a.cache) > 10000 {
		a.cache = map[[32]byte]cachedReview{}
	}
	a.cache[key] = cachedReview{status: tr.Status, until: now.Add(ttl)}
	a.mu.Unlock()
	return tr.Status, nil
}

func parseServiceAccount(user string) (ns, sa string, ok bool) {
	rest, ok := strings.CutPrefix(user, "system:serviceaccount:")
	if !ok {
		return "", "", false
	}
	ns, sa, ok = strings.Cut(rest, ":")
	return ns, sa, ok && ns != "" && sa != ""
}

func first(v authnv1.ExtraValue) string {
	if len(v) == 0 {
		return ""
	}
	return v[0]
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// Package caserver is the mesh CA's gRPC front end, Istio's
// IstioCertificateService/CreateCertificate: a proxy sends a CSR with its
// bearer token, and gets a chain for an identity it is entitled to.
//
// Node authorization: a ztunnel may obtain the identity of any pod scheduled
// on its own node (named in metadata "ImpersonatedIdentity"), except a
// waypoint's; a waypoint (a pod of the waypoint's own Deployment) only its
// own identity; a sidecar (a pod running the mesh's sidecar, authenticated
// by its own pod's token) only its own pod's identity, never a waypoint's.
// Everything else is refused.
package caserver

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/go-logr/logr"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/ambientmesh/ambient/controllers/proxyauth"
	"github.com/ambientmesh/ambient/proxylib/ca"
	"github.com/ambientmesh/ambient/proxylib/caclient/capb"
	"github.com/ambientmesh/ambient/proxylib/caclient/capb/caservice"
	"github.com/ambientmesh/ambient/proxylib/identity"
)

// ImpersonatedIdentityKey is the metadata key naming the requested identity.
const ImpersonatedIdentityKey = "ImpersonatedIdentity"

// NodeIndexField indexes pods by spec.nodeName in the manager's cache.
const NodeIndexField = "spec.nodeName"

// Config are the CA's mesh-wide settings, read per request.
type Config struct {
	TrustDomain string
	// WorkloadCertTTL is the maximum (and default) lifetime.
	WorkloadCertTTL time.Duration
}

// Server implements IstioCertificateService.
type Server struct {
	caservice.UnimplementedIstioCertificateServiceServer

	Auth interface {
		AuthenticateContext(ctx context.Context) (*proxyauth.Caller, error)
	}
	// Authority returns the current signing CA.
	Authority func(ctx context.Context) (*ca.Authority, error)
	Config    func(ctx context.Context) Config
	// Pods lists pods by node (field index NodeIndexField).
	Pods client.Reader
	// IsL7Proxy reports whether a waypoint or an ingress gateway named name
	// exists in namespace; its service account (named after it) is its
	// identity, which only its own pods obtain.
	IsL7Proxy func(namespace, name string) bool
	Log       logr.Logger
}

// minTTL: shorter requests are raised; rotation at half life needs headroom.
const minTTL = 10 * time.Minute

// CreateCertificate signs csr for the requested identity if the caller may
// hold it.
func (s *Server) CreateCertificate(ctx context.Context, req *capb.IstioCertificateRequest) (*capb.IstioCertificateResponse, error) {
	caller, err := s.Auth.AuthenticateContext(ctx)
	if err != nil {
		s.Log.Info("refusing certificate request", "error", err.Error())
		return nil, authError(err)
	}
	cfg := s.Config(ctx)
	id, err := s.authorize(ctx, caller, cfg, requestedIdentity(req))
	if err != nil {
		s.Log.Info("refusing certificate request", "caller", caller.Namespace+"/"+caller.Pod.Name, "role", caller.Role, "error", err.Error())
		return nil, err
	}
	ttl := cfg.WorkloadCertTTL
	if ttl <= 0 {
		ttl = 24 * time.Hour
	}
	if want := time.Duration(req.GetValidityDuration()) * time.Second; want > 0 && want < ttl {
		ttl = max(want, minTTL)
	}
	auth, err := s.Authority(ctx)
	if err != nil {
		s.Log.Error(err, "CA unavailable")
		return nil, status.Error(codes.Unavailable, "CA unavailable")
	}
	cert, err := auth.SignCSR([]byte(req.GetCsr()), id, ttl)
	if err != nil {
		if errors.Is(err, ca.ErrBadCSR) || errors.Is(err, ca.ErrBadIdentity) {
			return nil, status.Error(codes.InvalidArgument, err.Error())
		}
		s.Log.Error(err, "signing", "identity", id.String())
		return nil, status.Error(codes.Internal, "signing failed")
	}
	resp := &capb.IstioCertificateResponse{}
	for _, c := range auth.ChainFor(cert) {
		resp.CertChain = append(resp.CertChain, string(ca.EncodeCerts(c)))
	}
	for _, r := range auth.Roots {
		resp.CertChain = append(resp.CertChain, string(ca.EncodeCerts(r)))
	}
	s.Log.V(1).Info("issued certificate", "identity", id.String(), "caller", caller.Namespace+"/"+caller.Pod.Name, "ttl", ttl)
	return resp, nil
}

func requestedIdentity(req *capb.IstioCertificateRequest) string {
	return req.GetMetadata().GetFields()[ImpersonatedIdentityKey].GetStringValue()
}

// authorize decides which identity the caller gets.
func (s *Server) authorize(ctx context.Context, caller *proxyauth.Caller, cfg Config, requested string) (identity.Identity, error) {
	own := identity.Identity{TrustDomain: cfg.TrustDomain, Namespace: caller.Namespace, ServiceAccount: caller.ServiceAccount}
	if requested == "" && caller.Role != proxyauth.RoleSidecar {
		// No impersonation: the caller's own identity.
		return own, nil
	}
	if requested == "" {
		requested = own.String() // still checked below: never a waypoint's
	}
	id, err := identity.Parse(requested)
	if err != nil {
		return identity.Identity{}, status.Errorf(codes.InvalidArgument, "requested identity: %v", err)
	}
	if id.TrustDomain != cfg.TrustDomain {
		return identity.Identity{}, status.Errorf(codes.PermissionDenied, "identity %s is outside trust domain %s", id, cfg.TrustDomain)
	}
	switch caller.Role {
	case proxyauth.RoleSidecar:
		if id != own {
			return identity.Identity{}, status.Errorf(codes.PermissionDenied, "a sidecar may only request its own pod's identity %s", own)
		}
		if s.IsL7Proxy == nil || s.IsL7Proxy(id.Namespace, id.ServiceAccount) {
			return identity.Identity{}, status.Errorf(codes.PermissionDenied, "%s is L7 proxy %s/%s's identity: only its own pods obtain it, never a sidecar", id, id.Namespace, id.ServiceAccount)
		}
		return id, nil
	case proxyauth.RoleWaypoint:
		if id != own {
			return identity.Identity{}, status.Errorf(codes.PermissionDenied, "a waypoint may only request its own identity %s", own)
		}
		return id, nil
	case proxyauth.RoleZtunnel:
		// Waypoint pods are never captured: a pod on this node running as a
		// waypoint's service account is someone borrowing it, and its
		// traffic must not carry the waypoint's identity.
		if s.IsL7Proxy == nil || s.IsL7Proxy(id.Namespace, id.ServiceAccount) {
			return identity.Identity{}, status.Errorf(codes.PermissionDenied, "%s is L7 proxy %s/%s's identity: only its own pods obtain it, never a ztunnel", id, id.Namespace, id.ServiceAccount)
		}
		ok, err := s.identityOnNode(ctx, caller.NodeName, id)
		if err != nil {
			return identity.Identity{}, status.Error(codes.Unavailable, "pod lookup failed")
		}
		if !ok {
			return identity.Identity{}, status.Errorf(codes.PermissionDenied, "no pod running as %s on node %s", id, caller.NodeName)
		}
		return id, nil
	}
	return identity.Identity{}, status.Error(codes.PermissionDenied, "unknown caller role")
}

// identityOnNode: some live pod on node runs in id's namespace as id's
// service account.
func (s *Server) identityOnNode(ctx context.Context, node string, id identity.Identity) (bool, error) {
	var pods corev1.PodList
	if err := s.Pods.List(ctx, &pods, client.InNamespace(id.Namespace), client.MatchingFields{NodeIndexField: node}); err != nil {
		return false, err
	}
	for _, p := range pods.Items {
		sa := p.Spec.ServiceAccountName
		if sa == "" {
			sa = "default"
		}
		if sa == id.ServiceAccount && p.DeletionTimestamp == nil &&
			p.Status.Phase != corev1.PodSucceeded && p.Status.Phase != corev1.PodFailed {
			return true, nil
		}
	}
	return false, nil
}

func authError(err error) error {
	switch {
	case errors.Is(err, proxyauth.ErrUnauthenticated):
		return status.Error(codes.Unauthenticated, err.Error())
	case errors.Is(err, proxyauth.ErrForbidden):
		return status.Error(codes.PermissionDenied, err.Error())
	}
	return status.Error(codes.Unavailable, fmt.Sprintf("authentication unavailable: %v", err))
}

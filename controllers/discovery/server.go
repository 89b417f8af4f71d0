package discovery

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoverypb "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"github.com/go-logr/logr"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/ambientmesh/ambient/controllers/proxyauth"
	xds "github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/kubeevents"
)

// Authenticator resolves the proxy behind a gRPC call.
type Authenticator interface {
	AuthenticateContext(ctx context.Context) (*proxyauth.Caller, error)
}

// Server serves the model over delta ADS to authenticated proxies.
type Server struct {
	Controller *Controller
	Auth       Authenticator
	// TLS carries the serving certificate (GetCertificate may rotate it).
	TLS *tls.Config
	Log logr.Logger
	// Events records NACKs on the proxy's pod (nil: none).
	Events *kubeevents.Recorder

	// MaxConnectionAge rebalances proxies over the replicas (default 30m).
	MaxConnectionAge time.Duration

	mu      sync.Mutex
	callers map[int64]*proxyauth.Caller
}

func (s *Server) maxConnectionAge() time.Duration {
	if s.MaxConnectionAge > 0 {
		return s.MaxConnectionAge
	}
	return 30 * time.Minute
}

type callerKey struct{}

// authStream authenticates every stream before the xDS server sees it.
func (s *Server) authStream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	caller, err := s.Auth.AuthenticateContext(ss.Context())
	if err != nil {
		s.Log.Info("refusing discovery client", "error", err.Error())
		return grpcAuthError(err)
	}
	return handler(srv, &ctxStream{ServerStream: ss, ctx: context.WithValue(ss.Context(), callerKey{}, caller)})
}

type ctxStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (c *ctxStream) Context() context.Context { return c.ctx }

// GRPCAuthError maps authentication failures to gRPC status codes without
// leaking internals.
func grpcAuthError(err error) error {
	switch {
	case errors.Is(err, proxyauth.ErrUnauthenticated):
		return status.Error(codes.Unauthenticated, err.Error())
	case errors.Is(err, proxyauth.ErrForbidden):
		return status.Error(codes.PermissionDenied, err.Error())
	}
	return status.Error(codes.Unavailable, "authentication unavailable")
}

// callbacks check that each stream asks only for what its role may read and
// that its node metadata matches the authenticated pod.
func (s *Server) callbacks() serverv3.Callbacks {
	return serverv3.CallbackFuncs{
		DeltaStreamOpenFunc: func(ctx context.Context, id int64, _ string) error {
			caller, _ := ctx.Value(callerKey{}).(*proxyauth.Caller)
			if caller == nil {
				return status.Error(codes.Unauthenticated, "unauthenticated stream")
			}
			s.mu.Lock()
			s.callers[id] = caller
			s.mu.Unlock()
			connected.WithLabelValues(caller.Role).Inc()
			s.Log.V(1).Info("discovery stream opened", "pod", caller.Pod.Name, "namespace", caller.Namespace, "role", caller.Role)
			return nil
		},
		DeltaStreamClosedFunc: func(id int64, _ *core.Node) {
			s.mu.Lock()
			caller := s.callers[id]
			delete(s.callers, id)
			s.mu.Unlock()
			if caller != nil {
				connected.WithLabelValues(caller.Role).Dec()
			}
		},
		StreamDeltaResponseFunc: func(_ int64, _ *discoverypb.DeltaDiscoveryRequest, resp *discoverypb.DeltaDiscoveryResponse) {
			pushes.WithLabelValues(shortType(resp.GetTypeUrl())).Inc()
		},
		StreamDeltaRequestFunc: func(id int64, req *discoverypb.DeltaDiscoveryRequest) error {
			s.mu.Lock()
			caller := s.callers[id]
			s.mu.Unlock()
			if caller == nil {
				return status.Error(codes.Unauthenticated, "unauthenticated stream")
			}
			switch req.TypeUrl {
			case xds.AddressType, xds.AuthorizationType:
			case xds.L7ResourceType:
				// Sidecars enforce L7 policies on their own pod.
				if caller.Role != proxyauth.RoleWaypoint && caller.Role != proxyauth.RoleSidecar {
					return status.Error(codes.PermissionDenied, "only waypoints and sidecars receive L7 resources")
				}
			default:
				return status.Errorf(codes.InvalidArgument, "unsupported type %q", req.TypeUrl)
			}
			if n := req.GetNode(); n != nil {
				md := n.GetMetadata().GetFields()
				if pod := md[xds.MetaPodName].GetStringValue(); pod != "" && pod != caller.Pod.Name {
					return status.Errorf(codes.PermissionDenied, "node metadata names pod %q, token is bound to %q", pod, caller.Pod.Name)
				}
			}
			s.observeAck(caller, req)
			req.Node = s.scopedNode(caller, req.GetNode())
			return nil
		},
	}
}

// scopedNode is the node the caches see: the client's own id and metadata
// plus the authenticated role, node and (a sidecar's) pod, which decide
// what it receives (a client cannot widen its scope by claiming another
// node or pod). The xDS server keeps it for the stream's later requests.
func (s *Server) scopedNode(caller *proxyauth.Caller, n *core.Node) *core.Node {
	out := WithScope(n, caller.Role, caller.NodeName)
	if caller.Role == proxyauth.RoleSidecar && caller.Pod != nil {
		out = WithPodScope(out, xds.PodUID(s.Controller.opts.ClusterID, caller.Pod.Namespace, caller.Pod.Name))
	}
	return out
}

// WithPodScope returns a copy of n that tells the AddressCache the uid of
// a sidecar's own workload (always in its scope).
func WithPodScope(n *core.Node, uid string) *core.Node {
	out := WithScope(n, n.GetMetadata().GetFields()[scopeRoleKey].GetStringValue(), n.GetMetadata().GetFields()[scopeNodeKey].GetStringValue())
	out.Metadata.Fields[scopePodKey] = structpb.NewStringValue(uid)
	return out
}

// WithScope returns a copy of n that tells the AddressCache the proxy's
// role and node. The discovery server sets it from the authenticated
// caller; a test server without authentication may set it from the node's
// own claims.
func WithScope(n *core.Node, role, node string) *core.Node {
	out := &core.Node{Id: n.GetId(), Metadata: &structpb.Struct{Fields: map[string]*structpb.Value{}}}
	for k, v := range n.GetMetadata().GetFields() {
		out.Metadata.Fields[k] = v
	}
	out.Metadata.Fields[scopeRoleKey] = structpb.NewStringValue(role)
	out.Metadata.Fields[scopeNodeKey] = structpb.NewStringValue(node)
	return out
}

// NeedLeaderElection: every replica serves discovery.
func (s *Server) NeedLeaderElection() bool { return false }

// Serve waits for the first full model, then serves on lis until ctx ends.
func (s *Server) Serve(ctx context.Context, lis net.Listener) error {
	for !s.Controller.Synced() {
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(20 * time.Millisecond):
		}
	}
	s.callers = map[int64]*proxyauth.Caller{}
	mux := &cachev3.MuxCache{
		Classify:      func(r *cachev3.Request) string { return r.GetTypeUrl() },
		ClassifyDelta: func(r *cachev3.DeltaRequest) string { return r.GetTypeUrl() },
		Caches: map[string]cachev3.Cache{
			xds.AddressType:       s.Controller.Addresses,
			xds.AuthorizationType: s.Controller.Authorizations,
			xds.L7ResourceType:    s.Controller.L7,
		},
	}
	xdsServer := serverv3.NewServer(ctx, mux, s.callbacks())
	gs := grpc.NewServer(
		grpc.Creds(credentials.NewTLS(s.TLS)),
		grpc.StreamInterceptor(s.authStream),
		grpc.UnaryInterceptor(func(context.Context, any, *grpc.UnaryServerInfo, grpc.UnaryHandler) (any, error) {
			return nil, status.Error(codes.Unimplemented, "discovery serves delta ADS streams only")
		}),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 30 * time.Second, Timeout: 10 * time.Second,
			// Streams are long-lived: without an age limit the replicas
			// that stay up keep every proxy after a rollout or a failover.
			// Closing a connection after MaxConnectionAge (jittered by
			// gRPC) moves its proxy to a replica the Service picks anew;
			// the proxy resumes from its versions and keeps serving meanwhile.
			MaxConnectionAge: s.maxConnectionAge(), MaxConnectionAgeGrace: 5 * time.Second}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		grpc.MaxRecvMsgSize(4<<20),
	)
	discoverypb.RegisterAggregatedDiscoveryServiceServer(gs, xdsServer)
	go func() {
		<-ctx.Done()
		gs.Stop()
	}()
	s.Log.Info("serving discovery", "address", lis.Addr().String())
	if err := gs.Serve(lis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return err
	}
	return nil
}

// DebugHandler serves /debug/config_dump?proxyID=<pod>.<namespace>: what the
// control plane sends that proxy, as JSON.
func (c *Controller) DebugHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/config_dump", func(w http.ResponseWriter, r *http.Request) {
		proxyID := r.URL.Query().Get("proxyID")
		pod, ns, ok := strings.Cut(proxyID, ".")
		if !ok || pod == "" || ns == "" {
			http.Error(w, "proxyID=<pod>.<namespace> is required", http.StatusBadRequest)
			return
		}
		role, err := c.roleOf(r.Context(), ns, pod)
		if err != nil {
			http.Error(w, err.Error(), http.StatusNotFound)
			return
		}
		types := []string{xds.AddressType, xds.AuthorizationType}
		if role == proxyauth.RoleWaypoint || role == proxyauth.RoleSidecar {
			types = append(types, xds.L7ResourceType)
		}
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(c.dump(proxyID, role, types))
	})
	return mux
}

func (c *Controller) roleOf(ctx context.Context, ns, pod string) (string, error) {
	var p podRef
	if err := c.getPod(ctx, ns, pod, &p); err != nil {
		return "", err
	}
	if p.waypoint {
		return proxyauth.RoleWaypoint, nil
	}
	if ns == c.rootNamespace() {
		return proxyauth.RoleZtunnel, nil
	}
	if p.sidecar {
		return proxyauth.RoleSidecar, nil
	}
	return "", fmt.Errorf("%s.%s is neither a ztunnel, a waypoint nor a sidecar", pod, ns)
}

func (c *Controller) dump(proxyID, role string, types []string) []byte {
	var b strings.Builder
	fmt.Fprintf(&b, "{\"proxyID\":%q,\"role\":%q,\"resources\":{", proxyID, role)
	for i, t := range types {
		if i > 0 {
			b.WriteString(",")
		}
		fmt.Fprintf(&b, "%q:[", t)
		for j, r := range c.Snapshot(t) {
			if j > 0 {
				b.WriteString(",")
			}
			js, err := protojson.Marshal(r.Resource)
			if err != nil {
				js = []byte("null")
			}
			fmt.Fprintf(&b, "{\"name\":%q,\"resource\":%s}", r.Name, js)
		}
		b.WriteString("]")
	}
	b.WriteString("}}")
	return []byte(b.String())
}

// observeAck counts NACKs (the request carries error_detail) and records
// on the proxy's pod when it starts refusing pushes of a type, when the
// reason changes, and when it accepts one again. Requests that are neither
// (subscriptions) and repeated ACKs or identical NACKs record nothing.
func (s *Server) observeAck(caller *proxyauth.Caller, req *discoverypb.DeltaDiscoveryRequest) {
	if req.GetErrorDetail() != nil {
		rejects.WithLabelValues(shortType(req.TypeUrl)).Inc()
	}
	if s.Events == nil || req.GetResponseNonce() == "" {
		return
	}
	c := kubeevents.Change{Topic: "xds " + req.TypeUrl, Assume: "ack", State: "ack",
		Event: kubeevents.Event{Type: kubeevents.Normal, Reason: ReasonConfigAccepted, Action: "ApplyConfig",
			Note: fmt.Sprintf("%s accepts %s again", caller.Role, req.TypeUrl)}}
	if d := req.GetErrorDetail(); d != nil {
		c.State = "nack " + d.GetMessage()
		c.Event = kubeevents.Event{Type: kubeevents.Warning, Reason: ReasonConfigRejected, Action: "ApplyConfig",
			Note: fmt.Sprintf("%s rejected %s: %s", caller.Role, req.TypeUrl, d.GetMessage())}
	}
	s.Events.Transition(caller.Pod, c)
}

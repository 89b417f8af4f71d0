// Package proxyerr is the one error type of the data path: every refused or
// failed connection carries a Reason, which is logged in the access log and
// used as the response_flags-style metric label, so an operator can tell why
// a connection did not go through.
package proxyerr

import (
	"errors"
	"fmt"
	"net/http"
)

// Reason is a stable, label-safe name for why a connection failed.
type Reason string

const (
	// Policy and identity.
	AuthorizationPolicyRejection Reason = "authorization_policy_rejection"
	L7PolicyWithoutWaypoint      Reason = "l7_policy_without_waypoint"
	PlaintextRejected            Reason = "plaintext_rejected" // PeerAuthentication STRICT
	PeerIdentityMismatch         Reason = "peer_identity_mismatch"
	NoPeerIdentity               Reason = "no_peer_identity"
	NotReady                     Reason = "not_ready" // discovery or certificates not synced
	CertificateUnavailable       Reason = "certificate_unavailable"

	// Addressing and discovery.
	UnknownSource      Reason = "unknown_source"       // the captured pod is not a known workload
	UnknownDestination Reason = "unknown_destination"  // CONNECT target is not a workload on this node
	NoHealthyUpstream  Reason = "no_healthy_upstream"  // service without healthy endpoints
	NoTargetPort       Reason = "no_target_port"       // service port not exposed
	BadTarget          Reason = "bad_target"           // malformed or recursive target
	WaypointRequired   Reason = "waypoint_required"    // destination only takes traffic from its waypoint
	WaypointUnresolved Reason = "waypoint_unresolved"  // waypoint address cannot be resolved
	OriginalDstMissing Reason = "original_dst_missing" // SO_ORIGINAL_DST failed
	// DiscoveryLookupFailed: the control plane did not answer an on-demand
	// address lookup in time.
	DiscoveryLookupFailed Reason = "discovery_lookup_failed"
	SelfTarget            Reason = "self_target"         // connection to ztunnel's own port
	EndpointUnresolved    Reason = "endpoint_unresolved" // endpoint known by hostname did not resolve

	// Transport.
	UpstreamConnectFailed Reason = "upstream_connect_failed"
	UpstreamReset         Reason = "upstream_reset"
	HBONEConnectFailed    Reason = "hbone_connect_failed"
	Draining              Reason = "draining"
	PolicyChanged         Reason = "policy_changed" // closed because a new policy no longer allows it
	ConnectionClosed      Reason = "connection_closed"
	Socks5Protocol        Reason = "socks5_protocol_error"
)

// Error is a failed connection: why (Reason), a human detail, and the
// underlying cause.
type Error struct {
	Reason Reason
	Detail string
	Err    error
}

func (e *Error) Error() string {
	s := string(e.Reason)
	if e.Detail != "" {
		s += ": " + e.Detail
	}
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

func (e *Error) Unwrap() error { return e.Err }

// New returns an Error with a formatted detail.
func New(r Reason, format string, args ...any) *Error {
	return &Error{Reason: r, Detail: fmt.Sprintf(format, args...)}
}

// Wrap returns an Error for reason r caused by err (nil err gives nil).
func Wrap(r Reason, err error, format string, args ...any) error {
	if err == nil {
		return nil
	}
	return &Error{Reason: r, Detail: fmt.Sprintf(format, args...), Err: err}
}

// ReasonOf returns the Reason of the first Error in err's chain, "" for nil
// and ConnectionClosed for an error that is not ours.
func ReasonOf(err error) Reason {
	if err == nil {
		return ""
	}
	var e *Error
	if errors.As(err, &e) {
		return e.Reason
	}
	return ConnectionClosed
}

// HTTPStatus is the status an HBONE CONNECT refused for reason r answers with.
func HTTPStatus(r Reason) int {
	switch r {
	case AuthorizationPolicyRejection, L7PolicyWithoutWaypoint, PlaintextRejected,
		PeerIdentityMismatch, NoPeerIdentity, WaypointRequired:
		return http.StatusForbidden
	case UnknownDestination, BadTarget, SelfTarget, NoTargetPort:
		return http.StatusBadRequest
	case NotReady, Draining, CertificateUnavailable, NoHealthyUpstream:
		return http.StatusServiceUnavailable
	case UpstreamConnectFailed, UpstreamReset, HBONEConnectFailed, WaypointUnresolved:
		return http.StatusServiceUnavailable
	}
	return http.StatusInternalServerError
}

package v1alpha1

// HBONETransport selects the protocol that carries HBONE tunnels.
// +kubebuilder:validation:Enum=HTTP2;HTTP3
type HBONETransport string

const (
	// TransportHTTP2 is HTTP/2 CONNECT over mutual TLS on TCP 15008 (Istio's HBONE).
	TransportHTTP2 HBONETransport = "HTTP2"
	// TransportHTTP3 is HTTP/3 CONNECT over QUIC on UDP 15008. Experimental; falls back to HTTP2.
	TransportHTTP3 HBONETransport = "HTTP3"
)

// Condition types shared by the mesh's resources.
const (
	// ConditionReady summarises whether the resource is fully working.
	ConditionReady = "Ready"
	// ConditionReconciled is False when the last reconcile failed.
	ConditionReconciled = "Reconciled"
	// ConditionCAReady reports the mesh certificate authority.
	ConditionCAReady = "CAReady"
	// ConditionZtunnelReady reports the ztunnel DaemonSet rollout.
	ConditionZtunnelReady = "ZtunnelReady"
	// ConditionNodeAgentReady reports the capture node-agent DaemonSet rollout.
	ConditionNodeAgentReady = "NodeAgentReady"
	// ConditionRootRotation reports a mesh root rotation: True while it
	// progresses (reasons Overlapping, Reissuing) and once Completed;
	// False when it cannot proceed (RootRotationFailed), old root kept.
	ConditionRootRotation = "RootRotation"
	// ConditionInboundCapture reports the inbound capture mode the node
	// agents were given (reason NAT or TPROXY), False with
	// TPROXYNeedsNFTables when TPROXY is asked of the iptables backend.
	ConditionInboundCapture = "InboundCapture"
	// ConditionWaypointReady reports a waypoint Deployment rollout.
	ConditionWaypointReady = "WaypointReady"
)

// Condition reasons.
const (
	ReasonReconciled          = "Reconciled"
	ReasonReconcileError      = "ReconcileError"
	ReasonInvalidSpec         = "InvalidSpec"
	ReasonCAIssued            = "CAIssued"
	ReasonCASecretMissing     = "CASecretMissing"
	ReasonCASecretInvalid     = "CASecretInvalid"
	ReasonOverlapping         = "Overlapping"
	ReasonReissuing           = "Reissuing"
	ReasonCompleted           = "Completed"
	ReasonRootRotationFailed  = "RootRotationFailed"
	ReasonDaemonSetReady      = "DaemonSetReady"
	ReasonDaemonSetNotReady   = "DaemonSetNotReady"
	ReasonDeploymentReady     = "DeploymentReady"
	ReasonDeploymentNotReady  = "DeploymentNotReady"
	ReasonMeshNotFound        = "MeshNotFound"
	ReasonConflict            = "Conflict"
	ReasonAllComponentsReady  = "AllComponentsReady"
	ReasonComponentsNotReady  = "ComponentsNotReady"
	ReasonNamespaceNotAmbient = "NamespaceNotAmbient"
	ReasonDeleting            = "Deleting"
	ReasonReleasingPods       = "ReleasingPods"
	ReasonTPROXYNeedsNFTables = "TPROXYNeedsNFTables"
)

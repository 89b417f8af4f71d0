package v1alpha1

import (
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// AmbientMeshSpec is the desired state of the mesh. There is one mesh per
// cluster; the webhook refuses a second AmbientMesh.
type AmbientMeshSpec struct {
	// TrustDomain is the SPIFFE trust domain of every workload identity
	// (spiffe://<trustDomain>/ns/<ns>/sa/<sa>). Immutable: changing it would
	// invalidate every certificate in the mesh.
	// +kubebuilder:default="cluster.local"
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=255
	// +kubebuilder:validation:Pattern=`^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$`
	// +kubebuilder:validation:XValidation:rule="self == oldSelf",message="spec.trustDomain is immutable: every certificate depends on it; delete the AmbientMesh and create a new one to change it"
	// +optional
	TrustDomain string `json:"trustDomain,omitempty"`

	// ClusterDomain is the cluster's DNS domain (the kubelet's
	// clusterDomain): Services are <name>.<namespace>.svc.<clusterDomain>.
	// Discovery, waypoints and the control plane's certificate names use it.
	// +kubebuilder:default="cluster.local"
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	// +kubebuilder:validation:Pattern=`^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$`
	// +optional
	ClusterDomain string `json:"clusterDomain,omitempty"`

	// Namespace where the mesh components (ztunnel, node agent, control-plane
	// Service, CA Secret) are installed.
	// +kubebuilder:default="ambient-system"
	// +kubebuilder:validation:MaxLength=63
	// +kubebuilder:validation:Pattern=`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`
	// +kubebuilder:validation:XValidation:rule="self == oldSelf",message="spec.namespace is immutable; delete the AmbientMesh and create a new one to move the mesh"
	// +optional
	Namespace string `json:"namespace,omitempty"`

	// Ztunnel configures the per-node L4 proxy DaemonSet.
	// +kubebuilder:default={}
	// +optional
	Ztunnel ZtunnelSpec `json:"ztunnel,omitempty"`

	// Capture configures which pods are captured and how.
	// +kubebuilder:default={}
	// +optional
	Capture CaptureSpec `json:"capture,omitempty"`

	// CA configures the mesh certificate authority.
	// +kubebuilder:default={}
	// +optional
	CA CASpec `json:"ca,omitempty"`

	// NodeAgent configures the capture node-agent DaemonSet (it runs on the
	// nodes ztunnel runs on, with ztunnel's node selector and tolerations).
	// +kubebuilder:default={}
	// +optional
	NodeAgent NodeAgentSpec `json:"nodeAgent,omitempty"`

	// Waypoint holds defaults for every waypoint of the mesh.
	// +kubebuilder:default={}
	// +optional
	Waypoint WaypointDefaults `json:"waypoint,omitempty"`
}

// LogLevel of a proxy.
// +kubebuilder:validation:Enum=error;warn;info;debug;trace
type LogLevel string

// ZtunnelSpec configures the ztunnel DaemonSet.
type ZtunnelSpec struct {
	// Image of ztunnel. Defaults to the operator's own build.
	// +optional
	Image string `json:"image,omitempty"`
	// Resources of the ztunnel container. Unset: requests cpu 200m and
	// memory 256Mi, no limits (a node's only L4 proxy is neither throttled
	// nor OOM-killed by a limit of its own; as Istio's ztunnel chart). Set:
	// used as written, so {} means none. GOMEMLIMIT follows limits.memory.
	// +optional
	Resources *corev1.ResourceRequirements `json:"resources,omitempty"`
	// PriorityClassName of the ztunnel pods. Unset: system-node-critical,
	// as Istio runs ztunnel: evicted last, and able to preempt other pods to
	// run on a full node (without ztunnel a node's captured pods have no
	// network). On GKE a class this high needs a ResourceQuota allowing it
	// in the mesh namespace.
	// +kubebuilder:validation:MaxLength=253
	// +optional
	PriorityClassName string `json:"priorityClassName,omitempty"`
	// LogLevel of ztunnel.
	// +kubebuilder:default=info
	// +optional
	LogLevel LogLevel `json:"logLevel,omitempty"`
	// NodeSelector restricts the nodes ztunnel runs on. Pods on other nodes are
	// not captured.
	// +optional
	NodeSelector map[string]string `json:"nodeSelector,omitempty"`
	// Tolerations of the ztunnel and node-agent pods.
	// +optional
	Tolerations []corev1.Toleration `json:"tolerations,omitempty"`
	// Transport carrying HBONE between proxies.
	// +kubebuilder:default=HTTP2
	// +optional
	Transport HBONETransport `json:"transport,omitempty"`
	// WorkerThreads is the most threads that run ztunnel's Go code at once
	// (GOMAXPROCS), like Istio's ZTUNNEL_WORKER_THREADS. ztunnel runs on one
	// thread while one carries its load (fewer cross-thread wake-ups: less
	// CPU and latency per request) and adds threads up to this number while
	// busy. Unset: 2, as Istio; never more than the container's CPU limit.
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=64
	// +optional
	WorkerThreads *int32 `json:"workerThreads,omitempty"`
	// TerminationGracePeriodSeconds of the ztunnel pods, like Istio's
	// ztunnel chart value of that name. On an upgrade or restart the old
	// ztunnel stops taking new connections at once (the new one takes
	// them) and keeps serving its established ones until they end or this
	// period, less 5 s to close what is left, is over: set it above the
	// lifetime of the longest connections that must survive an upgrade.
	// It only delays a pod's exit while connections are still open.
	// +kubebuilder:default=30
	// +kubebuilder:validation:Minimum=10
	// +kubebuilder:validation:Maximum=86400
	// +optional
	TerminationGracePeriodSeconds *int64 `json:"terminationGracePeriodSeconds,omitempty"`
}

// NodeAgentSpec configures the node-agent DaemonSet.
type NodeAgentSpec struct {
	// Resources of the node-agent container. Unset: requests cpu 100m and
	// memory 100Mi, no limits (as Istio's CNI node agent). Set: used as
	// written, so {} means none.
	// +optional
	Resources *corev1.ResourceRequirements `json:"resources,omitempty"`
	// PriorityClassName of the node-agent pods. Unset: system-node-critical
	// (pods cannot start on a node whose agent is missing).
	// +kubebuilder:validation:MaxLength=253
	// +optional
	PriorityClassName string `json:"priorityClassName,omitempty"`
	// CNI says where the node's container runtime keeps its CNI network
	// configuration and plugin binaries, which the node agent chains into.
	// +optional
	CNI CNISpec `json:"cni,omitempty"`
}

// CNIPlatform names a Kubernetes distribution whose CNI directories differ
// from the standard /etc/cni/net.d and /opt/cni/bin (as Istio's
// global.platform and its documented cniConfDir/cniBinDir overrides), or
// auto: the node agent finds them on each node.
// +kubebuilder:validation:Enum=standard;gke;k3s;k3d;microk8s;openshift;auto
type CNIPlatform string

const (
	CNIPlatformStandard CNIPlatform = "standard"
	CNIPlatformGKE      CNIPlatform = "gke"
	CNIPlatformK3s      CNIPlatform = "k3s"
	CNIPlatformK3d      CNIPlatform = "k3d"
	CNIPlatformMicroK8s CNIPlatform = "microk8s"
	// OpenShift: multus' configuration in /etc/kubernetes/cni/net.d,
	// plugins in /var/lib/cni/bin; the node agent chains into the cluster
	// network multus delegates to (in /run/multus/cni/net.d), so it mounts
	// the host's / as for auto.
	CNIPlatformOpenShift CNIPlatform = "openshift"
	// Auto: the node agent mounts the host's / and, on each node, uses the
	// first of OpenShift's, k3s', microk8s' and the standard directories
	// that holds a network configuration (ConfDir/BinDir, when set, win).
	CNIPlatformAuto CNIPlatform = "auto"
)

// CNISpec locates the host's CNI configuration and binaries. The platform
// gives defaults; ConfDir and BinDir, when set, override them.
type CNISpec struct {
	// Platform selects the distribution's directories. Unset: standard
	// (/etc/cni/net.d and /opt/cni/bin).
	// +optional
	Platform CNIPlatform `json:"platform,omitempty"`
	// ConfDir is the host directory with the CNI network configuration
	// (.conflist or .conf) the container runtime reads.
	// +kubebuilder:validation:Pattern=`^/[^:]*$`
	// +kubebuilder:validation:MaxLength=4096
	// +optional
	ConfDir string `json:"confDir,omitempty"`
	// BinDir is the host directory with the CNI plugin binaries.
	// +kubebuilder:validation:Pattern=`^/[^:]*$`
	// +kubebuilder:validation:MaxLength=4096
	// +optional
	BinDir string `json:"binDir,omitempty"`
}

// RedirectionBackend selects how the node agent redirects pod traffic.
// +kubebuilder:validation:Enum=nftables;iptables
type RedirectionBackend string

const (
	RedirectionNFTables RedirectionBackend = "nftables"
	RedirectionIPTables RedirectionBackend = "iptables"
)

// InboundCaptureMode selects how inbound TCP reaches ztunnel in each
// captured pod.
// +kubebuilder:validation:Enum=NAT;TPROXY
type InboundCaptureMode string

const (
	// InboundNAT redirects inbound TCP to ztunnel's :15006 with a NAT
	// REDIRECT. Apps see the real address of mesh clients; plaintext clients
	// from outside the mesh reach them from the pod's own address.
	InboundNAT InboundCaptureMode = "NAT"
	// InboundTPROXY diverts inbound TCP to ztunnel with TPROXY, without
	// NAT (as Istio's in-pod capture): apps see every client's own
	// address, also plaintext clients from outside the mesh. Needs the
	// nftables redirection backend and the kernel's nft_tproxy.
	InboundTPROXY InboundCaptureMode = "TPROXY"
)

// CaptureSpec configures traffic capture.
type CaptureSpec struct {
	// ExcludedNamespaces are never captured, whatever their labels.
	// kube-system and the mesh namespace are always excluded.
	// +kubebuilder:default={"kube-system"}
	// +kubebuilder:validation:MaxItems=256
	// +listType=set
	// +optional
	ExcludedNamespaces []string `json:"excludedNamespaces,omitempty"`
	// Redirection backend used inside each captured pod's network namespace.
	// +kubebuilder:default=nftables
	// +optional
	Redirection RedirectionBackend `json:"redirection,omitempty"`
	// DNSCapture sends captured pods' DNS (UDP and TCP port 53) to
	// ztunnel's DNS proxy (:15053 in the pod), which answers for the mesh's
	// Services itself and forwards other names to the pod's resolvers
	// (Istio's cni.ambient.dnsCapture). Off by default. A pod overrides it
	// with the annotation ambient.istio.io/dns-capture: "true" or "false".
	// Changing it updates the rules of running pods (no restart).
	// +kubebuilder:default=false
	// +optional
	DNSCapture bool `json:"dnsCapture,omitempty"`
	// InboundMode is how inbound TCP reaches ztunnel in each pod: NAT (a
	// REDIRECT; apps see mesh clients' addresses and their own for
	// plaintext clients from outside the mesh) or TPROXY (no NAT; apps see
	// every client's own address). TPROXY needs redirection nftables; with
	// iptables the condition InboundCapture is False and capture fails
	// closed (no pod is captured with NAT instead). Changing it rolls the
	// node agents, which switch the rules of running pods; open
	// connections keep working.
	// +kubebuilder:default=NAT
	// +optional
	InboundMode InboundCaptureMode `json:"inboundMode,omitempty"`
}

// CAType selects where the mesh root comes from.
// +kubebuilder:validation:Enum=SelfSigned;Secret
type CAType string

const (
	// CASelfSigned generates a root and an intermediate on first reconcile.
	CASelfSigned CAType = "SelfSigned"
	// CAFromSecret uses a root (or intermediate) certificate and key supplied by the user.
	CAFromSecret CAType = "Secret"
)

// CASpec configures the mesh CA.
// +kubebuilder:validation:XValidation:rule="!has(self.type) || self.type != 'Secret' || has(self.secretRef)",message="spec.ca.secretRef is required when spec.ca.type is Secret; name a Secret with tls.crt and tls.key in the mesh namespace"
// +kubebuilder:validation:XValidation:rule="!has(self.workloadCertTTL) || !has(self.rootCertTTL) || duration(self.workloadCertTTL) < duration(self.rootCertTTL)",message="spec.ca.workloadCertTTL must be shorter than spec.ca.rootCertTTL"
type CASpec struct {
	// Type of the mesh root.
	// +kubebuilder:default=SelfSigned
	// +optional
	Type CAType `json:"type,omitempty"`
	// SecretRef names a kubernetes.io/tls Secret (tls.crt, tls.key, optional
	// ca.crt) in the mesh namespace holding a CA certificate and key to sign
	// with. Only used when type is Secret.
	// +optional
	SecretRef *corev1.LocalObjectReference `json:"secretRef,omitempty"`
	// RootCertTTL is the lifetime of a self-signed root.
	// +kubebuilder:default="87600h"
	// +kubebuilder:validation:XValidation:rule="duration(self) >= duration('24h')",message="spec.ca.rootCertTTL must be at least 24h"
	// +optional
	RootCertTTL metav1.Duration `json:"rootCertTTL,omitzero"`
	// WorkloadCertTTL is the lifetime of workload certificates; proxies rotate
	// them at half life.
	// +kubebuilder:default="24h"
	// +kubebuilder:validation:XValidation:rule="duration(self) >= duration('10m') && duration(self) <= duration('2160h')",message="spec.ca.workloadCertTTL must be between 10m and 2160h"
	// +optional
	WorkloadCertTTL metav1.Duration `json:"workloadCertTTL,omitzero"`
	// RootRotation controls rotating the mesh root without dropping
	// traffic (docs/operations.md, "Rotating the mesh root").
	// +kubebuilder:default={}
	// +optional
	RootRotation RootRotationSpec `json:"rootRotation,omitzero"`
}

// RootRotationSpec starts and paces a root rotation. A self-signed root is
// rotated when Trigger changes, and automatically when a third or less of
// its life is left; a Secret CA is rotated by editing the Secret.
type RootRotationSpec struct {
	// Trigger: setting it to a new value starts a rotation of the
	// self-signed root (any string, e.g. a date). Ignored for type Secret.
	// +kubebuilder:validation:MaxLength=63
	// +optional
	Trigger string `json:"trigger,omitempty"`
	// Overlap is how long the trust bundle carries old and new roots before
	// any certificate of the new chain is issued: the time for the kubelet
	// to update every proxy's mounted bundle and the proxy to reload it.
	// +kubebuilder:default="2m"
	// +kubebuilder:validation:XValidation:rule="duration(self) >= duration('30s') && duration(self) <= duration('24h')",message="spec.ca.rootRotation.overlap must be between 30s and 24h"
	// +optional
	Overlap metav1.Duration `json:"overlap,omitzero"`
}

// WaypointDefaults apply to every waypoint unless its WaypointPolicy overrides them.
type WaypointDefaults struct {
	// Image of the waypoint proxy. Defaults to the operator's own build.
	// +optional
	Image string `json:"image,omitempty"`
	// Resources of waypoint and ingress gateway containers. Unset:
	// requests cpu 100m and memory 128Mi, limits cpu 2 and memory 1Gi (as
	// Istio's waypoints); GOMEMLIMIT follows limits.memory. Set: used as
	// written, so {} means none.
	// +optional
	Resources *corev1.ResourceRequirements `json:"resources,omitempty"`
}

// AmbientMeshStatus is the observed state of the mesh.
type AmbientMeshStatus struct {
	// ObservedGeneration is the generation the status describes.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// Conditions: Ready, Reconciled, CAReady, ZtunnelReady, NodeAgentReady,
	// InboundCapture, RootRotation (once a root rotation has started).
	// +listType=map
	// +listMapKey=type
	// +optional
	Conditions []metav1.Condition `json:"conditions,omitempty"`
	// Ztunnel rollout counts.
	// +optional
	Ztunnel RolloutStatus `json:"ztunnel,omitempty"`
	// NodeAgent rollout counts.
	// +optional
	NodeAgent RolloutStatus `json:"nodeAgent,omitempty"`
	// ReadySummary is "<ready>/<desired>" of ztunnels, for printing.
	// +optional
	ReadySummary string `json:"readySummary,omitempty"`
	// RootCertExpiry is when the mesh root certificate expires.
	// +optional
	RootCertExpiry *metav1.Time `json:"rootCertExpiry,omitempty"`
}

// RolloutStatus counts the pods of a DaemonSet or Deployment.
type RolloutStatus struct {
	Desired int32 `json:"desired"`
	Ready   int32 `json:"ready"`
}

// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:scope=Cluster,shortName=am,categories=ambient
// +kubebuilder:printcolumn:name="Trust Domain",type=string,JSONPath=`.spec.trustDomain`
// +kubebuilder:printcolumn:name="Ztunnels",type=string,JSONPath=`.status.readySummary`
// +kubebuilder:printcolumn:name="Ready",type=string,JSONPath=`.status.conditions[?(@.type=="Ready")].status`
// +kubebuilder:printcolumn:name="Reason",type=string,JSONPath=`.status.conditions[?(@.type=="Ready")].reason`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`

// AmbientMesh is the cluster-wide configuration of the ambient mesh.
type AmbientMesh struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// +kubebuilder:default={}
	Spec   AmbientMeshSpec   `json:"spec,omitempty"`
	Status AmbientMeshStatus `json:"status,omitempty"`
}

// +kubebuilder:object:root=true

// AmbientMeshList contains a list of AmbientMesh.
type AmbientMeshList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []AmbientMesh `json:"items"`
}

func init() {
	SchemeBuilder.Register(&AmbientMesh{}, &AmbientMeshList{})
}

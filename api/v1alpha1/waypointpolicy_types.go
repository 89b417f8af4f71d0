package v1alpha1

import (
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// WaypointScope says which workloads of the namespace a waypoint serves.
// +kubebuilder:validation:Enum=Namespace;ServiceAccount
type WaypointScope string

const (
	// ScopeNamespace: every captured workload of the namespace.
	ScopeNamespace WaypointScope = "Namespace"
	// ScopeServiceAccount: workloads running as one service account. Wins over a
	// namespace waypoint.
	ScopeServiceAccount WaypointScope = "ServiceAccount"
)

// TrafficType says which traffic goes through the waypoint, as Istio's
// istio.io/waypoint-for label.
// +kubebuilder:validation:Enum=service;workload;all;none
type TrafficType string

const (
	TrafficService  TrafficType = "service"
	TrafficWorkload TrafficType = "workload"
	TrafficAll      TrafficType = "all"
	TrafficNone     TrafficType = "none"
)

// WaypointPolicySpec is the desired state of a waypoint.
// +kubebuilder:validation:XValidation:rule="!has(self.scope) || self.scope != 'ServiceAccount' || (has(self.serviceAccount) && size(self.serviceAccount) > 0)",message="spec.serviceAccount is required when spec.scope is ServiceAccount; name the service account the waypoint serves"
// +kubebuilder:validation:XValidation:rule="!has(self.scope) || self.scope != 'Namespace' || !has(self.serviceAccount) || size(self.serviceAccount) == 0",message="spec.serviceAccount must be empty when spec.scope is Namespace; set scope: ServiceAccount to serve one service account"
type WaypointPolicySpec struct {
	// Scope of the waypoint.
	// +kubebuilder:default=Namespace
	// +optional
	Scope WaypointScope `json:"scope,omitempty"`
	// ServiceAccount served when scope is ServiceAccount.
	// +kubebuilder:validation:MaxLength=253
	// +kubebuilder:validation:Pattern=`^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$`
	// +optional
	ServiceAccount string `json:"serviceAccount,omitempty"`
	// TrafficType the waypoint handles.
	// +kubebuilder:default=service
	// +optional
	TrafficType TrafficType `json:"trafficType,omitempty"`
	// Replicas of the waypoint Deployment. The scale subresource sets it, so
	// a HorizontalPodAutoscaler may target the WaypointPolicy. With more than
	// one replica the waypoint gets a PodDisruptionBudget (one pod down at a
	// time) and its pods spread over nodes and zones.
	// +kubebuilder:default=1
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=100
	// +optional
	Replicas *int32 `json:"replicas,omitempty"`
	// Resources of the waypoint container; unset: the AmbientMesh's
	// spec.waypoint.resources (or its defaults). Set: used as written.
	// +optional
	Resources *corev1.ResourceRequirements `json:"resources,omitempty"`
	// Transport for HBONE to and from the waypoint; defaults from the AmbientMesh.
	// +optional
	Transport HBONETransport `json:"transport,omitempty"`
}

// WaypointPolicyStatus is the observed state of a waypoint.
type WaypointPolicyStatus struct {
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// Conditions: Ready, Reconciled, WaypointReady.
	// +listType=map
	// +listMapKey=type
	// +optional
	Conditions []metav1.Condition `json:"conditions,omitempty"`
	// Address of the waypoint Service (cluster IP).
	// +optional
	Address string `json:"address,omitempty"`
	// ReadyReplicas of the waypoint Deployment.
	// +optional
	ReadyReplicas int32 `json:"readyReplicas,omitempty"`
	// Replicas is the Deployment's count of pods (the scale subresource's
	// status.replicas).
	// +optional
	Replicas int32 `json:"replicas,omitempty"`
	// Selector selects the waypoint's pods, as a label selector string
	// (the scale subresource's status.selector, which an autoscaler needs
	// to find the pods it measures).
	// +optional
	Selector string `json:"selector,omitempty"`
}

// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:subresource:scale:specpath=.spec.replicas,statuspath=.status.replicas,selectorpath=.status.selector
// +kubebuilder:resource:shortName=wp,categories=ambient
// +kubebuilder:printcolumn:name="Scope",type=string,JSONPath=`.spec.scope`
// +kubebuilder:printcolumn:name="Service Account",type=string,JSONPath=`.spec.serviceAccount`
// +kubebuilder:printcolumn:name="Address",type=string,JSONPath=`.status.address`
// +kubebuilder:printcolumn:name="Ready",type=string,JSONPath=`.status.conditions[?(@.type=="Ready")].status`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`

// WaypointPolicy declares an L7 waypoint proxy for a namespace or one of its
// service accounts.
type WaypointPolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// +kubebuilder:default={}
	Spec   WaypointPolicySpec   `json:"spec,omitempty"`
	Status WaypointPolicyStatus `json:"status,omitempty"`
}

// +kubebuilder:object:root=true

// WaypointPolicyList contains a list of WaypointPolicy.
type WaypointPolicyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []WaypointPolicy `json:"items"`
}

func init() {
	SchemeBuilder.Register(&WaypointPolicy{}, &WaypointPolicyList{})
}

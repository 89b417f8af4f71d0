// Package v1alpha1 contains the mesh.ambient.dev/v1alpha1 API: AmbientMesh
// (cluster-wide mesh settings) and WaypointPolicy (a per-namespace or
// per-service-account L7 proxy).
// +kubebuilder:object:generate=true
// +groupName=mesh.ambient.dev
package v1alpha1

import (
	"k8s.io/apimachinery/pkg/runtime/schema"
	"sigs.k8s.io/controller-runtime/pkg/scheme"
)

var (
	// GroupVersion is group version used to register these objects.
	GroupVersion = schema.GroupVersion{Group: "mesh.ambient.dev", Version: "v1alpha1"}

	// SchemeBuilder is used to add go types to the GroupVersionKind scheme.
	SchemeBuilder = &scheme.Builder{GroupVersion: GroupVersion}

	// AddToScheme adds the types in this group-version to the given scheme.
	AddToScheme = SchemeBuilder.AddToScheme
)

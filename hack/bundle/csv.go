package main

import (
	"encoding/json"
	"fmt"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/ambientmesh/ambient/hack/pin"
)

// Kinds OLM accepts as plain bundle manifests besides the CSV and CRDs.
var bundleKinds = map[string]bool{"Service": true, "ClusterRole": true, "ConfigMap": true, "PodDisruptionBudget": true}

// build sorts the rendered objects into the CSV and the other bundle files.
func build(objs []*unstructured.Unstructured, o options, images pin.Images) (*bundleFiles, error) {
	b := &bundleFiles{manifests: map[string]map[string]any{}, version: o.Version}
	var (
		deployments        []any
		clusterPermissions []any
		permissions        []any
		webhooks           []any
		owned              []any
		examples           []any
		managerRole        = map[string]string{} // ClusterRole name → bound SA
		roleSA             = map[string]string{}
		serviceAccount     string
	)
	byKind := map[string][]*unstructured.Unstructured{}
	for _, u := range objs {
		byKind[u.GetKind()] = append(byKind[u.GetKind()], u)
	}
	for _, rb := range byKind["ClusterRoleBinding"] {
		managerRole[nested(rb.Object, "roleRef", "name")] = firstSubject(rb)
	}
	for _, rb := range byKind["RoleBinding"] {
		roleSA[nested(rb.Object, "roleRef", "name")] = firstSubject(rb)
	}
	for _, u := range byKind["CustomResourceDefinition"] {
		spec := u.Object["spec"].(map[string]any)
		plural := nested(spec, "names", "plural")
		group := spec["group"].(string)
		b.manifests[group+"_"+plural+".yaml"] = u.Object
		owned = append(owned, ownedCRD(u))
	}
	for _, u := range byKind["ClusterRole"] {
		if sa, ok := managerRole[u.GetName()]; ok {
			clusterPermissions = append(clusterPermissions, map[string]any{"serviceAccountName": sa, "rules": u.Object["rules"]})
			serviceAccount = sa
			continue
		}
		b.manifests[u.GetName()+"_rbac.authorization.k8s.io_v1_clusterrole.yaml"] = stripNamespace(u).Object
	}
	for _, u := range byKind["Role"] {
		if sa, ok := roleSA[u.GetName()]; ok {
			permissions = append(permissions, map[string]any{"serviceAccountName": sa, "rules": u.Object["rules"]})
		}
	}
	for _, u := range byKind["Service"] {
		b.manifests[u.GetName()+"_v1_service.yaml"] = stripNamespace(u).Object
	}
	// OLM installs a PodDisruptionBudget shipped in the bundle into the
	// operator's namespace: the manager's replicas stay up one at a time.
	for _, u := range byKind["PodDisruptionBudget"] {
		b.manifests[u.GetName()+"_policy_v1_poddisruptionbudget.yaml"] = stripNamespace(u).Object
	}
	var deploymentName string
	for _, u := range byKind["Deployment"] {
		spec := u.Object["spec"].(map[string]any)
		if err := olmManagesWebhookCerts(spec); err != nil {
			return nil, err
		}
		if err := images.SetOnDeployment(spec); err != nil {
			return nil, err
		}
		deploymentName = u.GetName()
		deployments = append(deployments, map[string]any{"name": u.GetName(), "label": u.GetLabels(), "spec": spec})
	}
	for _, u := range byKind["ValidatingWebhookConfiguration"] {
		list, _ := u.Object["webhooks"].([]any)
		for _, wh := range list {
			webhooks = append(webhooks, webhookDefinition(wh.(map[string]any), deploymentName))
		}
	}
	for _, kind := range []string{"AmbientMesh", "WaypointPolicy"} {
		for _, u := range byKind[kind] {
			examples = append(examples, u.Object)
		}
	}
	if len(deployments) != 1 || serviceAccount == "" || len(owned) == 0 {
		return nil, fmt.Errorf("rendered manifests need one Deployment, a bound manager ClusterRole and CRDs (got %d, %q, %d)", len(deployments), serviceAccount, len(owned))
	}
	almExamples, err := json.MarshalIndent(examples, "", "  ")
	if err != nil {
		return nil, err
	}
	b.manifests[packageName+".clusterserviceversion.yaml"] = csv(o, images, string(almExamples), owned, webhooks, map[string]any{
		"strategy": "deployment",
		"spec": map[string]any{
			"deployments":        deployments,
			"clusterPermissions": clusterPermissions,
			"permissions":        permissions,
		},
	})
	return b, nil
}

func csv(o options, images pin.Images, almExamples string, owned, webhooks []any, install map[string]any) map[string]any {
	related := images.Related()
	return map[string]any{
		"apiVersion": "operators.coreos.com/v1alpha1",
		"kind":       "ClusterServiceVersion",
		"metadata": map[string]any{
			"name": packageName + ".v" + o.Version,
			"annotations": map[string]any{
				"alm-examples":   almExamples,
				"capabilities":   "Basic Install",
				"categories":     "Networking, Security",
				"containerImage": images.Manager,
				"description":    "Sidecar-less (ambient) service mesh: per-node L4 proxy, L7 waypoints, mTLS with SPIFFE identities.",
				"repository":     "https://github.com/ambientmesh/ambient",
				"operators.operatorframework.io/suggested-namespace": "ambient-system",
			},
		},
		"spec": map[string]any{
			"displayName":    "Ambient Mesh",
			"description":    "Ambient Mesh installs a sidecar-less service mesh. Create one `AmbientMesh` to get the per-node ztunnel proxies, the capture node agent, the mesh CA and the trust bundle; label a namespace `istio.io/dataplane-mode=ambient` to capture its pods without restarting them; add a `WaypointPolicy` for L7 routing and policy.",
			"version":        o.Version,
			"maturity":       channel,
			"minKubeVersion": "1.30.0",
			"provider":       map[string]any{"name": "Ambient Mesh Authors"},
			"maintainers":    []any{map[string]any{"name": "Ambient Mesh Authors", "email": "maintainers@ambient.dev"}},
			"links":          []any{map[string]any{"name": "Source", "url": "https://github.com/ambientmesh/ambient"}},
			"keywords":       []any{"service mesh", "ambient", "mTLS", "SPIFFE", "ztunnel", "waypoint"},
			"installModes": []any{
				map[string]any{"type": "OwnNamespace", "supported": false},
				map[string]any{"type": "SingleNamespace", "supported": false},
				map[string]any{"type": "MultiNamespace", "supported": false},
				map[string]any{"type": "AllNamespaces", "supported": true},
			},
			"install":                   install,
			"customresourcedefinitions": map[string]any{"owned": owned},
			"webhookdefinitions":        webhooks,
			"relatedImages":             related,
		},
	}
}

// ownedCRD describes a CRD for the console, with descriptors for the fields
// users set most and for status.
func ownedCRD(u *unstructured.Unstructured) map[string]any {
	spec := u.Object["spec"].(map[string]any)
	kind := nested(spec, "names", "kind")
	var version string
	for _, v := range spec["versions"].([]any) {
		if vm := v.(map[string]any); vm["storage"] == true {
			version = vm["name"].(string)
		}
	}
	d := map[string]any{
		"name":        u.GetName(),
		"version":     version,
		"kind":        kind,
		"displayName": displayNames[kind],
		"description": descriptions[kind],
		"resources":   resourcesOf[kind],
		"statusDescriptors": []any{
			map[string]any{"path": "conditions", "displayName": "Conditions", "x-descriptors": []any{"urn:alm:descriptor:io.kubernetes.conditions"}},
		},
	}
	var specDescs []any
	for _, sd := range specDescriptors[kind] {
		specDescs = append(specDescs, map[string]any{"path": sd[0], "displayName": sd[1], "description": sd[2]})
	}
	d["specDescriptors"] = specDescs
	return d
}

var displayNames = map[string]string{"AmbientMesh": "Ambient Mesh", "WaypointPolicy": "Waypoint Policy"}
var descriptions = map[string]string{
	"AmbientMesh":    "The cluster's mesh: trust domain, ztunnel, capture and CA settings (one per cluster).",
	"WaypointPolicy": "An L7 waypoint proxy for a namespace or one of its service accounts.",
}
var resourcesOf = map[string][]any{
	"AmbientMesh": {
		map[string]any{"kind": "DaemonSet", "version": "v1"}, map[string]any{"kind": "Service", "version": "v1"},
		map[string]any{"kind": "ServiceAccount", "version": "v1"}, map[string]any{"kind": "ConfigMap", "version": "v1"},
		map[string]any{"kind": "Secret", "version": "v1"}, map[string]any{"kind": "ClusterRole", "version": "v1"},
	},
	"WaypointPolicy": {
		map[string]any{"kind": "Deployment", "version": "v1"}, map[string]any{"kind": "Service", "version": "v1"},
		map[string]any{"kind": "ServiceAccount", "version": "v1"},
	},
}
var specDescriptors = map[string][][3]string{
	"AmbientMesh": {
		{"trustDomain", "Trust Domain", "SPIFFE trust domain of every workload identity (immutable)."},
		{"namespace", "Namespace", "Namespace of the mesh components (immutable)."},
		{"ztunnel.transport", "HBONE Transport", "HTTP2 (default) or HTTP3."},
		{"capture.excludedNamespaces", "Excluded Namespaces", "Namespaces never captured."},
		{"ca.type", "CA Type", "SelfSigned or Secret (bring your own root)."},
		{"ca.workloadCertTTL", "Workload Certificate TTL", "Lifetime of workload certificates."},
	},
	"WaypointPolicy": {
		{"scope", "Scope", "Namespace or ServiceAccount."},
		{"serviceAccount", "Service Account", "Service account served when scope is ServiceAccount."},
		{"trafficType", "Traffic Type", "service, workload, all or none."},
		{"replicas", "Replicas", "Waypoint replicas."},
	},
}

// webhookDefinition converts one ValidatingWebhookConfiguration entry to the
// CSV form; OLM creates the configuration and its certificate.
func webhookDefinition(wh map[string]any, deployment string) map[string]any {
	return map[string]any{
		"type":                    "ValidatingAdmissionWebhook",
		"generateName":            wh["name"],
		"deploymentName":          deployment,
		"containerPort":           int64(443),
		"targetPort":              int64(9443),
		"webhookPath":             nested(wh, "clientConfig", "service", "path"),
		"rules":                   wh["rules"],
		"failurePolicy":           wh["failurePolicy"],
		"sideEffects":             wh["sideEffects"],
		"admissionReviewVersions": wh["admissionReviewVersions"],
	}
}

// olmManagesWebhookCerts: under OLM the webhook certificate is mounted by
// OLM at the same path, so the manager must not issue its own and the
// emptyDir for it goes away.
func olmManagesWebhookCerts(spec map[string]any) error {
	podSpec, ok := nestedMap(spec, "template", "spec")
	if !ok {
		return fmt.Errorf("deployment has no pod spec")
	}
	var vols []any
	for _, v := range asList(podSpec["volumes"]) {
		if v.(map[string]any)["name"] != "webhook-certs" {
			vols = append(vols, v)
		}
	}
	if len(vols) == 0 {
		delete(podSpec, "volumes")
	} else {
		podSpec["volumes"] = vols
	}
	for _, c := range asList(podSpec["containers"]) {
		cm := c.(map[string]any)
		var args []any
		for _, a := range asList(cm["args"]) {
			if a == "--webhook-self-signed=true" {
				a = "--webhook-self-signed=false"
			}
			args = append(args, a)
		}
		cm["args"] = args
		var mounts []any
		for _, m := range asList(cm["volumeMounts"]) {
			if m.(map[string]any)["name"] != "webhook-certs" {
				mounts = append(mounts, m)
			}
		}
		if len(mounts) == 0 {
			delete(cm, "volumeMounts")
		} else {
			cm["volumeMounts"] = mounts
		}
	}
	return nil
}

func stripNamespace(u *unstructured.Unstructured) *unstructured.Unstructured {
	c := u.DeepCopy()
	c.SetNamespace("") // OLM installs into the operator's namespace
	return c
}

func firstSubject(rb *unstructured.Unstructured) string {
	subs := asList(rb.Object["subjects"])
	if len(subs) == 0 {
		return ""
	}
	name, _ := subs[0].(map[string]any)["name"].(string)
	return name
}

func asList(v any) []any {
	l, _ := v.([]any)
	return l
}

func nestedMap(m map[string]any, path ...string) (map[string]any, bool) {
	for _, p := range path {
		next, ok := m[p].(map[string]any)
		if !ok {
			return nil, false
		}
		m = next
	}
	return m, true
}

func nested(m map[string]any, path ...string) string {
	parent, ok := nestedMap(m, path[:len(path)-1]...)
	if !ok {
		return ""
	}
	s, _ := parent[path[len(path)-1]].(string)
	return s
}

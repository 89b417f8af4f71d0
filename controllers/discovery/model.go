package discovery

import (
	"net/netip"
	"sort"
	"strings"

	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/ambientmesh/ambient/controllers/policy"
	"github.com/ambientmesh/ambient/controllers/waypointbind"
	xds "github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/selection"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
)

// Labels and annotations that bind workloads and services to waypoints
// (the rules themselves are in controllers/waypointbind).
const (
	UseWaypointLabel            = waypointbind.UseWaypointLabel
	UseWaypointNamespaceLabel   = waypointbind.UseWaypointNamespaceLabel
	ForServiceAccountAnnotation = waypointbind.ForServiceAccountAnnotation
	WaypointForLabel            = waypointbind.WaypointForLabel
	WaypointGatewayClass        = waypointbind.GatewayClass
	GatewayNameLabel            = waypointbind.GatewayNameLabel
	WaypointNameLabel           = waypointbind.WaypointNameLabel

	hbonePort = 15008
)

// waypoint is a declared waypoint: a WaypointPolicy or a waypoint Gateway.
type waypoint = waypointbind.Waypoint

// meshConfig is what the model needs from the AmbientMesh.
type meshConfig struct {
	TrustDomain        string
	RootNamespace      string // mesh namespace = Istio root namespace
	ExcludedNamespaces []string
	ClusterID          string
	DomainSuffix       string
}

func (m meshConfig) selection() selection.Config {
	return selection.Config{MeshNamespace: m.RootNamespace, ExcludedNamespaces: m.ExcludedNamespaces}
}

func (m meshConfig) hostname(namespace, name string) string {
	return name + "." + namespace + ".svc." + m.DomainSuffix
}

// namespaceView is what the model reads about one namespace (plus the root
// namespace's policies) while building its resources.
type namespaceView struct {
	ns        *corev1.Namespace
	services  []*corev1.Service
	waypoints map[string]*waypoint              // by name
	authz     []*securityv1.AuthorizationPolicy // this namespace and the root namespace
	peerAuthn []*securityv1.PeerAuthentication  // this namespace and the root namespace
	// Istio networking objects of this namespace (loaded when installed).
	serviceEntries  []*networkingv1.ServiceEntry
	workloadEntries []*networkingv1.WorkloadEntry
	// locality is a node's locality (nil: unknown or unlabelled).
	locality func(node string) *workloadapi.Locality
	// lookupWaypoint resolves a waypoint of another namespace.
	lookupWaypoint func(namespace, name string) *waypoint
	// waypointService returns the Service of a waypoint, or nil.
	waypointService func(namespace, name string) *corev1.Service
	// slices of selector-less services, by service name (loaded only when
	// the namespace has such services).
	needSlices bool
	slices     map[string][]*discoveryv1.EndpointSlice
}

func podReady(pod *corev1.Pod) bool {
	if pod.DeletionTimestamp != nil {
		return false
	}
	for _, c := range pod.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

func podAddresses(pod *corev1.Pod) [][]byte {
	var out [][]byte
	seen := map[netip.Addr]bool{}
	add := func(s string) {
		if a, err := netip.ParseAddr(s); err == nil && !seen[a.Unmap()] {
			seen[a.Unmap()] = true
			out = append(out, a.Unmap().AsSlice())
		}
	}
	add(pod.Status.PodIP)
	for _, ip := range pod.Status.PodIPs {
		add(ip.IP)
	}
	return out
}

func isWaypointPod(pod *corev1.Pod) bool {
	return pod.Labels[GatewayNameLabel] != "" || pod.Labels[WaypointNameLabel] != ""
}

// buildWorkload converts a pod; nil when the pod is not (or no longer) a
// workload: no IP yet, or finished.
func buildWorkload(mc meshConfig, v *namespaceView, pod *corev1.Pod) *workloadapi.Workload {
	addrs := podAddresses(pod)
	if len(addrs) == 0 || pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
		return nil
	}
	sa := pod.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	w := &workloadapi.Workload{
		Uid:               xds.PodUID(mc.ClusterID, pod.Namespace, pod.Name),
		Name:              pod.Name,
		Namespace:         pod.Namespace,
		Addresses:         addrs,
		TrustDomain:       mc.TrustDomain,
		ServiceAccount:    sa,
		Node:              pod.Spec.NodeName,
		ClusterId:         mc.ClusterID,
		CanonicalName:     canonicalName(pod),
		CanonicalRevision: canonicalRevision(pod),
		Status:            workloadapi.WorkloadStatus_UNHEALTHY,
	}
	w.WorkloadType, w.WorkloadName = workloadOwner(pod)
	if v.locality != nil {
		w.Locality = v.locality(pod.Spec.NodeName)
	}
	if podReady(pod) {
		w.Status = workloadapi.WorkloadStatus_HEALTHY
	}
	if pod.Spec.HostNetwork {
		w.NetworkMode = workloadapi.NetworkMode_HOST_NETWORK
	}
	captured, _ := selection.Decide(mc.selection(), v.ns, pod)
	if captured {
		w.TunnelProtocol = workloadapi.TunnelProtocol_HBONE
	}
	if isWaypointPod(pod) || selection.HBONESidecar(pod) {
		// Waypoints and the mesh's sidecars terminate HBONE themselves (on
		// the pod's :15008); a sidecar's own pod needs no waypoint.
		w.TunnelProtocol = workloadapi.TunnelProtocol_HBONE
		w.NativeTunnel = true
	} else if captured {
		w.Waypoint = workloadWaypoint(mc, v, pod, sa)
	}
	w.Services = podServices(mc, v, pod)
	w.AuthorizationPolicies = workloadPolicies(mc, v, pod.Namespace, pod.Labels)
	return w
}

func canonicalName(pod *corev1.Pod) string {
	_, name := workloadOwner(pod)
	return canonicalFromLabels(pod.Labels, name)
}

func canonicalRevision(pod *corev1.Pod) string { return revisionFromLabels(pod.Labels) }

// workloadOwner derives the telemetry workload from the controller owner
// (a ReplicaSet "<deployment>-<hash>" counts as its Deployment).
func workloadOwner(pod *corev1.Pod) (workloadapi.WorkloadType, string) {
	for _, ref := range pod.OwnerReferences {
		if ref.Controller == nil || !*ref.Controller {
			continue
		}
		switch ref.Kind {
		case "ReplicaSet":
			if hash := pod.Labels["pod-template-hash"]; hash != "" && strings.HasSuffix(ref.Name, "-"+hash) {
				return workloadapi.WorkloadType_DEPLOYMENT, strings.TrimSuffix(ref.Name, "-"+hash)
			}
			return workloadapi.WorkloadType_DEPLOYMENT, ref.Name
		case "Job":
			return workloadapi.WorkloadType_JOB, ref.Name
		case "CronJob":
			return workloadapi.WorkloadType_CRONJOB, ref.Name
		default:
			return workloadapi.WorkloadType_DEPLOYMENT, ref.Name
		}
	}
	return workloadapi.WorkloadType_POD, pod.Name
}

// scope is what waypointbind needs to bind objects of this namespace.
func (v *namespaceView) scope(namespace string) waypointbind.Scope {
	return waypointbind.Scope{Namespace: v.ns, Name: namespace, Local: v.waypoints, Lookup: v.lookupWaypoint}
}

// workloadWaypoint is the pod's waypoint by the binding rules (pod label,
// service-account waypoint, namespace label, namespace waypoint).
func workloadWaypoint(mc meshConfig, v *namespaceView, pod *corev1.Pod, sa string) *workloadapi.GatewayAddress {
	if b, ok := waypointbind.ForPod(v.scope(pod.Namespace), pod, sa); ok {
		return gatewayAddress(mc, v, b.Namespace, b.Name)
	}
	return nil
}

// gatewayAddress locates a waypoint by its Service: the cluster IP when the
// Service exists, else its hostname (resolved by the proxy once known).
func gatewayAddress(mc meshConfig, v *namespaceView, namespace, name string) *workloadapi.GatewayAddress {
	if svc := v.waypointService(namespace, name); svc != nil {
		if ip, err := netip.ParseAddr(svc.Spec.ClusterIP); err == nil {
			return &workloadapi.GatewayAddress{
				Destination:   &workloadapi.GatewayAddress_Address{Address: &workloadapi.NetworkAddress{Address: ip.Unmap().AsSlice()}},
				HboneMtlsPort: hbonePort,
			}
		}
	}
	return &workloadapi.GatewayAddress{
		Destination:   &workloadapi.GatewayAddress_Hostname{Hostname: &workloadapi.NamespacedHostname{Namespace: namespace, Hostname: mc.hostname(namespace, name)}},
		HboneMtlsPort: hbonePort,
	}
}

func serviceSelects(svc *corev1.Service, pod *corev1.Pod) bool {
	if svc.Spec.Type == corev1.ServiceTypeExternalName || len(svc.Spec.Selector) == 0 {
		return false
	}
	return labels.SelectorFromSet(svc.Spec.Selector).Matches(labels.Set(pod.Labels))
}

// podServices lists the services selecting pod with target ports resolved
// against the pod's named container ports (unresolvable ports are left out).
func podServices(mc meshConfig, v *namespaceView, pod *corev1.Pod) map[string]*workloadapi.PortList {
	out := map[string]*workloadapi.PortList{}
	for _, svc := range v.services {
		if len(svc.Spec.Selector) == 0 && svc.Spec.Type != corev1.ServiceTypeExternalName {
			if pl := sliceEndpointPorts(svc, v.slices[svc.Name], pod); pl != nil {
				out[xds.ServiceKey(svc.Namespace, mc.hostname(svc.Namespace, svc.Name))] = pl
			}
			continue
		}
		if !serviceSelects(svc, pod) {
			continue
		}
		pl := &workloadapi.PortList{}
		for _, p := range svc.Spec.Ports {
			if p.Protocol != "" && p.Protocol != corev1.ProtocolTCP {
				continue
			}
			if target, ok := resolveTargetPort(p, pod); ok {
				pl.Ports = append(pl.Ports, &workloadapi.Port{ServicePort: uint32(p.Port), TargetPort: target})
			}
		}
		out[xds.ServiceKey(svc.Namespace, mc.hostname(svc.Namespace, svc.Name))] = pl
	}
	if ses := selectingServiceEntries(v, pod.Labels); len(ses) > 0 {
		addServiceEntryServices(out, ses, podServiceEntryPorts(pod))
	}
	if len(out) == 0 {
		return nil
	}
	return out
}

// sliceEndpointPorts: ports of pod as an endpoint of a selector-less
// service, matching slice ports to service ports by name; nil when the pod
// is not an endpoint.
func sliceEndpointPorts(svc *corev1.Service, slices []*discoveryv1.EndpointSlice, pod *corev1.Pod) *workloadapi.PortList {
	for _, es := range slices {
		for _, ep := range es.Endpoints {
			if ep.TargetRef == nil || ep.TargetRef.Kind != "Pod" || ep.TargetRef.Name != pod.Name {
				continue
			}
			pl := &workloadapi.PortList{}
			for _, sp := range svc.Spec.Ports {
				for _, p := range es.Ports {
					if p.Port != nil && ptrString(p.Name) == sp.Name && (p.Protocol == nil || *p.Protocol == corev1.ProtocolTCP) {
						pl.Ports = append(pl.Ports, &workloadapi.Port{ServicePort: uint32(sp.Port), TargetPort: uint32(*p.Port)})
					}
				}
			}
			return pl
		}
	}
	return nil
}

func ptrString(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

func resolveTargetPort(p corev1.ServicePort, pod *corev1.Pod) (uint32, bool) {
	switch {
	case p.TargetPort.Type == intstr.String && p.TargetPort.StrVal != "":
		for _, c := range pod.Spec.Containers {
			for _, cp := range c.Ports {
				if cp.Name == p.TargetPort.StrVal {
					return uint32(cp.ContainerPort), true
				}
			}
		}
		return 0, false
	case p.TargetPort.IntValue() > 0:
		return uint32(p.TargetPort.IntValue()), true
	}
	return uint32(p.Port), true
}

// workloadPolicies lists the selector policies (own namespace and root
// namespace) that select a workload's labels and have an L4 form, plus its
// effective PeerAuthentication policies.
func workloadPolicies(mc meshConfig, v *namespaceView, namespace string, lbls map[string]string) []string {
	var out []string
	for _, ap := range v.authz {
		sel := ap.Spec.GetSelector().GetMatchLabels()
		if len(sel) == 0 || (ap.Namespace != namespace && ap.Namespace != mc.RootNamespace) {
			continue
		}
		if !labels.SelectorFromSet(sel).Matches(labels.Set(lbls)) {
			continue
		}
		if policy.TranslateAuthorizationPolicy(mc.RootNamespace, ap) != nil {
			out = append(out, xds.PolicyKey(ap.Namespace, ap.Name))
		}
	}
	out = append(out, policy.WorkloadPeerAuthenticationKeys(mc.RootNamespace, namespace, lbls, v.peerAuthn)...)
	sort.Strings(out)
	return out
}

// buildService converts a Service; nil for ExternalName services.
func buildService(mc meshConfig, v *namespaceView, svc *corev1.Service) *workloadapi.Service {
	if svc.Spec.Type == corev1.ServiceTypeExternalName {
		return nil
	}
	out := &workloadapi.Service{
		Name:       svc.Name,
		Namespace:  svc.Namespace,
		Hostname:   mc.hostname(svc.Namespace, svc.Name),
		IpFamilies: ipFamilies(svc.Spec.IPFamilies),
	}
	seen := map[netip.Addr]bool{}
	addIP := func(s string) {
		if a, err := netip.ParseAddr(s); err == nil && !seen[a.Unmap()] {
			seen[a.Unmap()] = true
			out.Addresses = append(out.Addresses, &workloadapi.NetworkAddress{Address: a.Unmap().AsSlice()})
		}
	}
	addIP(svc.Spec.ClusterIP)
	for _, ip := range svc.Spec.ClusterIPs {
		addIP(ip)
	}
	for _, ing := range svc.Status.LoadBalancer.Ingress {
		addIP(ing.IP)
	}
	for _, p := range svc.Spec.Ports {
		if p.Protocol != "" && p.Protocol != corev1.ProtocolTCP {
			continue
		}
		target := uint32(0) // named ports resolve per workload
		if p.TargetPort.Type == intstr.Int {
			target = uint32(p.TargetPort.IntValue())
			if target == 0 {
				target = uint32(p.Port)
			}
		}
		out.Ports = append(out.Ports, &workloadapi.Port{ServicePort: uint32(p.Port), TargetPort: target})
	}
	out.Waypoint = serviceWaypoint(mc, v, svc)
	var nsAnnotations map[string]string
	if v.ns != nil {
		nsAnnotations = v.ns.Annotations
	}
	out.LoadBalancing = loadBalancing(svc, nsAnnotations)
	return out
}

// ipFamilies is the workload API's view of a Service's spec.ipFamilies, as
// Istio's control plane sends it: proxies pick endpoint addresses only of
// a single-family Service's family, and of the client's family otherwise.
func ipFamilies(fs []corev1.IPFamily) workloadapi.IPFamilies {
	switch {
	case len(fs) == 2:
		return workloadapi.IPFamilies_DUAL
	case len(fs) == 1 && fs[0] == corev1.IPv4Protocol:
		return workloadapi.IPFamilies_IPV4_ONLY
	case len(fs) == 1 && fs[0] == corev1.IPv6Protocol:
		return workloadapi.IPFamilies_IPV6_ONLY
	}
	return workloadapi.IPFamilies_AUTOMATIC
}

// serviceWaypoint is the Service's waypoint by the binding rules (service
// label, namespace label, namespace waypoint for service traffic).
func serviceWaypoint(mc meshConfig, v *namespaceView, svc *corev1.Service) *workloadapi.GatewayAddress {
	if b, ok := waypointbind.ForService(v.scope(svc.Namespace), svc); ok {
		return gatewayAddress(mc, v, b.Namespace, b.Name)
	}
	return nil
}

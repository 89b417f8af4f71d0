package discovery

import (
	"net/netip"

	networkingv1alpha3 "istio.io/api/networking/v1alpha3"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/ambientmesh/ambient/controllers/serviceentry"
	"github.com/ambientmesh/ambient/controllers/waypointbind"
	xds "github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
)

// Istio's markers of a WorkloadEntry that terminates HBONE itself: the VM
// runs a ztunnel (annotation) or speaks HBONE natively (label).
const (
	ambientRedirectionAnnotation = "ambient.istio.io/redirection"
	tunnelLabel                  = "networking.istio.io/tunnel"
)

// buildServiceEntryServices converts a ServiceEntry into one Service per
// host, as Istio does: the spec's addresses, else (resolution other than
// NONE, non-wildcard host) the VIPs allocated in its status; ports with
// their target ports; the waypoint by the Service binding rules. nil when
// an address is a CIDR wider than one address (it cannot be a VIP; Istio
// skips such entries too).
func buildServiceEntryServices(mc meshConfig, v *namespaceView, se *networkingv1.ServiceEntry) []*workloadapi.Service {
	var fixed []*workloadapi.NetworkAddress
	for _, a := range se.Spec.Addresses {
		ip, ok := serviceentry.HostAddress(a)
		if !ok {
			return nil
		}
		fixed = append(fixed, &workloadapi.NetworkAddress{Address: ip.AsSlice()})
	}
	var allocated map[string][]netip.Addr
	if serviceentry.ShouldAutoAllocate(se) {
		allocated = serviceentry.StatusAddresses(se)
	}
	ports := make([]*workloadapi.Port, 0, len(se.Spec.Ports))
	for _, p := range se.Spec.Ports {
		target := p.TargetPort
		if target == 0 {
			target = p.Number
		}
		ports = append(ports, &workloadapi.Port{ServicePort: p.Number, TargetPort: target})
	}
	var wp *workloadapi.GatewayAddress
	if b, ok := waypointbind.ForServiceEntry(v.scope(se.Namespace), se.Labels); ok {
		wp = gatewayAddress(mc, v, b.Namespace, b.Name)
	}
	var lb *workloadapi.LoadBalancing
	if se.Spec.Resolution == networkingv1alpha3.ServiceEntry_NONE {
		// No endpoints to choose from: the proxy keeps the destination
		// the client dialed.
		lb = &workloadapi.LoadBalancing{Mode: workloadapi.LoadBalancing_PASSTHROUGH}
	} else {
		var nsAnnotations map[string]string
		if v.ns != nil {
			nsAnnotations = v.ns.Annotations
		}
		lb = distributionLoadBalancing(trafficDistribution(nil, se.Annotations, nsAnnotations))
	}
	out := make([]*workloadapi.Service, 0, len(se.Spec.Hosts))
	seen := map[string]bool{}
	for _, h := range se.Spec.Hosts {
		if seen[h] {
			continue
		}
		seen[h] = true
		addrs := fixed
		if len(addrs) == 0 {
			for _, ip := range allocated[h] {
				addrs = append(addrs, &workloadapi.NetworkAddress{Address: ip.AsSlice()})
			}
		}
		out = append(out, &workloadapi.Service{
			Name: se.Name, Namespace: se.Namespace, Hostname: h, Addresses: addrs, Ports: ports,
			SubjectAltNames: se.Spec.SubjectAltNames, Waypoint: wp, LoadBalancing: lb,
		})
	}
	return out
}

// selectingServiceEntries are the ServiceEntries of the namespace whose
// workloadSelector selects lbls (a ServiceEntry selects in its own
// namespace only).
func selectingServiceEntries(v *namespaceView, lbls map[string]string) []*networkingv1.ServiceEntry {
	var out []*networkingv1.ServiceEntry
	for _, se := range v.serviceEntries {
		sel := se.Spec.GetWorkloadSelector().GetLabels()
		if len(sel) > 0 && labels.SelectorFromSet(sel).Matches(labels.Set(lbls)) {
			out = append(out, se)
		}
	}
	return out
}

// serviceEntryPorts maps a ServiceEntry's ports onto one endpoint: a port
// the endpoint names (by the ServiceEntry port's name) wins, then the
// target port, then the port number.
func serviceEntryPorts(se *networkingv1.ServiceEntry, named map[string]uint32) *workloadapi.PortList {
	pl := &workloadapi.PortList{}
	for _, p := range se.Spec.Ports {
		target := p.TargetPort
		if n, ok := named[p.Name]; ok && p.Name != "" {
			target = n
		}
		if target == 0 {
			target = p.Number
		}
		pl.Ports = append(pl.Ports, &workloadapi.Port{ServicePort: p.Number, TargetPort: target})
	}
	return pl
}

// addServiceEntryServices puts the hosts of each ServiceEntry in ses into
// services with the ports one endpoint serves.
func addServiceEntryServices(services map[string]*workloadapi.PortList, ses []*networkingv1.ServiceEntry, named map[string]uint32) {
	for _, se := range ses {
		for _, h := range se.Spec.Hosts {
			services[xds.ServiceKey(se.Namespace, h)] = serviceEntryPorts(se, named)
		}
	}
}

// buildServiceEntryWorkloads converts a ServiceEntry's endpoints into
// workloads: one per inline endpoint, or — resolution DNS without
// endpoints or selector — one per host whose address is the host name
// itself (the proxy resolves it). Selector-based entries get their
// workloads from the pods and WorkloadEntries they select.
func buildServiceEntryWorkloads(mc meshConfig, v *namespaceView, se *networkingv1.ServiceEntry) []*workloadapi.Workload {
	dns := se.Spec.Resolution == networkingv1alpha3.ServiceEntry_DNS || se.Spec.Resolution == networkingv1alpha3.ServiceEntry_DNS_ROUND_ROBIN
	var out []*workloadapi.Workload
	if len(se.Spec.Endpoints) == 0 {
		if !dns || se.Spec.WorkloadSelector != nil {
			return nil
		}
		seen := map[string]bool{}
		for _, h := range se.Spec.Hosts {
			if serviceentry.Wildcard(h) || seen[h] {
				continue
			}
			seen[h] = true
			w := serviceEntryWorkload(mc, v, se, &networkingv1alpha3.WorkloadEntry{Address: h})
			w.Services = map[string]*workloadapi.PortList{xds.ServiceKey(se.Namespace, h): serviceEntryPorts(se, nil)}
			out = append(out, w)
		}
		return out
	}
	for _, ep := range se.Spec.Endpoints {
		if ep.GetAddress() == "" {
			continue
		}
		w := serviceEntryWorkload(mc, v, se, ep)
		w.Services = map[string]*workloadapi.PortList{}
		addServiceEntryServices(w.Services, []*networkingv1.ServiceEntry{se}, ep.Ports)
		out = append(out, w)
	}
	return out
}

// serviceEntryWorkload is the workload of one inline endpoint; it is
// selected by policies through the ServiceEntry's labels, as in Istio.
func serviceEntryWorkload(mc meshConfig, v *namespaceView, se *networkingv1.ServiceEntry, ep *networkingv1alpha3.WorkloadEntry) *workloadapi.Workload {
	w := &workloadapi.Workload{
		Uid:                   xds.ServiceEntryUID(mc.ClusterID, se.Namespace, se.Name, ep.Address),
		Name:                  se.Name,
		Namespace:             se.Namespace,
		TrustDomain:           mc.TrustDomain,
		ServiceAccount:        ep.ServiceAccount,
		ClusterId:             mc.ClusterID,
		WorkloadType:          workloadapi.WorkloadType_POD, // as Istio: the API has no kind for it
		WorkloadName:          se.Name,
		CanonicalName:         canonicalFromLabels(se.Labels, se.Name),
		CanonicalRevision:     revisionFromLabels(se.Labels),
		Status:                workloadapi.WorkloadStatus_HEALTHY,
		AuthorizationPolicies: workloadPolicies(mc, v, se.Namespace, se.Labels),
	}
	setAddressOrHostname(w, ep.Address)
	setTunnelProtocol(w, se.Labels, se.Annotations)
	return w
}

// buildWorkloadEntry converts a WorkloadEntry (a VM) into a mesh workload
// with its identity (service account), the ServiceEntries selecting it,
// the policies selecting its labels and its waypoint by the pod rules.
func buildWorkloadEntry(mc meshConfig, v *namespaceView, we *networkingv1.WorkloadEntry) *workloadapi.Workload {
	if we.DeletionTimestamp != nil || we.Spec.Address == "" {
		return nil
	}
	// Istio reads labels from the spec and the metadata, the spec winning.
	lbls := map[string]string{}
	for k, val := range we.Labels {
		lbls[k] = val
	}
	for k, val := range we.Spec.Labels {
		lbls[k] = val
	}
	sa := we.Spec.ServiceAccount
	if sa == "" {
		sa = "default"
	}
	w := &workloadapi.Workload{
		Uid:               xds.WorkloadEntryUID(mc.ClusterID, we.Namespace, we.Name),
		Name:              we.Name,
		Namespace:         we.Namespace,
		Network:           we.Spec.Network,
		TrustDomain:       mc.TrustDomain,
		ServiceAccount:    sa,
		ClusterId:         mc.ClusterID,
		WorkloadType:      workloadapi.WorkloadType_POD, // as Istio
		WorkloadName:      we.Name,
		CanonicalName:     canonicalFromLabels(lbls, we.Name),
		CanonicalRevision: revisionFromLabels(lbls),
		Status:            workloadapi.WorkloadStatus_HEALTHY,
	}
	setAddressOrHostname(w, we.Spec.Address)
	setTunnelProtocol(w, lbls, we.Annotations)
	if b, ok := waypointbind.ForWorkload(v.scope(we.Namespace), lbls, sa); ok {
		w.Waypoint = gatewayAddress(mc, v, b.Namespace, b.Name)
	}
	w.Services = workloadEntryServices(mc, v, lbls, we.Spec.Ports)
	w.AuthorizationPolicies = workloadPolicies(mc, v, we.Namespace, lbls)
	return w
}

// workloadEntryServices: the ServiceEntries and (as Istio does by
// default) the Kubernetes Services of the namespace whose selectors match
// the entry's labels; a Service's named target port is looked up in the
// entry's ports (left out when it has none).
func workloadEntryServices(mc meshConfig, v *namespaceView, lbls map[string]string, named map[string]uint32) map[string]*workloadapi.PortList {
	out := map[string]*workloadapi.PortList{}
	for _, svc := range v.services {
		if svc.Spec.Type == corev1.ServiceTypeExternalName || len(svc.Spec.Selector) == 0 ||
			!labels.SelectorFromSet(svc.Spec.Selector).Matches(labels.Set(lbls)) {
			continue
		}
		pl := &workloadapi.PortList{}
		for _, p := range svc.Spec.Ports {
			if p.Protocol != "" && p.Protocol != corev1.ProtocolTCP {
				continue
			}
			target := uint32(p.TargetPort.IntValue())
			if p.TargetPort.Type == intstr.String {
				if target = named[p.TargetPort.StrVal]; target == 0 {
					continue
				}
			} else if target == 0 {
				target = uint32(p.Port)
			}
			pl.Ports = append(pl.Ports, &workloadapi.Port{ServicePort: uint32(p.Port), TargetPort: target})
		}
		out[xds.ServiceKey(svc.Namespace, mc.hostname(svc.Namespace, svc.Name))] = pl
	}
	addServiceEntryServices(out, selectingServiceEntries(v, lbls), named)
	if len(out) == 0 {
		return nil
	}
	return out
}

func setAddressOrHostname(w *workloadapi.Workload, address string) {
	if ip, err := netip.ParseAddr(address); err == nil {
		w.Addresses = [][]byte{ip.Unmap().AsSlice()}
		return
	}
	w.Hostname = address
}

// setTunnelProtocol: a workload outside Kubernetes speaks HBONE when it
// runs a ztunnel (annotation) or terminates HBONE itself (label), as in
// Istio; otherwise it gets plain TCP.
func setTunnelProtocol(w *workloadapi.Workload, lbls, annotations map[string]string) {
	if annotations[ambientRedirectionAnnotation] == "enabled" {
		w.TunnelProtocol = workloadapi.TunnelProtocol_HBONE
	}
	if lbls[tunnelLabel] == "http" {
		w.TunnelProtocol = workloadapi.TunnelProtocol_HBONE
		w.NativeTunnel = true
	}
}

func canonicalFromLabels(lbls map[string]string, fallback string) string {
	for _, k := range []string{"service.istio.io/canonical-name", "app.kubernetes.io/name", "app"} {
		if v := lbls[k]; v != "" {
			return v
		}
	}
	return fallback
}

func revisionFromLabels(lbls map[string]string) string {
	for _, k := range []string{"service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"} {
		if v := lbls[k]; v != "" {
			return v
		}
	}
	return "latest"
}

// podServiceEntryPorts are a pod's named container ports, which
// ServiceEntry ports match by name.
func podServiceEntryPorts(pod *corev1.Pod) map[string]uint32 {
	out := map[string]uint32{}
	for _, c := range pod.Spec.Containers {
		for _, p := range c.Ports {
			if p.Name != "" {
				out[p.Name] = uint32(p.ContainerPort)
			}
		}
	}
	return out
}

package discovery

import (
	"strings"

	corev1 "k8s.io/api/core/v1"

	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
)

// Locality and traffic distribution, as Istio ambient sends them: pods
// carry their node's region/zone/subzone, Services a LoadBalancing the
// proxies apply (proxylib/lb.Tiers).
const (
	// TrafficDistributionAnnotation is Istio's annotation for Services
	// (and, as a default, their namespace): PreferClose, PreferSameZone
	// or PreferSameNode, in any case.
	TrafficDistributionAnnotation = "networking.istio.io/traffic-distribution"
	// SubzoneLabel is Istio's node label for the subzone.
	SubzoneLabel = "topology.istio.io/subzone"
)

type distribution int

const (
	distributionAny distribution = iota
	distributionSameZone
	distributionSameNode
)

// trafficDistribution reads the Service's spec.trafficDistribution, else
// the annotation on the Service, else on its namespace. PreferClose is
// Kubernetes' former name of PreferSameZone. Unknown values mean no
// preference.
func trafficDistribution(spec *string, svcAnnotations, nsAnnotations map[string]string) distribution {
	if spec != nil {
		switch *spec {
		case corev1.ServiceTrafficDistributionPreferSameZone, corev1.ServiceTrafficDistributionPreferClose:
			return distributionSameZone
		case corev1.ServiceTrafficDistributionPreferSameNode:
			return distributionSameNode
		}
	}
	v, ok := svcAnnotations[TrafficDistributionAnnotation]
	if !ok {
		v = nsAnnotations[TrafficDistributionAnnotation]
	}
	switch strings.ToLower(v) {
	case strings.ToLower(corev1.ServiceTrafficDistributionPreferSameZone), strings.ToLower(corev1.ServiceTrafficDistributionPreferClose):
		return distributionSameZone
	case strings.ToLower(corev1.ServiceTrafficDistributionPreferSameNode):
		return distributionSameNode
	}
	return distributionAny
}

// loadBalancing is the Service's LoadBalancing: internalTrafficPolicy Local
// keeps traffic on the client's node (STRICT); a traffic distribution
// prefers close endpoints and fails over to farther ones (FAILOVER);
// publishNotReadyAddresses admits unready endpoints. nil when none applies.
func loadBalancing(svc *corev1.Service, nsAnnotations map[string]string) *workloadapi.LoadBalancing {
	var out *workloadapi.LoadBalancing
	if p := svc.Spec.InternalTrafficPolicy; p != nil && *p == corev1.ServiceInternalTrafficPolicyLocal {
		out = &workloadapi.LoadBalancing{Mode: workloadapi.LoadBalancing_STRICT,
			RoutingPreference: []workloadapi.LoadBalancing_Scope{workloadapi.LoadBalancing_NODE}}
	} else {
		out = distributionLoadBalancing(trafficDistribution(svc.Spec.TrafficDistribution, svc.Annotations, nsAnnotations))
	}
	if svc.Spec.PublishNotReadyAddresses {
		if out == nil {
			out = &workloadapi.LoadBalancing{}
		}
		out.HealthPolicy = workloadapi.LoadBalancing_ALLOW_ALL
	}
	return out
}

// distributionLoadBalancing: the scopes Istio prefers for each
// distribution, widest first.
func distributionLoadBalancing(d distribution) *workloadapi.LoadBalancing {
	zone := []workloadapi.LoadBalancing_Scope{workloadapi.LoadBalancing_NETWORK, workloadapi.LoadBalancing_REGION, workloadapi.LoadBalancing_ZONE}
	switch d {
	case distributionSameZone:
		return &workloadapi.LoadBalancing{Mode: workloadapi.LoadBalancing_FAILOVER, RoutingPreference: zone}
	case distributionSameNode:
		return &workloadapi.LoadBalancing{Mode: workloadapi.LoadBalancing_FAILOVER,
			RoutingPreference: append(zone, workloadapi.LoadBalancing_SUBZONE, workloadapi.LoadBalancing_NODE)}
	}
	return nil
}

// nodeLocality is a node's locality from its well-known labels; nil when
// it has none.
func nodeLocality(labels map[string]string) *workloadapi.Locality {
	l := &workloadapi.Locality{Region: labels[corev1.LabelTopologyRegion], Zone: labels[corev1.LabelTopologyZone], Subzone: labels[SubzoneLabel]}
	if l.Region == "" && l.Zone == "" && l.Subzone == "" {
		return nil
	}
	return l
}

// localityChanged reports whether a node's locality labels differ.
func localityChanged(a, b map[string]string) bool {
	for _, k := range []string{corev1.LabelTopologyRegion, corev1.LabelTopologyZone, SubzoneLabel} {
		if a[k] != b[k] {
			return true
		}
	}
	return false
}

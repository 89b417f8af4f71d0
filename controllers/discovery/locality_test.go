package discovery

import (
	"testing"

	"google.golang.org/protobuf/proto"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
)

func TestLoadBalancing(t *testing.T) {
	zone := &workloadapi.LoadBalancing{Mode: workloadapi.LoadBalancing_FAILOVER, RoutingPreference: []workloadapi.LoadBalancing_Scope{
		workloadapi.LoadBalancing_NETWORK, workloadapi.LoadBalancing_REGION, workloadapi.LoadBalancing_ZONE}}
	node := &workloadapi.LoadBalancing{Mode: workloadapi.LoadBalancing_FAILOVER, RoutingPreference: []workloadapi.LoadBalancing_Scope{
		workloadapi.LoadBalancing_NETWORK, workloadapi.LoadBalancing_REGION, workloadapi.LoadBalancing_ZONE,
		workloadapi.LoadBalancing_SUBZONE, workloadapi.LoadBalancing_NODE}}
	local := &workloadapi.LoadBalancing{Mode: workloadapi.LoadBalancing_STRICT, RoutingPreference: []workloadapi.LoadBalancing_Scope{workloadapi.LoadBalancing_NODE}}
	ann := func(v string) map[string]string { return map[string]string{TrafficDistributionAnnotation: v} }
	itpLocal := corev1.ServiceInternalTrafficPolicyLocal
	for _, c := range []struct {
		name          string
		spec          *string
		svcAnn, nsAnn map[string]string
		itp           *corev1.ServiceInternalTrafficPolicy
		notReady      bool
		want          *workloadapi.LoadBalancing
	}{
		{"nothing", nil, nil, nil, nil, false, nil},
		{"spec PreferClose", ptr.To("PreferClose"), nil, nil, nil, false, zone},
		{"spec PreferSameZone", ptr.To("PreferSameZone"), nil, nil, nil, false, zone},
		{"spec PreferSameNode", ptr.To("PreferSameNode"), nil, nil, nil, false, node},
		{"spec wins over the annotation", ptr.To("PreferSameNode"), ann("PreferClose"), nil, nil, false, node},
		{"unknown spec value: the annotation decides", ptr.To("PreferElsewhere"), ann("PreferClose"), nil, nil, false, zone},
		{"annotation, any case", nil, ann("preferclose"), nil, nil, false, zone},
		{"annotation PreferSameNode", nil, ann("PreferSameNode"), nil, nil, false, node},
		{"namespace annotation as default", nil, nil, ann("PreferClose"), nil, false, zone},
		{"Service annotation beats the namespace's", nil, ann("PreferSameNode"), ann("PreferClose"), nil, false, node},
		{"unknown annotation: no preference", nil, ann("nearby"), nil, nil, false, nil},
		{"internalTrafficPolicy Local beats the distribution", ptr.To("PreferClose"), nil, nil, &itpLocal, false, local},
		{"publishNotReadyAddresses", nil, nil, nil, nil, true,
			&workloadapi.LoadBalancing{HealthPolicy: workloadapi.LoadBalancing_ALLOW_ALL}},
		{"publishNotReadyAddresses with PreferClose", ptr.To("PreferClose"), nil, nil, nil, true,
			&workloadapi.LoadBalancing{Mode: zone.Mode, RoutingPreference: zone.RoutingPreference, HealthPolicy: workloadapi.LoadBalancing_ALLOW_ALL}},
	} {
		t.Run(c.name, func(t *testing.T) {
			svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Annotations: c.svcAnn},
				Spec: corev1.ServiceSpec{TrafficDistribution: c.spec, InternalTrafficPolicy: c.itp, PublishNotReadyAddresses: c.notReady}}
			if got := loadBalancing(svc, c.nsAnn); !proto.Equal(got, c.want) {
				t.Fatalf("loadBalancing = %v, want %v", got, c.want)
			}
		})
	}
}

func TestNodeLocality(t *testing.T) {
	if l := nodeLocality(map[string]string{"kubernetes.io/hostname": "n1"}); l != nil {
		t.Fatalf("unlabelled node: %v, want nil", l)
	}
	l := nodeLocality(map[string]string{corev1.LabelTopologyRegion: "r1", corev1.LabelTopologyZone: "z1", SubzoneLabel: "s1"})
	if l.GetRegion() != "r1" || l.GetZone() != "z1" || l.GetSubzone() != "s1" {
		t.Fatalf("locality %v, want r1/z1/s1", l)
	}
	if !localityChanged(map[string]string{corev1.LabelTopologyZone: "z1"}, map[string]string{corev1.LabelTopologyZone: "z2"}) ||
		localityChanged(map[string]string{corev1.LabelTopologyZone: "z1", "x": "1"}, map[string]string{corev1.LabelTopologyZone: "z1", "x": "2"}) {
		t.Fatal("localityChanged must see zone changes and only them")
	}
}

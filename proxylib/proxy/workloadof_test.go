package proxy

import (
	"testing"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/inpod"
)

// The node agent names pods by their Kubernetes UID (as Istio's ZDS);
// discovery names them Kubernetes//Pod/<ns>/<name>. Both must find the pod.
func TestWorkloadOfAndLocalPodAcrossUIDSchemes(t *testing.T) {
	s := discovery.NewState(discovery.AddressType)
	w := wl("httpbin", "10.0.1.2", "n1", true)
	w.Uid = discovery.PodUID(clusterID, "default", "httpbin")
	applyAddr(t, s, w.Uid, &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: w}})
	p := &Proxy{cfg: Config{State: s}, pods: map[string]*pod{}}
	k8sUID := "9afbbe79-9211-4e60-9138-e2cf30134639"
	p.pods[k8sUID] = &pod{info: WorkloadInfo{UID: k8sUID, WorkloadInfo: inpod.WorkloadInfo{Name: "httpbin", Namespace: "default"}}}

	tests := []struct {
		name  string
		info  WorkloadInfo
		found bool
	}{
		{"kubernetes uid", WorkloadInfo{UID: k8sUID, WorkloadInfo: inpod.WorkloadInfo{Name: "httpbin", Namespace: "default"}}, true},
		{"discovery uid", WorkloadInfo{UID: w.Uid}, true},
		{"other pod", WorkloadInfo{UID: "x", WorkloadInfo: inpod.WorkloadInfo{Name: "sleep", Namespace: "default"}}, false},
		{"same name other namespace", WorkloadInfo{UID: "y", WorkloadInfo: inpod.WorkloadInfo{Name: "httpbin", Namespace: "prod"}}, false},
		{"no name", WorkloadInfo{UID: "z"}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := p.workloadOf(tc.info)
			if (got != nil) != tc.found || (got != nil && got.GetUid() != w.Uid) {
				t.Fatalf("workloadOf = %v, want found=%v", got.GetUid(), tc.found)
			}
		})
	}
	if pd := p.localPod(w.Uid); pd == nil || pd.info.UID != k8sUID {
		t.Fatalf("localPod(%s) = %v, want the pod added as %s", w.Uid, pd, k8sUID)
	}
	if pd := p.localPod(discovery.PodUID(clusterID, "default", "sleep")); pd != nil {
		t.Fatalf("localPod found %s for another pod", pd.info.UID)
	}
}

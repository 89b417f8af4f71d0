package meshtest

import (
	"testing"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
)

// The control plane and log collection need no namespaces: checked here
// without root.

func TestControlPlaneAppliesToEveryState(t *testing.T) {
	cp := &ControlPlane{t: t}
	ztunnel, waypoint := cp.NewState(), cp.NewState(discovery.AddressType, discovery.AuthorizationType, discovery.L7ResourceType)
	for _, s := range []*discovery.State{ztunnel, waypoint} {
		if s.Ready() {
			t.Fatal("ready before the first push")
		}
		cp.SyncEmpty(s)
		if !s.Ready() {
			t.Fatal("not ready after SyncEmpty")
		}
	}
	cp.Workload(&workloadapi.Workload{Uid: "w1", Name: "sleep-1", Namespace: Namespace, Addresses: [][]byte{{10, 0, 0, 1}}})
	cp.Policy(AllowPolicy("allow-sleep", "cluster.local/ns/default/sa/sleep"))
	cp.Policy(StrictPolicy())
	for _, s := range []*discovery.State{ztunnel, waypoint} {
		if s.WorkloadByUID("w1") == nil || s.Policy("default/allow-sleep") == nil || s.Policy("default/converted_peer_authentication_default") == nil {
			t.Fatalf("state lacks pushed resources: %v %v", s.Workloads(), s.Policies())
		}
	}
	cp.Remove(discovery.AuthorizationType, "default/allow-sleep")
	for _, s := range []*discovery.State{ztunnel, waypoint} {
		if s.Policy("default/allow-sleep") != nil {
			t.Fatal("removed policy still present")
		}
	}
}

func TestLogsWaitFor(t *testing.T) {
	l := &Logs{t: t}
	log := l.Logger("node1")
	log.Info("proxy to", "dst", "10.0.0.1:80")
	log.V(2).Info("hidden")
	if got := l.WaitFor(t, "node1", `"dst"="10.0.0.1:80"`); got == "" {
		t.Fatal("no line")
	}
	if n := len(l.Lines()); n != 1 {
		t.Fatalf("%d lines, want 1 (V(2) is dropped)", n)
	}
}

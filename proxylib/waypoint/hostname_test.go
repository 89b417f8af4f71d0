package waypoint_test

import (
	"context"
	"net/netip"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/anypb"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/waypoint"
	wt "github.com/ambientmesh/ambient/proxylib/waypoint/waypointtest"
)

// A ServiceEntry endpoint known by hostname (resolution DNS) is named as
// itself in the request metrics, also when its host resolves to the
// address of another workload (here a mesh pod, which then serves it): the
// labels are the picked endpoint's, not a lookup of its address.
func TestHostnameEndpointLabelledAsItself(t *testing.T) {
	m := wt.New(t)
	var wp *wt.Waypoint
	pod := m.AddPod("echo-v1-0", "echo", map[string]string{"app": "echo"}, nil)
	wp = m.AddWaypoint("egress", false, func(c *waypoint.Config) {
		c.LookupHost = func(_ context.Context, host string) ([]netip.Addr, error) {
			return []netip.Addr{pod.IP}, nil // ext.example resolves to the pod
		}
	})
	vip := publishDNSServiceEntry(t, m, wp, "ext", "ext.example")

	c := m.NewClient("sleep", netip.MustParseAddr("10.244.1.5")).HTTP(wp, target(vip, wt.HTTPPort), false)
	if code, seen, _ := get(t, c, "GET", svcURL(vip, "/")); code != 200 || seen.Pod != pod.Name {
		t.Fatalf("GET through the ServiceEntry: %d from %q, want 200 from %s (its host's address)", code, seen.Pod, pod.Name)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		mfs, err := wp.Registry.Gather()
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, mf := range mfs {
			if mf.GetName() != "istio_requests_total" {
				continue
			}
			for _, mt := range mf.GetMetric() {
				for _, l := range mt.GetLabel() {
					if l.GetName() == "destination_workload" {
						got = append(got, l.GetValue())
					}
				}
			}
		}
		if len(got) == 1 && got[0] == "ext" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("destination_workload of the request: %v, want [ext] (the ServiceEntry's endpoint, not the pod its host resolves to)", got)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A ServiceEntry endpoint whose host resolves to an address no workload
// has (the usual external host) is dialled as that endpoint: plain TCP,
// since it is not in the mesh. Its resolution changing moves the traffic.
func TestHostnameEndpointOutsideTheMesh(t *testing.T) {
	m := wt.New(t)
	a := m.AddPod("ext-a", "ext", map[string]string{"app": "ext"}, nil)
	b := m.AddPod("ext-b", "ext", map[string]string{"app": "ext"}, nil)
	// Their servers stay up; discovery forgets them, as it knows nothing
	// of a host outside the cluster.
	if err := m.State.Apply(discovery.AddressType, nil, []string{wt.UID(a.Name), wt.UID(b.Name)}); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	resolvesTo := a.IP
	wp := m.AddWaypoint("egress", false, func(c *waypoint.Config) {
		c.LookupHost = func(_ context.Context, host string) ([]netip.Addr, error) {
			mu.Lock()
			defer mu.Unlock()
			return []netip.Addr{resolvesTo}, nil
		}
	})
	vip := publishDNSServiceEntry(t, m, wp, "ext", "ext.example")

	c := m.NewClient("sleep", netip.MustParseAddr("10.244.1.5")).HTTP(wp, target(vip, wt.HTTPPort), false)
	if code, seen, _ := get(t, c, "GET", svcURL(vip, "/")); code != 200 || seen.Pod != a.Name {
		t.Fatalf("GET through the ServiceEntry: %d from %q, want 200 from %s (its host's address)", code, seen.Pod, a.Name)
	}
	if peers := a.Peers(); len(peers) != 0 {
		t.Fatalf("the host outside the mesh was reached over HBONE (peers %v), want plain TCP", peers)
	}
	mu.Lock()
	resolvesTo = b.IP
	mu.Unlock()
	c.CloseIdleConnections()
	deadline := time.Now().Add(10 * time.Second)
	for {
		code, seen, _ := get(t, c, "GET", svcURL(vip, "/"))
		if code == 200 && seen.Pod == b.Name {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after the host moved to %s: %d from %q, want 200 from %s", b.IP, code, seen.Pod, b.Name)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// publishDNSServiceEntry publishes a Service served by wp whose only
// endpoint is known by hostname (a ServiceEntry with resolution DNS), and
// returns its VIP.
func publishDNSServiceEntry(t *testing.T, m *wt.Mesh, wp *wt.Waypoint, name, host string) netip.Addr {
	t.Helper()
	vip := m.NextVIP()
	m.PublishService(name, vip, wp, wt.HTTPPort)
	key := discovery.ServiceKey(wt.Namespace, wt.Hostname(name))
	se := &workloadapi.Workload{
		Uid:  discovery.ServiceEntryUID("Kubernetes", wt.Namespace, name, host),
		Name: name, Namespace: wt.Namespace, Hostname: host, WorkloadName: name, CanonicalName: name,
		ClusterId: "Kubernetes", Status: workloadapi.WorkloadStatus_HEALTHY,
		Services: map[string]*workloadapi.PortList{key: {Ports: []*workloadapi.Port{{ServicePort: wt.HTTPPort, TargetPort: wt.HTTPPort}}}},
	}
	body, err := anypb.New(&workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: se}})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.State.Apply(discovery.AddressType, []discovery.Resource{{Name: se.Uid, Version: "1", Body: body}}, nil); err != nil {
		t.Fatal(err)
	}
	return vip
}

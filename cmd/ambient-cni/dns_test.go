package main

import (
	"context"
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/ambientmesh/ambient/proxylib/discovery/selection"
	"github.com/ambientmesh/ambient/proxylib/dnsproxy"
	"github.com/ambientmesh/ambient/proxylib/inpod"
	"github.com/ambientmesh/ambient/proxylib/nodeagent"
	"github.com/ambientmesh/ambient/proxylib/redirect"
	"github.com/ambientmesh/ambient/test/netns"
)

func (z *fakeZtunnel) info(uid types.UID) (inpod.WorkloadInfo, bool) {
	z.mu.Lock()
	defer z.mu.Unlock()
	i, ok := z.infos[string(uid)]
	return i, ok
}

// dnsInstalled: the pod has the rules with DNS capture.
func dnsInstalled(t *testing.T, p *netns.Pod) bool {
	f, err := p.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ok, err := redirect.NewNFTables(redirect.DefaultConfig().WithDNS()).Installed(f)
	if err != nil {
		t.Fatal(err)
	}
	return ok
}

func setDNSAnnotation(t *testing.T, pod *corev1.Pod, v string) {
	var p corev1.Pod
	if err := k8s.Get(context.Background(), client.ObjectKeyFromObject(pod), &p); err != nil {
		t.Fatal(err)
	}
	if p.Annotations == nil {
		p.Annotations = map[string]string{}
	}
	p.Annotations[selection.DNSCaptureAnnotation] = v
	if err := k8s.Update(context.Background(), &p); err != nil {
		t.Fatal(err)
	}
}

// TestDNSCapturePerPod: with the mesh's DNS capture off, a pod annotated
// ambient.istio.io/dns-capture=true gets the DNS redirect and ztunnel is
// told (with the pod's resolvers, read from its process's resolv.conf);
// other pods do not; changing the annotation changes the rules of the
// running pod. With the mesh's DNS capture on, every pod gets it but the
// one annotated false.
func TestDNSCapturePerPod(t *testing.T) {
	c := netns.NewCluster(t)
	node := c.AddNode("n1")
	e := newEnv(t)
	createNamespace(t, "dnscap", true)
	mkPod := func(name, annotation string) (*netns.Pod, *corev1.Pod) {
		p := node.AddPod(name)
		p.Start("sleep", "600") // its root is the host's: the host's resolv.conf
		ip := uniqueIP(t, p)
		pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "dnscap", Name: name},
			Spec: corev1.PodSpec{NodeName: nodeName, Containers: []corev1.Container{{Name: "a", Image: "a"}}}}
		if annotation != "" {
			pod.Annotations = map[string]string{selection.DNSCaptureAnnotation: annotation}
		}
		if err := k8s.Create(context.Background(), pod); err != nil {
			t.Fatal(err)
		}
		pod.Status.Phase = corev1.PodRunning
		pod.Status.PodIP, pod.Status.PodIPs = ip.String(), []corev1.PodIP{{IP: ip.String()}}
		if err := k8s.Status().Update(context.Background(), pod); err != nil {
			t.Fatal(err)
		}
		return p, pod
	}
	onNS, on := mkPod("dns-on", "true")
	plainNS, plain := mkPod("dns-plain", "")
	offNS, off := mkPod("dns-off", "false")
	hostResolvers, _ := dnsproxy.ResolvConf("/etc/resolv.conf")

	captured := func(p *corev1.Pod, ns *netns.Pod, dns bool) func() bool {
		return func() bool {
			i, ok := e.ztunnel.info(p.UID)
			rules := installed(t, ns)
			if dns {
				rules = dnsInstalled(t, ns)
			}
			return ok && i.CaptureDNS == dns && rules
		}
	}
	stop := e.startAgentWith(func(o *nodeagent.Options) {})
	eventually(t, "dns-on captured with DNS", captured(on, onNS, true))
	eventually(t, "dns-plain captured without DNS", captured(plain, plainNS, false))
	eventually(t, "dns-off captured without DNS", captured(off, offNS, false))
	if i, _ := e.ztunnel.info(on.UID); len(hostResolvers) > 0 && !slices.Equal(i.DNSNameservers, hostResolvers) {
		t.Errorf("ztunnel got resolvers %v for dns-on, its resolv.conf says %v", i.DNSNameservers, hostResolvers)
	}
	if i, _ := e.ztunnel.info(plain.UID); len(i.DNSNameservers) != 0 {
		t.Errorf("resolvers sent for a pod without DNS capture: %v", i.DNSNameservers)
	}

	setDNSAnnotation(t, on, "false")
	eventually(t, "dns-on's rules lose DNS capture after the annotation says false", captured(on, onNS, false))
	setDNSAnnotation(t, on, "true")
	eventually(t, "and get it back", captured(on, onNS, true))

	stop()
	e.startAgentWith(func(o *nodeagent.Options) { o.DNSCapture = true })
	eventually(t, "mesh-wide DNS capture reaches the unannotated pod", captured(plain, plainNS, true))
	eventually(t, "the pod annotated false keeps its DNS", captured(off, offNS, false))
	eventually(t, "the pod annotated true keeps DNS capture", captured(on, onNS, true))
}

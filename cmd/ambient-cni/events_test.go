package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"syscall"
	"testing"

	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/ambientmesh/ambient/proxylib/kubeevents"
	"github.com/ambientmesh/ambient/proxylib/nodeagent"
	"github.com/ambientmesh/ambient/proxylib/redirect"
	"github.com/ambientmesh/ambient/test/netns"
)

// refusingRedirector is the real nftables redirector on a node where one
// pod's namespace refuses the rules (as a kernel without nftables would).
type refusingRedirector struct {
	redirect.Redirector
	refuse uint64 // inode of the refusing namespace
}

func (r refusingRedirector) Install(ns *os.File) error {
	if inode(ns) == r.refuse {
		return errors.New("nftables: operation not supported")
	}
	return r.Redirector.Install(ns)
}

func (r refusingRedirector) Installed(ns *os.File) (bool, error) {
	if inode(ns) == r.refuse {
		return false, nil
	}
	return r.Redirector.Installed(ns)
}

func inode(f *os.File) uint64 {
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		return 0
	}
	return st.Ino
}

func nsInode(t *testing.T, p *netns.Pod) uint64 {
	f, err := p.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	return inode(f)
}

// podEvents lists the Events regarding the pod with uid.
func podEvents(t *testing.T, uid types.UID) []eventsv1.Event {
	var list eventsv1.EventList
	if err := k8s.List(context.Background(), &list); err != nil {
		t.Fatal(err)
	}
	var out []eventsv1.Event
	for _, e := range list.Items {
		if e.Regarding.UID == uid {
			out = append(out, e)
		}
	}
	return out
}

// recorded counts the times reason was recorded on the pod (Event objects
// and their series of repeats).
func recorded(t *testing.T, pod *corev1.Pod, reason string) int {
	n := 0
	for _, e := range podEvents(t, pod.UID) {
		if e.Reason == reason {
			n++
			if e.Series != nil {
				n += int(e.Series.Count) - 1
			}
		}
	}
	return n
}

// waitPodEvent waits for an Event of typ and reason on pod from the node
// agent, and returns its note.
func waitPodEvent(t *testing.T, pod *corev1.Pod, typ, reason string) string {
	t.Helper()
	var note string
	eventually(t, fmt.Sprintf("%s Event %s on pod %s", typ, reason, pod.Name), func() bool {
		for _, e := range podEvents(t, pod.UID) {
			if e.Type == typ && e.Reason == reason && e.ReportingController == nodeagent.EventSource &&
				e.Regarding.Kind == "Pod" && e.Regarding.Name == pod.Name && e.Regarding.Namespace == pod.Namespace {
				note = e.Note
				return true
			}
		}
		return false
	})
	return note
}

// TestCaptureEvents: the node agent records Captured, CaptureFailed and
// Released on the pod, once per change: not for each retry of a failing
// capture, nor when a restarted agent re-adopts a captured pod.
func TestCaptureEvents(t *testing.T) {
	c := netns.NewCluster(t)
	node := c.AddNode("n1")
	goodNS, badNS := node.AddPod("good"), node.AddPod("bad")
	goodIP, badIP := uniqueIP(t, goodNS), uniqueIP(t, badNS)
	goodNS.Start("sleep", "600") // the agent finds a pod's namespace through its processes
	badNS.Start("sleep", "600")
	e := newEnv(t)
	e.opts = func(o *nodeagent.Options) {
		o.Redirector = refusingRedirector{Redirector: redirect.NewNFTables(o.Redirect), refuse: nsInode(t, badNS)}
	}
	createNamespace(t, "ev-capture", true)
	good := createPod(t, "ev-capture", "good", goodIP)
	bad := createPod(t, "ev-capture", "bad", badIP)

	stop := e.startAgent()
	tests := []struct {
		pod          *corev1.Pod
		typ, reason  string
		noteContains string
	}{
		{good, kubeevents.Normal, nodeagent.ReasonCaptured, nodeName},
		{bad, kubeevents.Warning, nodeagent.ReasonCaptureFailed, "operation not supported"},
	}
	for _, tc := range tests {
		if note := waitPodEvent(t, tc.pod, tc.typ, tc.reason); !strings.Contains(note, tc.noteContains) {
			t.Errorf("%s on %s: note %q does not mention %q", tc.reason, tc.pod.Name, note, tc.noteContains)
		}
	}

	// A restarted agent re-adopts the captured pod without news.
	stop()
	_, snaps := e.ztunnel.counts()
	e.startAgent()
	eventually(t, "the new agent's snapshot", func() bool { _, s := e.ztunnel.counts(); return s > snaps })

	setNamespaceAmbient(t, "ev-capture", false)
	waitPodEvent(t, good, kubeevents.Normal, nodeagent.ReasonReleased)
	if n := recorded(t, good, nodeagent.ReasonCaptured); n != 1 {
		t.Errorf("Captured recorded %d times (agent restart included), want once", n)
	}
	if n := recorded(t, good, nodeagent.ReasonReleased); n != 1 {
		t.Errorf("Released recorded %d times, want once", n)
	}
	// One agent process retried the failing capture; each agent said so once.
	if n := recorded(t, bad, nodeagent.ReasonCaptureFailed); n < 1 || n > 2 {
		t.Errorf("CaptureFailed recorded %d times by two agent processes, want one each at most", n)
	}
}

package nodeagent

import (
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// TestPodNameservers: the resolvers come from the resolv.conf under the
// root of a process in the pod's namespace; processes of other namespaces,
// and ones without a resolv.conf (the sandbox), are skipped.
func TestPodNameservers(t *testing.T) {
	proc := t.TempDir()
	mk := func(pid, netns, resolv string) {
		dir := filepath.Join(proc, pid)
		if err := os.MkdirAll(filepath.Join(dir, "ns"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(netns, filepath.Join(dir, "ns/net")); err != nil {
			t.Fatal(err)
		}
		if resolv != "" {
			if err := os.MkdirAll(filepath.Join(dir, "root/etc"), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, "root/etc/resolv.conf"), []byte(resolv), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	other := filepath.Join(t.TempDir(), "not-a-netns")
	os.WriteFile(other, nil, 0o644)
	mk("1", other, "nameserver 192.0.2.1\n") // another "namespace"
	mk("2", "/proc/self/ns/net", "")         // the sandbox: no resolv.conf
	mk("3", "/proc/self/ns/net", "search default.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\nnameserver fd00::a\noptions ndots:5\n")
	mk("self", "/proc/self/ns/net", "nameserver 192.0.2.99\n") // not a pid
	ns, err := os.Open("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	got := podNameservers(proc, ns)
	if want := []string{"10.96.0.10:53", "[fd00::a]:53"}; !slices.Equal(got, want) {
		t.Fatalf("podNameservers = %v, want %v", got, want)
	}
	if got := podNameservers(t.TempDir(), ns); got != nil {
		t.Fatalf("no process: %v, want none", got)
	}
}

package netns

import (
	"context"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestClusterConnectivity(t *testing.T) {
	c := NewCluster(t)
	n1, n2 := c.AddNode("n1"), c.AddNode("n2")
	a := n1.AddPod("a")
	b := n2.AddPod("b")
	local := n1.AddPod("c")

	tests := []struct {
		name     string
		from, to *Pod
		dst      netip.Addr
	}{
		{"cross-node v4", a, b, b.IP},
		{"cross-node v6", a, b, b.IP6},
		{"same-node v4", a, local, local.IP},
		{"reverse v4", b, a, a.IP},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var ln net.Listener
			if err := tc.to.Run(func() (err error) {
				ln, err = net.Listen("tcp", netip.AddrPortFrom(tc.dst, 0).String())
				return err
			}); err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			go func() {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				_, _ = c.Write([]byte(c.RemoteAddr().String()))
				c.Close()
			}()
			var got string
			if err := tc.from.Run(func() error {
				conn, err := net.Dial("tcp", ln.Addr().String())
				if err != nil {
					return err
				}
				defer conn.Close()
				b, err := io.ReadAll(conn)
				got = string(b)
				return err
			}); err != nil {
				t.Fatal(err)
			}
			// The peer saw the source pod's own address: no NAT on the path.
			src, err := netip.ParseAddrPort(got)
			if err != nil {
				t.Fatalf("bad reply %q: %v", got, err)
			}
			if want := tc.from.IP; tc.dst.Is6() {
				want = tc.from.IP6
				if src.Addr() != want {
					t.Fatalf("peer saw source %v, want %v", src.Addr(), want)
				}
			} else if src.Addr() != want {
				t.Fatalf("peer saw source %v, want %v", src.Addr(), want)
			}
		})
	}
}

func TestHostNamespaceUntouched(t *testing.T) {
	before := hostLinks(t)
	c := NewCluster(t)
	c.AddNode("n1").AddPod("p")
	if after := hostLinks(t); after != before {
		t.Fatalf("host links changed:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

func hostLinks(t *testing.T) string {
	out, err := exec.Command("ip", "-o", "link", "show").Output()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, l := range strings.Split(string(out), "\n") {
		if f := strings.Fields(l); len(f) > 1 {
			names = append(names, f[1])
		}
	}
	return strings.Join(names, " ")
}

func TestCleanupRemovesNamespaces(t *testing.T) {
	var paths []string
	t.Run("inner", func(t *testing.T) {
		c := NewCluster(t)
		p := c.AddNode("n1").AddPod("p")
		paths = append(paths, c.Underlay.Path(), p.Path())
		p.Start("sleep", "60")
	})
	for _, p := range paths {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s still exists after cleanup (stat err %v)", p, err)
		}
	}
}

func TestCommandRunsInNamespace(t *testing.T) {
	c := NewCluster(t)
	p := c.AddNode("n1").AddPod("p")
	out, err := p.Command(context.Background(), "ip", "-o", "addr", "show", "dev", "eth0").CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if !strings.Contains(string(out), p.IP.String()+"/24") {
		t.Fatalf("eth0 in %s lacks %s: %s", p.Name, p.IP, out)
	}
}

func TestSweepRemovesLabsOfDeadOwners(t *testing.T) {
	RequireRoot(t)
	// A lab whose owner has exited: a finished short-lived process's pid.
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	prefix := "amb-dead00-"
	if out, err := exec.Command("ip", "netns", "add", prefix+"x").CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", prefix+"x").Run() })
	if err := os.MkdirAll(ownersDir, 0o700); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(ownersDir+"/"+prefix, []byte(strconv.Itoa(dead.Process.Pid)), 0o600)
	live := New(t) // sweeps
	live.NewNS("alive")
	if _, err := os.Stat("/run/netns/" + prefix + "x"); !os.IsNotExist(err) {
		t.Fatalf("dead owner's namespace survived the sweep (%v)", err)
	}
	New(t) // a second sweep must keep the live lab
	if _, err := os.Stat("/run/netns/" + live.Prefix + "alive"); err != nil {
		t.Fatalf("live lab's namespace removed: %v", err)
	}
}

// A pod joining a node must not move the pods' gateway: a Linux bridge
// without an address of its own takes the lowest MAC of its ports, so a new
// pod whose veth sorts lower would change cni0's MAC under the feet of pods
// that already resolved it. Their frames then go to the old MAC, which the
// bridge drops (not its own address), until their neighbor entry expires:
// TestCoexistence's ambient sleep lost its tunnels for many seconds when
// the waypoint pod joined (CNI's bridge plugin sets the MAC for this
// reason, containernetworking/cni#285). The MACs are set here so that,
// without a fixed bridge MAC, the gateway's MAC would deterministically
// move to a port that is not the client's.
func TestGatewayMACStableWhenPodsJoin(t *testing.T) {
	c := NewCluster(t)
	n1, n2 := c.AddNode("n1"), c.AddNode("n2")
	client, early := n1.AddPod("client"), n1.AddPod("early")
	n1.MustIP("link", "set", early.Port, "address", "02:00:00:00:00:02")
	server := n2.AddPod("server")
	var ln net.Listener
	if err := server.Run(func() (err error) {
		ln, err = net.Listen("tcp", netip.AddrPortFrom(server.IP, 0).String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("hi"))
			c.Close()
		}
	}()
	reach := func() error {
		return client.Run(func() error {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			conn, err := (&net.Dialer{}).DialContext(ctx, "tcp", ln.Addr().String())
			if err != nil {
				return err
			}
			defer conn.Close()
			conn.SetReadDeadline(time.Now().Add(2 * time.Second))
			_, err = io.ReadAll(conn)
			return err
		})
	}
	// The client resolves its gateway (cni0) and reaches the other node.
	if err := reach(); err != nil {
		t.Fatalf("before another pod joins: %v", err)
	}
	before := bridgeMAC(t, n1)
	// A pod whose veth has the lowest MAC on the bridge joins.
	late := n1.AddPod("late")
	n1.MustIP("link", "set", late.Port, "address", "02:00:00:00:00:01")
	if after := bridgeMAC(t, n1); after != before {
		t.Errorf("cni0's MAC changed from %s to %s when a pod joined", before, after)
	}
	if err := reach(); err != nil {
		t.Fatalf("client lost its gateway when a pod joined: %v", err)
	}
}

func bridgeMAC(t *testing.T, n *Node) string {
	t.Helper()
	var mac string
	if err := n.Run(func() error {
		ifc, err := net.InterfaceByName("cni0")
		if err != nil {
			return err
		}
		mac = ifc.HardwareAddr.String()
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return mac
}

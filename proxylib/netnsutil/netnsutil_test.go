package netnsutil_test

import (
	"context"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/ambientmesh/ambient/proxylib/netnsutil"
	"github.com/ambientmesh/ambient/test/netns"
	"golang.org/x/sys/unix"
)

func TestRunEntersNamespace(t *testing.T) {
	lab := netns.New(t)
	ns := lab.NewNS("run")
	f, err := ns.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	want, _ := netnsutil.Inode(f)
	var inside uint64
	if err := netnsutil.Run(f, func() error {
		cur, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			return err
		}
		defer cur.Close()
		inside, err = netnsutil.Inode(cur)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if inside != want {
		t.Fatalf("inside Run the thread's netns inode is %d, want %d", inside, want)
	}
	host, _ := os.Open("/proc/thread-self/ns/net")
	defer host.Close()
	if h, _ := netnsutil.Inode(host); h == want {
		t.Fatal("calling thread was left in the target namespace")
	}
}

// echoOrigin serves connections by writing which listener got them and
// the connection's original destination.
func echoOrigin(t *testing.T, ln net.Listener, name string) {
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			od, err := netnsutil.OriginalDst(c)
			msg := name + " " + od.String()
			if err != nil {
				msg = name + " none"
			}
			_, _ = io.WriteString(c, msg)
			c.Close()
		}
	}()
}

func TestListenDialMarkOriginalDst(t *testing.T) {
	c := netns.NewCluster(t)
	node := c.AddNode("n1")
	client, server := node.AddPod("client"), node.AddPod("server")
	// In the client pod: unmarked outbound TCP is redirected to :15001.
	rules := `table inet amb_test {
	chain output {
		type nat hook output priority -100;
		meta mark 0x539 return
		oifname "lo" return
		meta l4proto tcp redirect to :15001
	}
}`
	cmd := client.Command(context.Background(), "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft: %v: %s", err, out)
	}
	cf, _ := client.Open()
	defer cf.Close()
	sf, _ := server.Open()
	defer sf.Close()

	capture, err := netnsutil.ListenTCP(cf, "[::]:15001", netnsutil.SocketOptions{ReuseAddr: true})
	if err != nil {
		t.Fatal(err)
	}
	defer capture.Close()
	echoOrigin(t, capture, "capture")
	app, err := netnsutil.ListenTCP(sf, "[::]:8080", netnsutil.SocketOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer app.Close()
	echoOrigin(t, app, "app")

	tests := []struct {
		name string
		dst  netip.AddrPort
		mark uint32
		want string
	}{
		{"unmarked v4 is captured", netip.AddrPortFrom(server.IP, 8080), 0, "capture " + netip.AddrPortFrom(server.IP, 8080).String()},
		{"unmarked v6 is captured", netip.AddrPortFrom(server.IP6, 8080), 0, "capture " + netip.AddrPortFrom(server.IP6, 8080).String()},
		{"marked v4 bypasses", netip.AddrPortFrom(server.IP, 8080), netnsutil.Mark, "app "},
		{"marked v6 bypasses", netip.AddrPortFrom(server.IP6, 8080), netnsutil.Mark, "app "},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			conn, err := netnsutil.DialTCP(context.Background(), cf, netip.AddrPort{}, tc.dst, netnsutil.SocketOptions{Mark: tc.mark})
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			if tc.mark != 0 {
				raw, _ := conn.(*net.TCPConn).SyscallConn()
				var m int
				_ = raw.Control(func(fd uintptr) { m, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK) })
				if uint32(m) != tc.mark {
					t.Fatalf("SO_MARK = %#x, want %#x", m, tc.mark)
				}
			}
			b, err := io.ReadAll(conn)
			if err != nil {
				t.Fatal(err)
			}
			if !strings.HasPrefix(string(b), tc.want) {
				t.Fatalf("got %q, want prefix %q", b, tc.want)
			}
		})
	}
}

func TestOriginalDstWithoutNAT(t *testing.T) {
	ln, err := netnsutil.ListenTCP(nil, "127.0.0.1:0", netnsutil.SocketOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err == nil {
			defer c.Close()
			_, _ = c.Read(make([]byte, 1))
		}
	}()
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// Without a conntrack NAT entry the kernel reports an error rather than
	// a made-up address; callers must not treat that as a destination.
	if od, err := netnsutil.OriginalDst(c); err == nil && od.String() != ln.Addr().String() {
		t.Fatalf("original dst %v without NAT, want error or the local address", od)
	}
}

// Two listeners with ReusePort share a port inside a pod namespace (an
// upgrade's two ztunnels); without it the second bind fails.
func TestReusePortSharesAListener(t *testing.T) {
	lab := netns.New(t)
	ns := lab.NewNS("reuse")
	f, err := ns.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	opts := netnsutil.SocketOptions{ReuseAddr: true, ReusePort: true}
	a, err := netnsutil.ListenTCP(f, "127.0.0.1:15001", opts)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	if _, err := netnsutil.ListenTCP(f, "127.0.0.1:15001", netnsutil.SocketOptions{ReuseAddr: true}); err == nil {
		t.Fatal("a listener without SO_REUSEPORT joined the port")
	}
	b, err := netnsutil.ListenTCP(f, "127.0.0.1:15001", opts)
	if err != nil {
		t.Fatalf("second SO_REUSEPORT listener: %v", err)
	}
	b.Close()
}

// EnableListenerMigration changes the pod namespace's sysctl, not the caller's.
func TestEnableListenerMigrationIsPerNamespace(t *testing.T) {
	lab := netns.New(t)
	ns := lab.NewNS("migrate")
	f, err := ns.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	host, _ := os.ReadFile("/proc/sys/net/ipv4/tcp_migrate_req")
	if err := netnsutil.EnableListenerMigration(f); err != nil {
		t.Fatal(err)
	}
	var inside []byte
	if err := netnsutil.Run(f, func() (err error) {
		inside, err = os.ReadFile("/proc/sys/net/ipv4/tcp_migrate_req")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if strings.TrimSpace(string(inside)) != "1" {
		t.Fatalf("tcp_migrate_req in the namespace = %q, want 1", inside)
	}
	if after, _ := os.ReadFile("/proc/sys/net/ipv4/tcp_migrate_req"); string(after) != string(host) {
		t.Fatalf("host tcp_migrate_req changed from %q to %q", host, after)
	}
}

// TestRunInOwnNamespaceUnprivileged: a process without capabilities (the
// sidecar, running as its own user inside its pod) opens sockets "in" its
// own namespace. Entering a namespace needs CAP_SYS_ADMIN even when it is
// the current one, so Run must not try.
func TestRunInOwnNamespaceUnprivileged(t *testing.T) {
	if os.Getenv("NETNSUTIL_UNPRIVILEGED_CHILD") == "1" {
		self, err := os.Open("/proc/self/ns/net")
		if err != nil {
			t.Fatal(err)
		}
		defer self.Close()
		ln, err := netnsutil.ListenTCP(self, "127.0.0.1:0", netnsutil.SocketOptions{ReuseAddr: true, ReusePort: true})
		if err != nil {
			t.Fatalf("listen in own namespace without privileges: %v", err)
		}
		ln.Close()
		return
	}
	netns.RequireRoot(t)
	// A copy of the test binary the unprivileged user may execute.
	dir := t.TempDir()
	for _, d := range []string{filepath.Dir(dir), dir} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	bin, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	exe := filepath.Join(dir, "netnsutil.test")
	if err := os.WriteFile(exe, bin, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run=^TestRunInOwnNamespaceUnprivileged$", "-test.count=1")
	cmd.Env = append(os.Environ(), "NETNSUTIL_UNPRIVILEGED_CHILD=1")
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("unprivileged child: %v\n%s", err, out)
	}
}

// NewScratch makes a namespace of its own that Run can enter, and leaves
// the caller where it was.
func TestNewScratch(t *testing.T) {
	netns.RequireRoot(t)
	self, err := os.Open("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	defer self.Close()
	scratch, err := netnsutil.NewScratch()
	if err != nil {
		t.Fatal(err)
	}
	defer scratch.Close()
	if netnsutil.IsCurrent(scratch) || !netnsutil.IsCurrent(self) {
		t.Fatal("the caller moved into the scratch namespace")
	}
	var ifaces []net.Interface
	if err := netnsutil.Run(scratch, func() error {
		var err error
		ifaces, err = net.Interfaces()
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if len(ifaces) != 1 || ifaces[0].Name != "lo" {
		t.Fatalf("scratch namespace interfaces %v, want only lo", ifaces)
	}
}

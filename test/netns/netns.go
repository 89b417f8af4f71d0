// Package netns builds throw-away network topologies out of Linux network
// namespaces for tests: namespaces, veth pairs, bridges, addresses and
// routes, plus helpers to run Go code or processes inside a namespace.
//
// Every object lives inside namespaces the lab created (veths are created
// directly in their target namespaces), so nothing touches the host's own
// network. All names carry a random per-lab prefix (amb-<hex>-) and are
// removed by t.Cleanup, also when the test fails.
//
// The tests need root. Without it they are skipped, except when CI=true,
// where a missing privilege is a failure.
package netns

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// RequireRoot skips the test when not running as root, or fails it when CI=true.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("namespaced test needs root (CI=true, so this is a failure, not a skip)")
	}
	t.Skip("namespaced test needs root; run with sudo or as root")
}

// Lab owns a set of namespaces sharing one unique prefix.
type Lab struct {
	t      testing.TB
	Prefix string

	mu   sync.Mutex
	nss  []*NS
	next int // counter for generated interface names
}

// New creates an empty lab; everything it creates is removed at test cleanup.
func New(t testing.TB) *Lab {
	t.Helper()
	RequireRoot(t)
	var b [3]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	l := &Lab{t: t, Prefix: "amb-" + hex.EncodeToString(b[:]) + "-"}
	sweepDeadLabs(t)
	if err := registerLab(l.Prefix); err != nil {
		t.Logf("netns: cannot record lab owner (stale sweep disabled): %v", err)
	}
	t.Cleanup(func() {
		l.cleanup()
		_ = os.Remove(filepath.Join(ownersDir, l.Prefix))
	})
	return l
}

// ownersDir records which process owns each lab prefix, so a later test
// can remove namespaces left by a test binary that died (timeout panic,
// SIGKILL) without touching labs of processes still running.
const ownersDir = "/run/amb-netns-owners"

func registerLab(prefix string) error {
	if err := os.MkdirAll(ownersDir, 0o700); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(ownersDir, prefix), []byte(strconv.Itoa(os.Getpid())), 0o600)
}

// sweepDeadLabs deletes the namespaces of labs whose owner process is gone.
func sweepDeadLabs(t testing.TB) {
	entries, err := os.ReadDir(ownersDir)
	if err != nil {
		return
	}
	names, _ := os.ReadDir("/run/netns")
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(ownersDir, e.Name()))
		if err != nil {
			continue
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || pid <= 0 || unix.Kill(pid, 0) == nil || !errors.Is(unix.Kill(pid, 0), unix.ESRCH) {
			continue // owner alive (or unknown): leave it
		}
		for _, n := range names {
			if strings.HasPrefix(n.Name(), e.Name()) {
				if out, err := exec.Command("ip", "netns", "del", n.Name()).CombinedOutput(); err != nil {
					t.Logf("sweep %s: %v: %s", n.Name(), err, out)
				}
			}
		}
		_ = os.Remove(filepath.Join(ownersDir, e.Name()))
	}
}

// NS is one named network namespace (a bind mount under /run/netns).
type NS struct {
	lab  *Lab
	Name string // full name including the lab prefix, usable with `ip netns exec`
}

// Path is the bind-mounted namespace file.
func (n *NS) Path() string { return "/run/netns/" + n.Name }

// Open returns a file referring to the namespace (caller closes it).
func (n *NS) Open() (*os.File, error) { return os.Open(n.Path()) }

// NewNS creates a namespace with loopback up. Interfaces created in it
// later skip IPv6 duplicate address detection for their link-local
// addresses too: while a link-local address is tentative, neighbor
// discovery from that interface cannot start, so the first IPv6 packets
// after a pod appears (a DNS reply, a SYN-ACK) were lost.
func (l *Lab) NewNS(name string) *NS {
	l.t.Helper()
	ns := &NS{lab: l, Name: l.Prefix + name}
	l.mustIP("netns", "add", ns.Name)
	l.mu.Lock()
	l.nss = append(l.nss, ns)
	l.mu.Unlock()
	ns.MustIP("link", "set", "lo", "up")
	ns.Sysctl("net.ipv6.conf.default.accept_dad", "0")
	ns.Sysctl("net.ipv6.conf.all.accept_dad", "0")
	return ns
}

func (l *Lab) cleanup() {
	l.mu.Lock()
	defer l.mu.Unlock()
	for i := len(l.nss) - 1; i >= 0; i-- {
		if out, err := exec.Command("ip", "netns", "del", l.nss[i].Name).CombinedOutput(); err != nil {
			l.t.Logf("netns cleanup %s: %v: %s", l.nss[i].Name, err, out)
		}
	}
	l.nss = nil
}

func (l *Lab) mustIP(args ...string) {
	l.t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		l.t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// MustIP runs `ip -n <ns> args...` and fails the test on error.
func (n *NS) MustIP(args ...string) {
	n.lab.t.Helper()
	n.lab.mustIP(append([]string{"-n", n.Name}, args...)...)
}

// Sysctl writes a per-namespace sysctl such as "net.ipv4.ip_forward".
func (n *NS) Sysctl(key, value string) {
	n.lab.t.Helper()
	path := "/proc/sys/" + strings.ReplaceAll(key, ".", "/")
	err := n.Run(func() error { return os.WriteFile(path, []byte(value), 0o644) })
	if err != nil {
		n.lab.t.Fatalf("sysctl %s=%s in %s: %v", key, value, n.Name, err)
	}
}

// Veth connects a and b with a veth pair named aIf (in a) and bIf (in b),
// both set up. Names only need to be unique inside their own namespace.
func (l *Lab) Veth(a *NS, aIf string, b *NS, bIf string) {
	l.t.Helper()
	// Create in a, with the peer directly in b: no interface ever appears in
	// the host namespace.
	a.MustIP("link", "add", aIf, "type", "veth", "peer", "name", bIf, "netns", b.Name)
	a.MustIP("link", "set", aIf, "up")
	b.MustIP("link", "set", bIf, "up")
}

// Bridge creates a bridge interface in n, optionally with an address.
//
// The bridge gets a MAC of its own, set explicitly (as CNI's bridge plugin
// does): otherwise Linux gives it the lowest MAC of its ports, which moves
// whenever a port with a lower one joins or that port leaves, and hosts that
// resolved the bridge's address (pods, for their gateway) keep sending to
// the old MAC, which the bridge drops, until their neighbor entry expires.
func (n *NS) Bridge(name string, addr string) {
	n.lab.t.Helper()
	n.MustIP("link", "add", name, "type", "bridge")
	n.MustIP("link", "set", name, "address", n.lab.randomMAC())
	n.MustIP("link", "set", name, "up")
	if addr != "" {
		n.MustIP("addr", "add", addr, "dev", name)
	}
}

// Enslave attaches interface ifName of n to bridge br (also in n).
func (n *NS) Enslave(ifName, br string) {
	n.lab.t.Helper()
	n.MustIP("link", "set", ifName, "master", br)
}

// AddAddr assigns a prefix (e.g. "10.0.0.2/24"); IPv6 addresses skip DAD so
// they are usable at once.
func (n *NS) AddAddr(ifName, prefix string) {
	n.lab.t.Helper()
	args := []string{"addr", "add", prefix, "dev", ifName}
	if strings.Contains(prefix, ":") {
		args = append(args, "nodad")
	}
	n.MustIP(args...)
}

// Route adds a route, e.g. Route("default", "via", "10.0.0.1").
func (n *NS) Route(args ...string) {
	n.lab.t.Helper()
	n.MustIP(append([]string{"route", "replace"}, args...)...)
}

// Run calls fn on an OS thread switched into the namespace. The thread is
// discarded afterwards if it cannot be switched back.
func (n *NS) Run(fn func() error) error {
	f, err := n.Open()
	if err != nil {
		return err
	}
	defer f.Close()
	return runIn(f, fn)
}

func runIn(target *os.File, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			errc <- err
			return // thread stays locked and dies with the goroutine
		}
		defer orig.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("setns: %w", err)
			return
		}
		ferr := fn()
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("restore netns: %w (function error: %v)", err, ferr)
			return // keep the thread locked: Go terminates it
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// Command returns a command that runs inside the namespace via `ip netns exec`.
func (n *NS) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.Name, name}, args...)...)
}

// Start starts a long-running process inside the namespace and kills it at
// test cleanup. Output goes to the test log.
func (n *NS) Start(name string, args ...string) *exec.Cmd {
	t := n.lab.t
	t.Helper()
	cmd := n.Command(context.Background(), name, args...)
	cmd.Stdout = testWriter{t, n.Name}
	cmd.Stderr = testWriter{t, n.Name}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s in %s: %v", name, n.Name, err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	return cmd
}

type testWriter struct {
	t    testing.TB
	name string
}

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Logf("[%s] %s", w.name, strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// randomMAC returns a random unicast, locally administered MAC address.
func (l *Lab) randomMAC() string {
	l.t.Helper()
	var b [6]byte
	if _, err := rand.Read(b[:]); err != nil {
		l.t.Fatal(err)
	}
	b[0] = b[0]&^0x01 | 0x02
	return net.HardwareAddr(b[:]).String()
}

// ifName returns a fresh interface name unique within the lab.
func (l *Lab) ifName(kind string) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.next++
	return fmt.Sprintf("%s%d", kind, l.next)
}

// mustPrefix parses a CIDR or fails the test.
func (l *Lab) mustPrefix(s string) netip.Prefix {
	l.t.Helper()
	p, err := netip.ParsePrefix(s)
	if err != nil {
		l.t.Fatalf("bad prefix %q: %v", s, err)
	}
	return p
}

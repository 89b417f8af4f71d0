package perftest

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ambientmesh/ambient/test/bench/hboneload"
)

// RelayFloor is the floor a proxy pair is measured against in the same
// run: two plain mutual-TLS 1.3 relay processes (cmd/hbone-load relay
// tls-client / tls-server), one TLS connection per client connection, with
// the mesh's certificate checks and copy loop but no HTTP/2, discovery or
// policy. What it adds over direct TCP is what any user-space TLS proxy pair
// pays on this machine; what the mesh adds over it is HBONE and the product.
type RelayFloor struct {
	// Server is where the client-side relay serves each upstream port, on
	// loopback in the client's namespace (dial it from there).
	Server Server
	// PIDs of the client-side and server-side relay.
	PIDs [2]int
}

// StartRelayFloor builds cmd/hbone-load and starts one relay pair per
// upstream port: the client side in clientNS (as the mesh's proxy listens in
// the client pod's namespace), the server side on serverIP in serverNS.
// Namespaces are `ip netns` names.
func StartRelayFloor(t *testing.T, clientNS, serverNS string, serverIP netip.Addr, upstream Server) RelayFloor {
	dir := t.TempDir()
	bin := filepath.Join(dir, "hbone-load")
	build := exec.Command("go", "build", "-trimpath", "-o", bin, "github.com/ambientmesh/ambient/cmd/hbone-load")
	build.Env = append(build.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build hbone-load: %v\n%s", err, out)
	}
	certs := t.TempDir()
	if err := hboneload.WriteCerts(certs); err != nil {
		t.Fatal(err)
	}
	var f RelayFloor
	relay := func(up netip.AddrPort, offset uint16) netip.AddrPort {
		srv := netip.AddrPortFrom(serverIP, up.Port()+offset)
		f.PIDs[1] = startRelay(t, serverNS, bin, "-mode", "tls-server", "-listen", srv.String(), "-upstream", up.String(), "-certs", certs)
		cli := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), up.Port()+offset)
		f.PIDs[0] = startRelay(t, clientNS, bin, "-mode", "tls-client", "-listen", cli.String(), "-upstream", srv.String(), "-certs", certs)
		return cli
	}
	// One pair per port; the pids kept are the HTTP pair's, the one the
	// CPU per request is measured on.
	f.Server.Sink = relay(upstream.Sink, 20000)
	f.Server.Echo = relay(upstream.Echo, 20000)
	f.Server.HTTP = relay(upstream.HTTP, 20000)
	return f
}

// startRelay runs `hbone-load relay args` in ns until the test ends and
// returns its pid once it is ready.
func startRelay(t *testing.T, ns, bin string, args ...string) int {
	var stderr strings.Builder
	p, err := hboneload.StartProc(append([]string{"ip", "netns", "exec", ns, bin, "relay"}, args...), &stderr)
	if err != nil {
		t.Fatalf("%v: %s", err, stderr.String())
	}
	t.Cleanup(p.Stop)
	return p.Pid()
}

// StartSocatFloor starts the same floor in C: a socat relay pair with
// OpenSSL (TLS 1.3, 64 KiB copies, a process per connection), so a floor
// that Go's runtime might raise is checked against one without it. The
// client side does not check the server's name (socat cannot check a SPIFFE
// URI), which changes nothing per byte or per request. ok is false when socat
// is not installed (in CI, where .ci/run installs it, that fails the test).
func StartSocatFloor(t *testing.T, clientNS, serverNS string, serverIP netip.Addr, upstream Server, dial Dial) (srv Server, ok bool) {
	if _, err := exec.LookPath("socat"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("socat not installed (.ci/run installs it)")
		}
		return Server{}, false
	}
	certs := t.TempDir()
	if err := hboneload.WriteCerts(certs); err != nil {
		t.Fatal(err)
	}
	pem := func(name string) string { return filepath.Join(certs, name) }
	relay := func(up netip.AddrPort) netip.AddrPort {
		port := up.Port() + 30000
		startSocat(t, serverNS, fmt.Sprintf("OPENSSL-LISTEN:%d,bind=%s,reuseaddr,fork,cert=%s,key=%s,cafile=%s,verify=1", port, serverIP, pem("server.pem"), pem("server-key.pem"), pem("root.pem")),
			"TCP:"+up.String()+",nodelay")
		startSocat(t, clientNS, fmt.Sprintf("TCP-LISTEN:%d,bind=127.0.0.1,reuseaddr,fork,nodelay", port),
			fmt.Sprintf("OPENSSL:%s:%d,cert=%s,key=%s,cafile=%s,verify=0,nodelay", serverIP, port, pem("client.pem"), pem("client-key.pem"), pem("root.pem")))
		cli := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port)
		waitDial(t, dial, cli)
		return cli
	}
	return Server{Sink: relay(upstream.Sink), Echo: relay(upstream.Echo), HTTP: relay(upstream.HTTP)}, true
}

// startSocat runs socat from → to in ns, in a process group of its own (its
// per-connection children are stopped with it when the test ends).
func startSocat(t *testing.T, ns, from, to string) {
	cmd := exec.Command("ip", "netns", "exec", ns, "socat", "-b", "65536", from, to)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		cmd.Wait()
		if t.Failed() && stderr.Len() > 0 {
			t.Logf("socat %s: %s", from, stderr.String())
		}
	})
}

// waitDial waits until dst accepts a connection that stays open.
func waitDial(t *testing.T, dial Dial, dst netip.AddrPort) {
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := dial(dst)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not listening: %v", dst, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

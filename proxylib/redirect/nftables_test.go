package redirect_test

import (
	"context"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/ambientmesh/ambient/proxylib/netnsutil"
	"github.com/ambientmesh/ambient/proxylib/redirect"
	"github.com/ambientmesh/ambient/test/netns"
)

type topo struct {
	pod, peer     *netns.Pod
	podNS, peerNS *os.File
}

func newTopo(t *testing.T) topo {
	c := netns.NewCluster(t)
	n1, n2 := c.AddNode("n1"), c.AddNode("n2")
	tp := topo{pod: n1.AddPod("pod"), peer: n2.AddPod("peer")}
	var err error
	if tp.podNS, err = tp.pod.Open(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tp.podNS.Close() })
	if tp.peerNS, err = tp.peer.Open(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tp.peerNS.Close() })
	return tp
}

// serve answers every connection with "<name> <original dst or none>".
func serve(t *testing.T, ns *os.File, addr, name string) {
	t.Helper()
	ln, err := netnsutil.ListenTCP(ns, addr, netnsutil.SocketOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			msg := name + " none"
			// Without NAT the original destination is the local address.
			if od, err := netnsutil.OriginalDst(c); err == nil && od.String() != c.LocalAddr().String() {
				msg = name + " " + od.String()
			}
			_, _ = io.WriteString(c, msg)
			c.Close()
		}
	}()
}

func ask(t *testing.T, ns *os.File, dst netip.AddrPort, mark uint32) string {
	t.Helper()
	c, err := netnsutil.DialTCP(context.Background(), ns, netip.AddrPort{}, dst, netnsutil.SocketOptions{Mark: mark})
	if err != nil {
		t.Fatalf("dial %v: %v", dst, err)
	}
	defer c.Close()
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func nftList(t *testing.T, p *netns.Pod) string {
	out, _ := p.Command(context.Background(), "nft", "list", "ruleset").CombinedOutput()
	return string(out)
}

func TestInstallRemoveIdempotentAndExact(t *testing.T) {
	tp := newTopo(t)
	// A foreign table in the pod must survive our install and removal.
	cmd := tp.pod.Command(context.Background(), "nft", "add", "table", "inet", "other")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	r := redirect.NewNFTables(redirect.DefaultConfig())
	if ok, err := r.Installed(tp.podNS); err != nil || ok {
		t.Fatalf("Installed before install = %v, %v; want false", ok, err)
	}
	for i := 0; i < 2; i++ {
		if err := r.Install(tp.podNS); err != nil {
			t.Fatalf("install #%d: %v", i+1, err)
		}
	}
	rules := nftList(t, tp.pod)
	for _, want := range []string{"table inet ambient", "redirect to :15001", "redirect to :15006", "tcp dport 15008 return", `oifname "lo" return`, "0x00000539"} {
		if !strings.Contains(rules, want) {
			t.Errorf("ruleset lacks %q:\n%s", want, rules)
		}
	}
	if n := strings.Count(rules, "redirect to :15001"); n != 1 {
		t.Errorf("install twice left %d outbound redirects, want 1", n)
	}
	if ok, err := r.Installed(tp.podNS); err != nil || !ok {
		t.Fatalf("Installed after install = %v, %v; want true", ok, err)
	}
	for i := 0; i < 2; i++ {
		if err := r.Remove(tp.podNS); err != nil {
			t.Fatalf("remove #%d: %v", i+1, err)
		}
	}
	rules = nftList(t, tp.pod)
	if strings.Contains(rules, "ambient") || !strings.Contains(rules, "table inet other") {
		t.Fatalf("after remove, ruleset:\n%s", rules)
	}
	if ok, _ := r.Installed(tp.podNS); ok {
		t.Fatal("Installed after remove = true")
	}
}

func TestInstalledDetectsPartialRules(t *testing.T) {
	tp := newTopo(t)
	r := redirect.NewNFTables(redirect.DefaultConfig())
	if err := r.Install(tp.podNS); err != nil {
		t.Fatal(err)
	}
	cmd := tp.pod.Command(context.Background(), "nft", "flush", "chain", "inet", "ambient", "prerouting")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if ok, _ := r.Installed(tp.podNS); ok {
		t.Fatal("Installed = true with an empty prerouting chain")
	}
}

var backends = []struct {
	name string
	new  func(redirect.Config) redirect.Redirector
}{
	{"nftables", func(c redirect.Config) redirect.Redirector { return redirect.NewNFTables(c) }},
	{"iptables", func(c redirect.Config) redirect.Redirector { return redirect.NewIPTables(c) }},
}

func TestRedirection(t *testing.T) {
	for _, b := range backends {
		t.Run(b.name, func(t *testing.T) { testRedirection(t, b.new) })
	}
}

func testRedirection(t *testing.T, newRedirector func(redirect.Config) redirect.Redirector) {
	tp := newTopo(t)
	// ztunnel's sockets in the pod, the app in the pod, a server outside.
	serve(t, tp.podNS, "[::]:15001", "outbound")
	serve(t, tp.podNS, "[::]:15006", "inbound")
	serve(t, tp.podNS, "[::]:15008", "hbone")
	serve(t, tp.podNS, "[::]:8080", "app")
	serve(t, tp.peerNS, "[::]:9090", "peer")

	cfg := redirect.DefaultConfig()
	r := newRedirector(cfg)
	if ok, err := r.Installed(tp.podNS); err != nil || ok {
		t.Fatalf("Installed before install = %v, %v", ok, err)
	}
	for i := 0; i < 2; i++ { // idempotent
		if err := r.Install(tp.podNS); err != nil {
			t.Fatal(err)
		}
	}
	if ok, err := r.Installed(tp.podNS); err != nil || !ok {
		t.Fatalf("Installed after install = %v, %v", ok, err)
	}
	peer4, peer6 := netip.AddrPortFrom(tp.peer.IP, 9090), netip.AddrPortFrom(tp.peer.IP6, 9090)
	app4, app6 := netip.AddrPortFrom(tp.pod.IP, 8080), netip.AddrPortFrom(tp.pod.IP6, 8080)
	tests := []struct {
		name string
		from *os.File
		dst  netip.AddrPort
		mark uint32
		want string
	}{
		{"outbound v4 to 15001", tp.podNS, peer4, 0, "outbound " + peer4.String()},
		{"outbound v6 to 15001", tp.podNS, peer6, 0, "outbound " + peer6.String()},
		{"inbound v4 to 15006", tp.peerNS, app4, 0, "inbound " + app4.String()},
		{"inbound v6 to 15006", tp.peerNS, app6, 0, "inbound " + app6.String()},
		{"inbound hbone untouched", tp.peerNS, netip.AddrPortFrom(tp.pod.IP, 15008), 0, "hbone none"},
		{"marked outbound bypasses", tp.podNS, peer4, netnsutil.Mark, "peer none"},
		{"pod to itself bypasses", tp.podNS, app4, 0, "app none"},
		{"pod to loopback bypasses", tp.podNS, netip.MustParseAddrPort("127.0.0.1:8080"), 0, "app none"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := ask(t, tc.from, tc.dst, tc.mark); got != tc.want {
				t.Fatalf("got %q, want %q", got, tc.want)
			}
		})
	}

	for i := 0; i < 2; i++ {
		if err := r.Remove(tp.podNS); err != nil {
			t.Fatal(err)
		}
	}
	if ok, _ := r.Installed(tp.podNS); ok {
		t.Fatal("Installed after remove = true")
	}
	t.Run("released", func(t *testing.T) {
		if got := ask(t, tp.podNS, peer4, 0); got != "peer none" {
			t.Errorf("outbound after remove: %q", got)
		}
		if got := ask(t, tp.peerNS, app4, 0); got != "app none" {
			t.Errorf("inbound after remove: %q", got)
		}
	})

	t.Run("sidecar exclusions", func(t *testing.T) {
		// The sidecar's user, excluded ports and ranges pass; the rest
		// (another user, other ports, other ranges) is still captured. The
		// exclusions are the pod's traffic.sidecar.istio.io annotations as
		// `sidecar init` reads them (ParseExclusions, SidecarConfig).
		const sidecarUID, appUID = 1337, 1000
		other := netip.AddrPortFrom(tp.peer.IP, 9091)
		serve(t, tp.peerNS, "[::]:9091", "other")
		excludedIn := netip.AddrPortFrom(tp.pod.IP, 9092)
		serve(t, tp.podNS, "[::]:9092", "metrics")
		ex, err := redirect.ParseExclusions("9091", "9092", tp.peer.IP6.String()+"/128")
		if err != nil {
			t.Fatal(err)
		}
		sr := newRedirector(redirect.SidecarConfig(sidecarUID, ex))
		if err := sr.Install(tp.podNS); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = sr.Remove(tp.podNS) })
		if ok, err := sr.Installed(tp.podNS); err != nil || !ok {
			t.Fatalf("Installed = %v, %v", ok, err)
		}
		askAs := func(dst netip.AddrPort, uid int) string {
			c, err := netns.DialAs(context.Background(), tp.podNS, dst, uid)
			if err != nil {
				t.Fatalf("dial %v as %d: %v", dst, uid, err)
			}
			defer c.Close()
			b, _ := io.ReadAll(c)
			return string(b)
		}
		cases := []struct {
			name string
			dst  netip.AddrPort
			uid  int
			want string
		}{
			{"sidecar user passes", peer4, sidecarUID, "peer none"},
			{"app user captured", peer4, appUID, "outbound " + peer4.String()},
			{"root captured", peer4, 0, "outbound " + peer4.String()},
			{"excluded port passes", other, appUID, "other none"},
			{"excluded v6 range passes", peer6, appUID, "peer none"},
		}
		for _, tc := range cases {
			if got := askAs(tc.dst, tc.uid); got != tc.want {
				t.Errorf("%s: got %q, want %q", tc.name, got, tc.want)
			}
		}
		if got := ask(t, tp.peerNS, excludedIn, 0); got != "metrics none" {
			t.Errorf("excluded inbound port: got %q, want it to reach the app directly", got)
		}
		if got := ask(t, tp.peerNS, app4, 0); got != "inbound "+app4.String() {
			t.Errorf("other inbound port: got %q, want it captured", got)
		}
	})

	t.Run("skip inbound source", func(t *testing.T) {
		cfg := redirect.DefaultConfig()
		cfg.SkipInboundSources = []netip.Prefix{netip.PrefixFrom(tp.peer.IP, 32)}
		if err := newRedirector(cfg).Install(tp.podNS); err != nil {
			t.Fatal(err)
		}
		if got := ask(t, tp.peerNS, app4, 0); got != "app none" {
			t.Errorf("skipped v4 source: %q", got)
		}
		if got := ask(t, tp.peerNS, app6, 0); got != "inbound "+app6.String() {
			t.Errorf("v6 source not in skip list: %q", got)
		}
	})
}

func TestIPTablesRemoveIsExact(t *testing.T) {
	tp := newTopo(t)
	run := func(args ...string) string {
		out, err := tp.pod.Command(context.Background(), "iptables", args...).CombinedOutput()
		if err != nil {
			t.Fatalf("iptables %v: %v: %s", args, err, out)
		}
		return string(out)
	}
	run("-t", "nat", "-A", "OUTPUT", "-p", "udp", "-j", "RETURN")
	run("-t", "mangle", "-A", "OUTPUT", "-p", "udp", "-j", "RETURN")
	cfg := redirect.DefaultConfig()
	cfg.PreserveSource = true
	r := redirect.NewIPTables(cfg)
	for i := 0; i < 2; i++ {
		if err := r.Install(tp.podNS); err != nil {
			t.Fatal(err)
		}
	}
	if got := strings.Count(run("-t", "nat", "-S", "OUTPUT"), "-j AMBIENT_OUTPUT"); got != 1 {
		t.Fatalf("%d jumps to AMBIENT_OUTPUT, want 1", got)
	}
	if got := strings.Count(run("-t", "mangle", "-S", "PREROUTING"), "-j AMBIENT_MANGLE_PRE"); got != 1 {
		t.Fatalf("%d jumps to AMBIENT_MANGLE_PRE, want 1", got)
	}
	if err := r.Remove(tp.podNS); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ table, keep string }{
		{"nat", "-A OUTPUT -p udp -j RETURN"},
		{"mangle", "-A OUTPUT -p udp -j RETURN"},
	} {
		rules := run("-t", tc.table, "-S")
		if strings.Contains(rules, "AMBIENT") || !strings.Contains(rules, tc.keep) {
			t.Fatalf("%s table after remove:\n%s", tc.table, rules)
		}
	}
}

// serveRemote answers with the peer address it saw.
func serveRemote(t *testing.T, ns *os.File, addr string) {
	ln, err := netnsutil.ListenTCP(ns, addr, netnsutil.SocketOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_, _ = io.WriteString(c, "app from "+c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap().String())
			c.Close()
		}
	}()
}

func TestProbeSNAT(t *testing.T) {
	tp := newTopo(t)
	nodeNS, err := tp.pod.Node.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer nodeNS.Close()
	serve(t, tp.podNS, "[::]:15006", "inbound")
	serveRemote(t, tp.podNS, "[::]:8081")
	if err := redirect.NewNFTables(redirect.DefaultConfig()).Install(tp.podNS); err != nil {
		t.Fatal(err)
	}
	var snat redirect.ProbeSNAT
	if err := snat.Install(nodeNS); err != nil {
		t.Fatal(err)
	}
	podIPs := []netip.Addr{tp.pod.IP, tp.pod.IP6}
	if err := snat.AddPod(nodeNS, podIPs); err != nil {
		t.Fatal(err)
	}
	if err := snat.Ensure(nodeNS); err != nil { // a restarted agent keeps the sets
		t.Fatal(err)
	}
	app4, app6 := netip.AddrPortFrom(tp.pod.IP, 8081), netip.AddrPortFrom(tp.pod.IP6, 8081)
	tests := []struct {
		name string
		from *os.File
		dst  netip.AddrPort
		want string
	}{
		{"kubelet v4 probe reaches the app", nodeNS, app4, "app from " + redirect.ProbeSourceV4.String()},
		{"kubelet v6 probe reaches the app", nodeNS, app6, "app from " + redirect.ProbeSourceV6.String()},
		{"forwarded traffic is still captured", tp.peerNS, app4, "inbound " + app4.String()},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := ask(t, tc.from, tc.dst, 0); got != tc.want {
				t.Fatalf("got %q, want %q", got, tc.want)
			}
		})
	}
	for i := 0; i < 2; i++ {
		if err := snat.RemovePod(nodeNS, podIPs); err != nil {
			t.Fatalf("remove pod #%d: %v", i+1, err)
		}
	}
	if got := ask(t, nodeNS, app4, 0); got != "inbound "+app4.String() {
		t.Fatalf("after RemovePod the node's connection reached %q, want ztunnel inbound", got)
	}
	if err := snat.Remove(nodeNS); err != nil {
		t.Fatal(err)
	}
	out, _ := tp.pod.Node.Command(context.Background(), "nft", "list", "ruleset").CombinedOutput()
	if strings.Contains(string(out), redirect.HostTableName) {
		t.Fatalf("host table left behind:\n%s", out)
	}
}

func TestPreserveSource(t *testing.T) {
	for _, b := range backends {
		t.Run(b.name, func(t *testing.T) { testPreserveSource(t, b.new) })
	}
}

func testPreserveSource(t *testing.T, newRedirector func(redirect.Config) redirect.Redirector) {
	tp := newTopo(t)
	serveRemote(t, tp.podNS, "[::]:8082")
	cfg := redirect.DefaultConfig()
	cfg.PreserveSource = true
	r := newRedirector(cfg)
	if !r.PreservesSource() {
		t.Fatal("PreservesSource = false with Config.PreserveSource")
	}
	for i := 0; i < 2; i++ {
		if err := r.Install(tp.podNS); err != nil {
			t.Fatalf("install #%d: %v", i+1, err)
		}
	}
	if ok, err := r.Installed(tp.podNS); err != nil || !ok {
		t.Fatalf("Installed = %v, %v", ok, err)
	}
	if ok, err := redirect.HasSourceRouting(tp.podNS); err != nil || !ok {
		t.Fatalf("HasSourceRouting = %v, %v", ok, err)
	}
	// A lost route is noticed (re-adoption re-installs) and restored.
	if out, err := tp.pod.Command(context.Background(), "ip", "route", "del", "local", "default", "table", "133").CombinedOutput(); err != nil {
		t.Fatalf("ip route del: %v: %s", err, out)
	}
	if ok, _ := r.Installed(tp.podNS); ok {
		t.Fatal("Installed = true without the local route")
	}
	if err := r.Install(tp.podNS); err != nil {
		t.Fatal(err)
	}
	if ok, err := r.Installed(tp.podNS); err != nil || !ok {
		t.Fatalf("Installed after re-install = %v, %v", ok, err)
	}
	// ztunnel delivering inbound traffic as the client would.
	spoof := func(src netip.Addr, dst netip.AddrPort) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		c, err := netnsutil.DialTCP(ctx, tp.podNS, netip.AddrPortFrom(src, 0), dst,
			netnsutil.SocketOptions{Mark: netnsutil.Mark, Transparent: true})
		if err != nil {
			return "", err
		}
		defer c.Close()
		_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
		b, err := io.ReadAll(c)
		return string(b), err
	}
	tests := []struct {
		src netip.Addr
		dst netip.AddrPort
	}{
		{tp.peer.IP, netip.AddrPortFrom(tp.pod.IP, 8082)},
		{tp.peer.IP6, netip.AddrPortFrom(tp.pod.IP6, 8082)},
	}
	for _, tc := range tests {
		t.Run(tc.src.String(), func(t *testing.T) {
			got, err := spoof(tc.src, tc.dst)
			if err != nil || got != "app from "+tc.src.String() {
				t.Fatalf("app saw %q (%v), want the client address %v", got, err, tc.src)
			}
		})
	}
	noRouting := func(when string) {
		t.Helper()
		for _, args := range [][]string{{"rule", "show"}, {"-6", "rule", "show"}, {"route", "show", "table", "133"}, {"-6", "route", "show", "table", "133"}} {
			out, _ := tp.pod.Command(context.Background(), "ip", args...).CombinedOutput()
			if strings.Contains(string(out), "lookup 133") || strings.Contains(string(out), "local default") {
				t.Fatalf("%s: ip %v still shows the return path:\n%s", when, args, out)
			}
		}
		if ok, _ := redirect.HasSourceRouting(tp.podNS); ok {
			t.Fatalf("%s: HasSourceRouting = true", when)
		}
	}
	if err := r.Remove(tp.podNS); err != nil {
		t.Fatal(err)
	}
	noRouting("after remove")
	if err := r.Remove(tp.podNS); err != nil {
		t.Fatalf("second remove: %v", err)
	}
	// Re-installing without preservation (node agent restarted with it off)
	// must not leave the return path of an earlier install behind.
	if err := r.Install(tp.podNS); err != nil {
		t.Fatal(err)
	}
	plain := newRedirector(redirect.DefaultConfig())
	if err := plain.Install(tp.podNS); err != nil {
		t.Fatal(err)
	}
	noRouting("after install without preservation")
	if ok, err := plain.Installed(tp.podNS); err != nil || !ok {
		t.Fatalf("Installed without preservation = %v, %v", ok, err)
	}
	// Without the routing, replies leave through eth0: delivery fails.
	if got, err := spoof(tp.peer.IP, netip.AddrPortFrom(tp.pod.IP, 8082)); err == nil && got != "" {
		t.Fatalf("spoofed delivery worked without source preservation: %q", got)
	}
	if err := plain.Remove(tp.podNS); err != nil {
		t.Fatal(err)
	}
}

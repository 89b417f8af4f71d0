package hboneload

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// BenchConfig is one benchmark run over every mode.
type BenchConfig struct {
	Exe        string   // the hbone-load binary the roles run from
	Modes      []string // "raw", "tls", then HBONE transports
	Bytes      int64    // throughput: bytes per run
	Streams    []int    // throughput: parallel streams per run
	Repeat     int      // throughput runs per figure (median reported)
	PingPongs  int      // latency: round trips
	Tunnels    []int    // memory: idle tunnels held open
	Opens      int      // pooled tunnel opens
	Handshakes int      // new mTLS connections
	ProfileDir string   // when set: CPU profiles of the proxies in a single-stream run
	Copy       string   // proxies' copy loop: "shared" (hbone.Relay) or "adaptive"
	FrameFit   bool     // proxies split tunnel writes to one DATA frame per TLS record
	Progress   io.Writer
}

// ModeResult holds one mode's figures; zero means not measured.
type ModeResult struct {
	Mode        string
	Throughput  map[int]float64 // streams -> bytes/s (median)
	P50, P99    float64         // µs round trip, 1 KiB
	MemClient   map[int]float64 // tunnels -> bytes per tunnel, client-side proxy
	MemServer   map[int]float64 // tunnels -> bytes per tunnel, server-side proxy
	Opens       float64         // pooled tunnel opens per second
	Handshakes  float64         // new mTLS connections per second
	Errors      []string
	Notes       []string
	hasProxies  bool
	handshakeOn string
}

// Report is a whole run.
type Report struct {
	Config     BenchConfig
	Started    time.Time
	Duration   time.Duration
	LoadBefore string
	LoadAfter  string
	Modes      []*ModeResult
}

func benchCmd(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	cfg := BenchConfig{Progress: stderr}
	modes := fs.String("modes", "raw,tls,"+strings.Join(Transports(), ","), "modes to measure")
	fs.Int64Var(&cfg.Bytes, "bytes", 2<<30, "throughput: bytes per run")
	streams := fs.String("streams", "1,4", "throughput: stream counts")
	fs.IntVar(&cfg.Repeat, "repeat", 3, "throughput runs per figure (median)")
	fs.IntVar(&cfg.PingPongs, "pingpongs", 20000, "latency: 1 KiB round trips")
	tunnels := fs.String("tunnels", "1000,10000", "memory: idle tunnel counts")
	fs.IntVar(&cfg.Opens, "opens", 20000, "pooled tunnel opens")
	fs.IntVar(&cfg.Handshakes, "handshakes", 2000, "new mTLS connections")
	fs.StringVar(&cfg.ProfileDir, "profile-dir", "", "also write proxy CPU profiles of a single-stream run here")
	fs.StringVar(&cfg.Copy, "copy", "shared", "proxies' copy loop: shared (hbone.Relay) | adaptive")
	fs.BoolVar(&cfg.FrameFit, "frame-fit", false, "proxies split tunnel writes to 16375 bytes (HTTP/2 experiment)")
	out := fs.String("out", "", "also write the markdown report to this file")
	jsonOut := fs.String("json", "", "also write raw results as JSON to this file")
	if err := fs.Parse(args); err != nil {
		return errUsage
	}
	cfg.Modes = strings.Split(*modes, ",")
	var err error
	if cfg.Streams, err = ints(*streams); err != nil {
		return err
	}
	if cfg.Tunnels, err = ints(*tunnels); err != nil {
		return err
	}
	if cfg.Exe, err = os.Executable(); err != nil {
		return err
	}
	rep, err := RunBench(cfg)
	if err != nil {
		return err
	}
	md := rep.Markdown()
	fmt.Fprint(stdout, md)
	if *out != "" {
		if err := os.WriteFile(*out, []byte(md), 0o644); err != nil {
			return err
		}
	}
	if *jsonOut != "" {
		b, _ := json.MarshalIndent(rep, "", "  ")
		return os.WriteFile(*jsonOut, b, 0o644)
	}
	return nil
}

// RunBench measures every mode in one run, each against the same sink.
func RunBench(cfg BenchConfig) (*Report, error) {
	if cfg.Progress == nil {
		cfg.Progress = io.Discard
	}
	dir, err := os.MkdirTemp("", "hbone-bench-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	if err := WriteCerts(dir); err != nil {
		return nil, err
	}
	b := &bench{cfg: cfg, certs: dir}
	rep := &Report{Config: cfg, Started: time.Now(), LoadBefore: loadAvg()}
	sink, err := b.start("server", "-listen", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("sink: %w", err)
	}
	defer sink.Stop()
	b.sink = sink.addr
	for _, mode := range cfg.Modes {
		rep.Modes = append(rep.Modes, b.measure(mode))
	}
	if cfg.ProfileDir != "" {
		for _, mode := range cfg.Modes {
			if mode != "raw" {
				b.profile(mode)
			}
		}
	}
	rep.Duration = time.Since(rep.Started)
	rep.LoadAfter = loadAvg()
	return rep, nil
}

type bench struct {
	cfg   BenchConfig
	certs string
	sink  string
}

func (b *bench) copy() string {
	if b.cfg.Copy == "" {
		return "shared"
	}
	return b.cfg.Copy
}

func (b *bench) logf(format string, args ...any) {
	fmt.Fprintf(b.cfg.Progress, time.Now().Format("15:04:05 ")+format+"\n", args...)
}

// proxies is one mode's client-side and server-side proxy processes.
type proxies struct {
	entry, server string // where clients connect; the server proxy
	client, srv   *Proc
}

func (p *proxies) stop() {
	if p.client != nil {
		p.client.Stop()
	}
	if p.srv != nil {
		p.srv.Stop()
	}
}

func (p *proxies) rss() (client, server int64) {
	if p.client == nil {
		return 0, 0
	}
	return rssBytes(p.client.cmd.Process.Pid), rssBytes(p.srv.cmd.Process.Pid)
}

func (b *bench) startProxies(mode string) (*proxies, error) { return b.startProxiesNamed(mode, "") }

// startProxiesNamed starts mode's proxies; with a profile name they write
// CPU profiles <name>-{client,server}.pprof into the profile directory.
func (b *bench) startProxiesNamed(mode, profile string) (*proxies, error) {
	if mode == "raw" {
		return &proxies{entry: b.sink}, nil
	}
	prof := func(side string) []string {
		if profile == "" {
			return nil
		}
		return []string{"-cpuprofile", filepath.Join(b.cfg.ProfileDir, profile+"-"+side+".pprof")}
	}
	serverArgs := []string{"relay", "-mode", mode + "-server", "-certs", b.certs, "-copy", b.copy(), fmt.Sprintf("-frame-fit=%t", b.cfg.FrameFit)}
	if mode == "tls" {
		serverArgs = append(serverArgs, "-upstream", b.sink)
	}
	srv, err := b.start(append(serverArgs, prof("server")...)...)
	if err != nil {
		return nil, fmt.Errorf("%s server proxy: %w", mode, err)
	}
	client, err := b.start(append([]string{"relay", "-mode", mode + "-client", "-certs", b.certs, "-copy", b.copy(), fmt.Sprintf("-frame-fit=%t", b.cfg.FrameFit),
		"-upstream", srv.addr, "-target", b.sink}, prof("client")...)...)
	if err != nil {
		srv.Stop()
		return nil, fmt.Errorf("%s client proxy: %w", mode, err)
	}
	return &proxies{entry: client.addr, server: srv.addr, client: client, srv: srv}, nil
}

// measure runs every figure for one mode; failures are recorded, not fatal.
func (b *bench) measure(mode string) *ModeResult {
	r := &ModeResult{Mode: mode, Throughput: map[int]float64{}, MemClient: map[int]float64{}, MemServer: map[int]float64{}}
	fail := func(what string, err error) {
		b.logf("%s %s: %v", mode, what, err)
		r.Errors = append(r.Errors, what+": "+err.Error())
	}
	p, err := b.startProxies(mode)
	if err != nil {
		fail("start", err)
		return r
	}
	r.hasProxies = p.client != nil
	for _, n := range b.cfg.Streams {
		var runs []float64
		for range max(b.cfg.Repeat, 1) {
			res, err := b.client("-mode", "throughput", "-addr", p.entry, "-bytes", itoa(b.cfg.Bytes), "-streams", strconv.Itoa(n))
			if err != nil {
				fail(fmt.Sprintf("throughput %d streams", n), err)
				break
			}
			runs = append(runs, res.BytesPerSecond)
		}
		if len(runs) > 0 {
			r.Throughput[n] = median(runs)
			b.logf("%s throughput %d streams: %.2f Gbit/s (runs %v)", mode, n, r.Throughput[n]*8/1e9, gbits(runs))
		}
	}
	if res, err := b.client("-mode", "pingpong", "-addr", p.entry, "-n", strconv.Itoa(b.cfg.PingPongs)); err != nil {
		fail("pingpong", err)
	} else {
		r.P50, r.P99 = res.P50Micros, res.P99Micros
		b.logf("%s 1 KiB ping-pong: p50 %.1f µs p99 %.1f µs", mode, r.P50, r.P99)
	}
	switch {
	case mode == "tls":
		r.handshakeOn = "TLS 1.3 over TCP"
		b.handshakes(r, "tcp", "bench", p.server, fail)
	case mode != "raw":
		if res, err := b.client("-mode", "opens", "-transport", mode, "-certs", b.certs, "-addr", p.server,
			"-target", b.sink, "-n", strconv.Itoa(b.cfg.Opens)); err != nil {
			fail("opens", err)
		} else {
			r.Opens = res.OpsPerSecond
			b.logf("%s pooled tunnel opens: %.0f/s", mode, r.Opens)
		}
		proto, alpn := "tcp", "h2"
		r.handshakeOn = "TLS 1.3 over TCP, ALPN h2"
		if mode == "h3" {
			proto, alpn, r.handshakeOn = "quic", "h3", "QUIC, ALPN h3"
		}
		b.handshakes(r, proto, alpn, p.server, fail)
	}
	p.stop()
	if mode != "raw" {
		for _, n := range b.cfg.Tunnels {
			// A TLS relay holds two sockets per tunnel in the client proxy;
			// RLIMIT_NOFILE cannot be raised past the hard limit here.
			if limit := fileLimit(); mode == "tls" && 2*n+64 > limit {
				r.Notes = append(r.Notes, fmt.Sprintf("%d tunnels not measured: needs %d descriptors in the client proxy, RLIMIT_NOFILE hard limit is %d", n, 2*n+64, limit))
				continue
			}
			if err := b.memory(mode, n, r); err != nil {
				fail(fmt.Sprintf("memory %d tunnels", n), err)
			}
		}
	}
	return r
}

func (b *bench) handshakes(r *ModeResult, proto, alpn, addr string, fail func(string, error)) {
	res, err := b.client("-mode", "handshakes", "-proto", proto, "-alpn", alpn, "-certs", b.certs,
		"-addr", addr, "-n", strconv.Itoa(b.cfg.Handshakes))
	if err != nil {
		fail("handshakes", err)
		return
	}
	r.Handshakes = res.OpsPerSecond
	b.logf("%s new mTLS connections: %.0f/s", r.Mode, r.Handshakes)
}

// memory holds n idle tunnels through fresh proxies and records the RSS
// growth of each proxy divided by n.
func (b *bench) memory(mode string, n int, r *ModeResult) error {
	p, err := b.startProxies(mode)
	if err != nil {
		return err
	}
	defer p.stop()
	// one tunnel first, so pooled connections and code are in place
	if _, err := b.client("-mode", "pingpong", "-addr", p.entry, "-n", "10"); err != nil {
		return err
	}
	time.Sleep(500 * time.Millisecond)
	c0, s0 := p.rss()
	hold, err := b.start("client", "-mode", "hold", "-addr", p.entry, "-n", strconv.Itoa(n))
	if err != nil {
		return err
	}
	defer hold.Stop()
	time.Sleep(2 * time.Second) // let the proxies settle
	c1, s1 := p.rss()
	r.MemClient[n] = float64(c1-c0) / float64(n)
	r.MemServer[n] = float64(s1-s0) / float64(n)
	b.logf("%s %d idle tunnels: client proxy %.1f KiB/tunnel, server proxy %.1f KiB/tunnel",
		mode, n, r.MemClient[n]/1024, r.MemServer[n]/1024)
	return nil
}

// profile records CPU profiles of both proxies during one single-stream
// run (<mode>-{client,server}.pprof), and of the HBONE dialer and the
// server proxy during pooled opens (<mode>-opens-{dialer,server}.pprof).
func (b *bench) profile(mode string) {
	entry := func(p *proxies) string { return p.entry }
	b.profilePhase(mode, mode, entry, "-mode", "throughput", "-bytes", itoa(b.cfg.Bytes), "-streams", "1")
	if mode == "tls" {
		return
	}
	server := func(p *proxies) string { return p.server } // opens dial the server proxy themselves
	b.profilePhase(mode, mode+"-opens", server, "-mode", "opens", "-transport", mode, "-certs", b.certs,
		"-target", b.sink, "-n", strconv.Itoa(b.cfg.Opens),
		"-cpuprofile", filepath.Join(b.cfg.ProfileDir, mode+"-opens-dialer.pprof"))
}

func (b *bench) profilePhase(mode, name string, addr func(*proxies) string, clientArgs ...string) {
	p, err := b.startProxiesNamed(mode, name)
	if err != nil {
		b.logf("profile %s: %v", name, err)
		return
	}
	if _, err := b.client(append(clientArgs, "-addr", addr(p))...); err != nil {
		b.logf("profile %s: %v", name, err)
	}
	p.stop()
	b.logf("profiles: %s", filepath.Join(b.cfg.ProfileDir, name+"-*.pprof"))
}

// client runs one client role process and decodes its result.
func (b *bench) client(args ...string) (Result, error) {
	cmd := exec.Command(b.cfg.Exe, append([]string{"client"}, args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL} // no orphans if we die
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return Result{}, fmt.Errorf("%v: %s", err, strings.TrimSpace(stderr.String()))
	}
	var res Result
	if err := json.Unmarshal(stdout.Bytes(), &res); err != nil {
		return Result{}, fmt.Errorf("client output %q: %w", stdout.String(), err)
	}
	return res, nil
}

// Proc is a role process that announced "READY <addr>".
type Proc struct {
	cmd   *exec.Cmd
	addr  string
	stdin io.WriteCloser
}

// Addr is where the role listens.
func (p *Proc) Addr() string { return p.addr }

// Pid is the process's id (the role's own when argv execs it, as
// `ip netns exec` does).
func (p *Proc) Pid() int { return p.cmd.Process.Pid }

func (b *bench) start(args ...string) (*Proc, error) {
	return StartProc(append([]string{b.cfg.Exe}, args...), b.cfg.Progress)
}

// StartProc runs argv, a role of this tool (possibly behind a wrapper such
// as `ip netns exec`), with its errors to stderr, and waits for its READY
// line.
func StartProc(argv []string, stderr io.Writer) (*Proc, error) {
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stderr = stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &Proc{cmd: cmd, stdin: stdin}
	line := make(chan string, 1)
	go func() {
		l, _ := bufio.NewReader(stdout).ReadString('\n')
		line <- l
		io.Copy(io.Discard, stdout)
	}()
	select {
	case l := <-line:
		addr, ok := strings.CutPrefix(strings.TrimSpace(l), "READY ")
		if !ok {
			p.Stop()
			return nil, fmt.Errorf("%v: did not start (said %q)", argv, l)
		}
		p.addr = addr
		return p, nil
	case <-time.After(5 * time.Minute):
		p.Stop()
		return nil, fmt.Errorf("%v: not ready in time", argv)
	}
}

// Stop ends the process: stdin closed (hold clients), SIGTERM, then SIGKILL.
func (p *Proc) Stop() {
	p.stdin.Close()
	p.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { p.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		p.cmd.Process.Kill()
		<-done
	}
}

func fileLimit() int {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0
	}
	return int(lim.Max)
}

func rssBytes(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb * 1024
		}
	}
	return 0
}

func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ") + fmt.Sprintf(" (%d CPUs)", runtime.NumCPU())
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

func gbits(v []float64) []string {
	out := make([]string, len(v))
	for i, x := range v {
		out[i] = fmt.Sprintf("%.2f", x*8/1e9)
	}
	return out
}

func ints(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		if f == "" {
			continue
		}
		n, err := strconv.Atoi(f)
		if err != nil {
			return nil, fmt.Errorf("%q: %w", s, err)
		}
		out = append(out, n)
	}
	if len(out) == 0 {
		return nil, errors.New("empty list")
	}
	return out, nil
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

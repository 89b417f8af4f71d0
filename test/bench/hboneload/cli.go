package hboneload

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"runtime/pprof"
	"syscall"
	"time"

	"github.com/go-logr/logr"
	"github.com/go-logr/zapr"
	"go.uber.org/zap"
)

// Main runs one hbone-load subcommand and returns the exit code.
func Main(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprintln(stderr, usage)
		return 2
	}
	var err error
	switch args[0] {
	case "bench":
		err = benchCmd(args[1:], stdout, stderr)
	case "certs":
		err = certsCmd(args[1:])
	case "sink", "server":
		err = sinkCmd(args[1:], stdout)
	case "relay":
		err = relayCmd(args[1:], stdout, stderr)
	case "client":
		err = clientCmd(args[1:], stdout)
	default:
		err = fmt.Errorf("unknown subcommand %q", args[0])
	}
	if err != nil {
		fmt.Fprintln(stderr, "hbone-load:", err)
		if err == errUsage {
			fmt.Fprintln(stderr, usage)
		}
		return 1
	}
	return 0
}

const usage = `usage: hbone-load <subcommand> [flags]
  bench   run the whole benchmark matrix (spawns the roles below) and print the table
  certs   -dir D: write a mesh root and the two proxy certificates
  server  -listen A: the upstream sink (discard-and-count or echo, chosen per connection)
  relay   -mode tls-client|tls-server|<h2|h3>-client|<h2|h3>-server -listen A -upstream B -target T -certs D
  client  -mode throughput|pingpong|hold|opens|handshakes ... (prints one JSON result)`

// ready tells the parent process where a role listens.
func ready(w io.Writer, addr string) { fmt.Fprintf(w, "READY %s\n", addr) }

func certsCmd(args []string) error {
	fs := flag.NewFlagSet("certs", flag.ContinueOnError)
	dir := fs.String("dir", "", "output directory")
	if err := fs.Parse(args); err != nil || *dir == "" {
		return errUsage
	}
	return WriteCerts(*dir)
}

func sinkCmd(args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("server", flag.ContinueOnError)
	listen := fs.String("listen", "127.0.0.1:0", "TCP listen address")
	if err := fs.Parse(args); err != nil {
		return errUsage
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	ready(stdout, ln.Addr().String())
	stopped := make(chan struct{})
	go func() { waitSignal(); close(stopped); ln.Close() }()
	err = RunSink(ln)
	select {
	case <-stopped:
		return nil
	default:
		return err
	}
}

func relayCmd(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("relay", flag.ContinueOnError)
	var cfg RelayConfig
	fs.StringVar(&cfg.Mode, "mode", "", "tls-client | tls-server | <transport>-client | <transport>-server")
	fs.StringVar(&cfg.Listen, "listen", "127.0.0.1:0", "listen address (TCP; UDP for h3 servers)")
	fs.StringVar(&cfg.Upstream, "upstream", "", "server proxy (clients) or sink (tls-server)")
	fs.StringVar(&cfg.Target, "target", "", "CONNECT target for HBONE clients")
	fs.StringVar(&cfg.CertsDir, "certs", "", "directory written by 'certs'")
	fs.StringVar(&cfg.Copy, "copy", "shared", "copy loop: shared (hbone.Relay) | adaptive (small buffers while idle)")
	fs.BoolVar(&cfg.FrameFit, "frame-fit", false, "split tunnel writes to 16375 bytes (one HTTP/2 DATA frame per TLS record)")
	cpuProfile := fs.String("cpuprofile", "", "write a CPU profile of the whole run to this file")
	verbose := fs.Bool("v", false, "log tunnel failures")
	if err := fs.Parse(args); err != nil || cfg.Mode == "" || cfg.CertsDir == "" {
		return errUsage
	}
	cfg.Log = newLogger(stderr, *verbose)
	stop, err := startCPUProfile(*cpuProfile)
	if err != nil {
		return err
	}
	defer stop()
	r, err := StartRelay(cfg)
	if err != nil {
		return err
	}
	ready(stdout, r.Addr)
	waitSignal()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	r.Stop(ctx)
	return nil
}

func clientCmd(args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("client", flag.ContinueOnError)
	mode := fs.String("mode", "", "throughput | pingpong | hold | opens | handshakes")
	addr := fs.String("addr", "", "entry address: sink or client proxy (TCP), server proxy for opens/handshakes")
	target := fs.String("target", "", "CONNECT target (opens)")
	bytes := fs.Int64("bytes", 2<<30, "throughput: total bytes")
	streams := fs.Int("streams", 1, "throughput: parallel connections")
	n := fs.Int("n", 10000, "pingpong round trips, hold connections, opens or handshakes")
	size := fs.Int("size", 1024, "pingpong message size")
	workers := fs.Int("c", 16, "opens/handshakes: concurrent workers")
	tr := fs.String("transport", "", "opens: HBONE transport")
	proto := fs.String("proto", "tcp", "handshakes: tcp | quic")
	alpn := fs.String("alpn", "h2", "handshakes: ALPN")
	certs := fs.String("certs", "", "certificate directory (opens, handshakes)")
	cpuProfile := fs.String("cpuprofile", "", "write a CPU profile of the whole run to this file")
	if err := fs.Parse(args); err != nil || *mode == "" || *addr == "" {
		return errUsage
	}
	stop, err := startCPUProfile(*cpuProfile)
	if err != nil {
		return err
	}
	defer stop()
	var res Result
	switch *mode {
	case "throughput":
		res, err = Throughput(*addr, *bytes, *streams)
	case "pingpong":
		res, err = PingPong(*addr, *n, *size, 200)
	case "hold":
		return holdCmd(*addr, *n, stdout)
	case "opens":
		var proxy, tgt netip.AddrPort
		if proxy, err = netip.ParseAddrPort(*addr); err != nil {
			return err
		}
		if tgt, err = netip.ParseAddrPort(*target); err != nil {
			return err
		}
		res, err = Opens(*tr, *certs, proxy, tgt, *n, *workers)
	case "handshakes":
		res, err = Handshakes(*proto, *alpn, *certs, *addr, *n, *workers)
	default:
		return errUsage
	}
	if err != nil {
		return err
	}
	return json.NewEncoder(stdout).Encode(res)
}

// holdCmd keeps n idle tunnels open until stdin closes.
func holdCmd(addr string, n int, stdout io.Writer) error {
	conns, err := Hold(addr, n)
	defer func() {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
	}()
	if err != nil {
		return err
	}
	ready(stdout, addr)
	io.Copy(io.Discard, bufio.NewReader(os.Stdin))
	return nil
}

func waitSignal() {
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGTERM, syscall.SIGINT)
	<-ch
}

func newLogger(w io.Writer, verbose bool) logr.Logger {
	cfg := zap.NewProductionConfig()
	cfg.OutputPaths = []string{"stderr"}
	if verbose {
		cfg.Level = zap.NewAtomicLevelAt(zap.DebugLevel)
	}
	z, err := cfg.Build()
	if err != nil {
		return logr.Discard()
	}
	return zapr.NewLogger(z)
}

// startCPUProfile profiles the process into path (nothing when empty)
// until stop is called.
func startCPUProfile(path string) (stop func(), err error) {
	if path == "" {
		return func() {}, nil
	}
	f, err := os.Create(path)
	if err != nil {
		return nil, err
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, err
	}
	return func() { pprof.StopCPUProfile(); f.Close() }, nil
}

package hboneload

import (
	"os"
	"strings"
	"testing"
)

// TestMain lets the test binary play every role process: the harness execs
// itself with a role subcommand as the first argument.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 {
		switch os.Args[1] {
		case "server", "relay", "client", "certs":
			os.Exit(Main(os.Args[1:], os.Stdout, os.Stderr))
		}
	}
	os.Exit(m.Run())
}

// TestBenchHarness runs the whole matrix with tiny workloads in separate
// processes and checks that every figure was measured and reported; it never
// looks at how fast anything was.
func TestBenchHarness(t *testing.T) {
	if testing.Short() {
		t.Skip("spawns processes")
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cfg := BenchConfig{
		Exe: exe, Modes: append([]string{"raw", "tls"}, Transports()...),
		Bytes: 8 << 20, Streams: []int{1, 4}, Repeat: 1, PingPongs: 200,
		Tunnels: []int{50}, Opens: 200, Handshakes: 20, Progress: testWriter{t},
	}
	rep, err := RunBench(cfg)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range rep.Modes {
		if len(m.Errors) > 0 {
			t.Errorf("%s: %v", m.Mode, m.Errors)
		}
		for _, n := range cfg.Streams {
			if m.Throughput[n] <= 0 {
				t.Errorf("%s: no %d-stream throughput", m.Mode, n)
			}
		}
		if m.P50 <= 0 || m.P99 < m.P50 {
			t.Errorf("%s: latency p50 %v p99 %v", m.Mode, m.P50, m.P99)
		}
		if m.Mode == "raw" {
			continue
		}
		if m.Handshakes <= 0 {
			t.Errorf("%s: no handshake rate", m.Mode)
		}
		if _, ok := m.MemClient[50]; !ok {
			t.Errorf("%s: no memory figure", m.Mode)
		}
		if m.Mode != "tls" && m.Opens <= 0 {
			t.Errorf("%s: no pooled open rate", m.Mode)
		}
	}
	md := rep.Markdown()
	for _, want := range []string{"| raw TCP |", "| TLS 1.3 relay |", "| HBONE HTTP/3 |", "HBONE HTTP/3 / TLS 1.3 relay", "**Goals (issue #3)**"} {
		if !strings.Contains(md, want) {
			t.Errorf("report lacks %q:\n%s", want, md)
		}
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

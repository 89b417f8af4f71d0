package meshtest

import (
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/go-logr/logr/funcr"
)

// Logs collects every log line of the mesh's proxies so that tests can
// assert on them; each line is also logged to the test.
type Logs struct {
	mu    sync.Mutex
	lines []string
	t     testing.TB
}

// Logger returns a logger (verbosity 0) whose lines start with node.
func (l *Logs) Logger(node string) logr.Logger { return l.LoggerV(node, 0) }

// LoggerV is Logger keeping lines up to verbosity v (debug lines: 1).
func (l *Logs) LoggerV(node string, v int) logr.Logger {
	return funcr.New(func(prefix, args string) {
		line := node + " " + prefix + " " + args
		l.mu.Lock()
		l.lines = append(l.lines, line)
		l.mu.Unlock()
		l.t.Log(line)
	}, funcr.Options{Verbosity: v})
}

// Lines returns a copy of the lines collected so far.
func (l *Logs) Lines() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.lines...)
}

// WaitFor waits up to 10 s for a line containing every part and returns
// it; it fails t if none appears.
func (l *Logs) WaitFor(t testing.TB, parts ...string) string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		l.mu.Lock()
		for _, line := range l.lines {
			ok := true
			for _, p := range parts {
				if !strings.Contains(line, p) {
					ok = false
					break
				}
			}
			if ok {
				l.mu.Unlock()
				return line
			}
		}
		l.mu.Unlock()
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("no log line containing %q", parts)
	return ""
}

package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"os/signal"
	"sync"
	"syscall"
	"time"
)

// holdResult is what connhold prints as its last line (JSON), for tests.
type holdResult struct {
	Target   string `json:"target"`
	Opened   int    `json:"opened"`
	Failed   int    `json:"failedToOpen"`
	Broken   int    `json:"broken"`
	Survived int    `json:"survived"`
	Pings    int64  `json:"pings"`
	// BytesVerified counts payload bytes sent and echoed back unchanged.
	BytesVerified int64    `json:"bytesVerified"`
	Errors        []string `json:"errors,omitempty"`
}

// connholdMain opens -conns connections to a line-echo server, sends a ping
// every -interval on each for -duration, and reports how many connections
// broke (a write/read error or a wrong echo) before the end.
func connholdMain(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("connhold", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("addr", "httpbin:9000", "host:port of a line-echo server")
	conns := fs.Int("conns", 10, "connections to hold")
	interval := fs.Duration("interval", 200*time.Millisecond, "ping interval per connection")
	duration := fs.Duration("duration", 30*time.Second, "how long to hold the connections")
	timeout := fs.Duration("timeout", 5*time.Second, "dial and per-ping reply timeout")
	payload := fs.Int("payload", 64, "bytes of a per-ping byte pattern carried by each ping and checked in its echo")
	if err := fs.Parse(args); err != nil {
		return exitUsage
	}
	if *payload < 0 || *payload > 1<<20 {
		fmt.Fprintln(stderr, "connhold: -payload must be between 0 and 1048576")
		return exitUsage
	}
	if *conns < 1 || *conns > 10000 {
		fmt.Fprintln(stderr, "connhold: -conns must be between 1 and 10000")
		return exitUsage
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, *duration)
	defer cancel()
	res := holdConnections(ctx, *addr, *conns, *payload, *interval, *timeout)
	fmt.Fprintf(stderr, "connhold: %s opened=%d failedToOpen=%d broken=%d survived=%d pings=%d bytesVerified=%d\n",
		res.Target, res.Opened, res.Failed, res.Broken, res.Survived, res.Pings, res.BytesVerified)
	_ = json.NewEncoder(stdout).Encode(res)
	if res.Broken > 0 || res.Failed > 0 {
		return 1
	}
	return 0
}

func holdConnections(ctx context.Context, addr string, n, payload int, interval, timeout time.Duration) holdResult {
	res := holdResult{Target: addr}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for i := range n {
		c, err := net.DialTimeout("tcp", addr, timeout)
		if err != nil {
			res.Failed++
			res.Errors = append(res.Errors, fmt.Sprintf("conn %d: dial: %v", i, err))
			continue
		}
		res.Opened++
		wg.Add(1)
		go func() {
			defer wg.Done()
			pings, verified, err := pingUntilDone(ctx, c, i, payload, interval, timeout)
			mu.Lock()
			defer mu.Unlock()
			res.Pings += pings
			res.BytesVerified += verified
			if err != nil {
				res.Broken++
				res.Errors = append(res.Errors, fmt.Sprintf("conn %d: %v after %d pings", i, err, pings))
			} else {
				res.Survived++
			}
		}()
	}
	wg.Wait()
	return res
}

// pingUntilDone returns nil when ctx ends with the connection still healthy,
// and how many pings and payload bytes came back unchanged.
func pingUntilDone(ctx context.Context, c net.Conn, id, payload int, interval, timeout time.Duration) (pings, verified int64, err error) {
	defer c.Close()
	r := bufio.NewReader(c)
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return pings, verified, nil
		case <-tick.C:
		}
		msg := fmt.Sprintf("conn%d-ping%d-%s", id, pings, pattern(id, pings, payload))
		_ = c.SetDeadline(time.Now().Add(timeout))
		if _, err := fmt.Fprintf(c, "%s\n", msg); err != nil {
			return pings, verified, fmt.Errorf("write: %w", err)
		}
		line, err := r.ReadString('\n')
		if err != nil {
			return pings, verified, fmt.Errorf("read: %w", err)
		}
		if line != msg+"\n" && !endsWithField(line, msg) {
			return pings, verified, fmt.Errorf("wrong echo %q", line)
		}
		pings++
		verified += int64(payload)
	}
}

// pattern is n printable bytes that differ per connection and per ping, so
// a lost, duplicated or reordered byte changes the echo.
func pattern(id int, ping int64, n int) []byte {
	const alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
	b := make([]byte, n)
	for i := range b {
		b[i] = alphabet[(i+id*7+int(ping)*13)%len(alphabet)]
	}
	return b
}

// endsWithField reports whether line is "<host> <msg>\n" (the lab's
// httpbin echo names its pod); a plain echo server returns "<msg>\n".
func endsWithField(line, msg string) bool {
	want := " " + msg + "\n"
	return len(line) > len(want) && line[len(line)-len(want):] == want
}

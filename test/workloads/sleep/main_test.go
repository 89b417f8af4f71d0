package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func TestParseCurlArgs(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		check   func(curlOptions) bool
		wantErr bool
	}{
		{"seeds: curl httpbin:8000 -s", []string{"httpbin:8000", "-s"}, func(o curlOptions) bool { return o.Silent && o.URLs[0] == "httpbin:8000" }, false},
		{"cluster -sI", []string{"-sI", "http://httpbin:8000/"}, func(o curlOptions) bool { return o.Silent && o.Head }, false},
		{"value glued -m5", []string{"-m5", "x"}, func(o curlOptions) bool { return o.MaxTime == 5*time.Second }, false},
		{"cluster ending in value flag", []string{"-so", "/dev/null", "x"}, func(o curlOptions) bool { return o.Silent && o.Output == "/dev/null" }, false},
		{"long with =", []string{"--max-time=1.5", "x"}, func(o curlOptions) bool { return o.MaxTime == 1500*time.Millisecond }, false},
		{"write-out", []string{"-w", "%{http_code}", "x"}, func(o curlOptions) bool { return o.WriteOut == "%{http_code}" }, false},
		{"headers repeat", []string{"-H", "a: b", "--header", "c: d", "x"}, func(o curlOptions) bool { return len(o.Headers) == 2 }, false},
		{"repeat", []string{"--repeat", "10", "x"}, func(o curlOptions) bool { return o.Repeat == 10 }, false},
		{"data implies nothing yet", []string{"-d", "a=b", "x"}, func(o curlOptions) bool { return o.HasData && o.Data == "a=b" }, false},
		{"no URL", []string{"-s"}, nil, true},
		{"unknown short", []string{"-Z", "x"}, nil, true},
		{"unknown long", []string{"--bogus", "x"}, nil, true},
		{"missing value", []string{"x", "-H"}, nil, true},
		{"bad repeat", []string{"--repeat", "0", "x"}, nil, true},
		{"bad max-time", []string{"-m", "soon", "x"}, nil, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o, err := parseCurlArgs(tt.args)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tt.wantErr)
			}
			if err == nil && !tt.check(o) {
				t.Fatalf("unexpected options %+v", o)
			}
		})
	}
}

func TestNormalizeURL(t *testing.T) {
	tests := []struct{ in, want string }{
		{"httpbin:8000", "http://httpbin:8000/"},
		{"http://h/x?y=1", "http://h/x?y=1"},
		{"httpbin.ambient-demo.svc.cluster.local:8000", "http://httpbin.ambient-demo.svc.cluster.local:8000/"},
	}
	for _, tt := range tests {
		u, err := normalizeURL(tt.in)
		if err != nil || u.String() != tt.want {
			t.Errorf("normalizeURL(%q) = %v, %v; want %q", tt.in, u, err, tt.want)
		}
	}
	for _, bad := range []string{"ftp://h/", "http://"} {
		if _, err := normalizeURL(bad); err == nil {
			t.Errorf("normalizeURL(%q) accepted", bad)
		}
	}
}

// TestCurlExitCodes drives real sockets into each failure curl reports.
func TestCurlExitCodes(t *testing.T) {
	ok := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/teapot" {
			w.WriteHeader(418)
			return
		}
		fmt.Fprint(w, "<title>httpbin.org</title>")
	}))
	defer ok.Close()
	reset := listenAndDo(t, func(c net.Conn) {
		bufio.NewReader(c).ReadString('\n')
		c.(*net.TCPConn).SetLinger(0) // RST, as a policy-rejecting proxy does
		c.Close()
	})
	closed := listenAndDo(t, func(c net.Conn) {
		bufio.NewReader(c).ReadString('\n')
		c.Close()
	})
	silent := listenAndDo(t, func(c net.Conn) { time.Sleep(3 * time.Second); c.Close() })
	refused := freeAddr(t)

	tests := []struct {
		name string
		args []string
		want int
	}{
		{"success", []string{"-s", ok.URL}, exitOK},
		{"http error without -f", []string{"-s", ok.URL + "/teapot"}, exitOK},
		{"http error with -f", []string{"-sf", ok.URL + "/teapot"}, exitHTTPError},
		{"reset gives 56 like the seeds", []string{"-s", "http://" + reset}, exitRecvError},
		{"closed gives 52", []string{"-s", "http://" + closed}, exitEmptyReply},
		{"refused gives 7", []string{"-s", "http://" + refused}, exitConnect},
		{"timeout gives 28", []string{"-s", "-m", "0.3", "http://" + silent}, exitTimeout},
		{"bad URL gives 3", []string{"-s", "ftp://x/"}, exitBadURL},
		{"usage error", []string{"--nope"}, exitUsage},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out, errOut bytes.Buffer
			if got := curlMain(tt.args, &out, &errOut); got != tt.want {
				t.Fatalf("exit %d, want %d (stderr %q)", got, tt.want, errOut.String())
			}
		})
	}
}

func TestCurlOutputs(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Method", r.Method)
		fmt.Fprintf(w, "host=%s ua=%s", r.Host, r.UserAgent())
	}))
	defer srv.Close()
	tests := []struct {
		name     string
		args     []string
		contains []string
		absent   []string
	}{
		{"body", []string{"-s", srv.URL}, []string{"ua=curl/"}, []string{"HTTP/1.1"}},
		{"head prints status and headers, no body", []string{"-sI", srv.URL}, []string{"HTTP/1.1 200 OK", "X-Method: HEAD"}, []string{"ua="}},
		{"include", []string{"-si", srv.URL}, []string{"HTTP/1.1 200 OK", "ua="}, nil},
		{"write-out code", []string{"-s", "-o", "/dev/null", "-w", `%{http_code}\n`, srv.URL}, []string{"200\n"}, []string{"ua="}},
		{"host header override", []string{"-s", "-H", "Host: echo", srv.URL}, []string{"host=echo"}, nil},
		{"repeat", []string{"-s", "-o", "/dev/null", "-w", "%{http_code} ", "--repeat", "3", srv.URL}, []string{"200 200 200 "}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out, errOut bytes.Buffer
			if code := curlMain(tt.args, &out, &errOut); code != 0 {
				t.Fatalf("exit %d: %s", code, errOut.String())
			}
			for _, c := range tt.contains {
				if !strings.Contains(out.String(), c) {
					t.Errorf("output %q lacks %q", out.String(), c)
				}
			}
			for _, a := range tt.absent {
				if strings.Contains(out.String(), a) {
					t.Errorf("output %q has %q", out.String(), a)
				}
			}
		})
	}
}

func TestConnholdCountsBrokenConnections(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var accepted []net.Conn
	acceptedCh := make(chan net.Conn, 8)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			acceptedCh <- c
			go func() {
				sc := bufio.NewScanner(c)
				for sc.Scan() {
					fmt.Fprintf(c, "pod %s\n", sc.Text())
				}
			}()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel()
	done := make(chan holdResult)
	go func() { done <- holdConnections(ctx, ln.Addr().String(), 4, 32, 20*time.Millisecond, time.Second) }()
	for range 4 {
		accepted = append(accepted, <-acceptedCh)
	}
	time.Sleep(200 * time.Millisecond)
	accepted[0].(*net.TCPConn).SetLinger(0)
	accepted[0].Close() // break exactly one
	res := <-done
	if res.Opened != 4 || res.Broken != 1 || res.Survived != 3 {
		t.Fatalf("result %+v, want opened 4, broken 1, survived 3", res)
	}
	if res.Pings == 0 || res.BytesVerified != res.Pings*32 {
		t.Fatalf("pings %d, bytes verified %d: want 32 per ping", res.Pings, res.BytesVerified)
	}
	b, _ := json.Marshal(res)
	if !strings.Contains(string(b), `"broken":1`) {
		t.Fatalf("json %s", b)
	}
}

// TestConnholdVerifiesTheBytePattern: a plain echo passes; an echo that
// changes, drops or repeats one byte of the pattern breaks the connection.
func TestConnholdVerifiesTheBytePattern(t *testing.T) {
	for _, tc := range []struct {
		name   string
		mangle func(string) string
		broken int
	}{
		{"plain echo", func(s string) string { return s }, 0},
		{"byte changed", func(s string) string { return s[:len(s)-1] + "!" }, 1},
		{"byte dropped", func(s string) string { return s[:len(s)-2] + s[len(s)-1:] }, 1},
		{"byte repeated", func(s string) string { return s + s[len(s)-1:] }, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr := listenAndDo(t, func(c net.Conn) {
				sc := bufio.NewScanner(c)
				for sc.Scan() {
					fmt.Fprintf(c, "%s\n", tc.mangle(sc.Text()))
				}
			})
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			defer cancel()
			res := holdConnections(ctx, addr, 1, 100, 20*time.Millisecond, time.Second)
			if res.Broken != tc.broken {
				t.Fatalf("result %+v, want %d broken", res, tc.broken)
			}
			if tc.broken == 0 && (res.Pings == 0 || res.BytesVerified != res.Pings*100) {
				t.Fatalf("pings %d, bytes verified %d", res.Pings, res.BytesVerified)
			}
		})
	}
}

func TestSleepRejectsBadInterval(t *testing.T) {
	if sleepCmd([]string{"soon"}) != 1 {
		t.Fatal("accepted a bad interval")
	}
	if sleepCmd([]string{"0.01"}) != 0 {
		t.Fatal("short sleep failed")
	}
}

func listenAndDo(t *testing.T, do func(net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
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
			go do(c)
		}
	}()
	return ln.Addr().String()
}

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

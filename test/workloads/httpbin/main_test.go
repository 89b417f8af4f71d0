package main

import (
	"bufio"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ambientmesh/ambient/proxylib/waypoint/waypointtest"
)

func TestHandler(t *testing.T) {
	srv := httptest.NewServer(newHandler("httpbin-abc"))
	defer srv.Close()
	tests := []struct {
		name, method, path string
		wantStatus         int
		wantBody           string
	}{
		{"root has the seeds' title", "GET", "/", 200, "<title>httpbin.org</title>"},
		{"root names the pod", "GET", "/", 200, "served by httpbin-abc"},
		{"head of root", "HEAD", "/", 200, ""},
		{"status 418", "GET", "/status/418", 418, ""},
		{"status 503", "GET", "/status/503", 503, ""},
		{"status out of range", "GET", "/status/999", 400, "invalid status"},
		{"status not a number", "GET", "/status/abc", 400, "invalid status"},
		{"delay zero", "GET", "/delay/0", 200, `"delay": 0`},
		{"delay negative", "GET", "/delay/-1", 400, "invalid delay"},
		{"headers echo", "GET", "/headers", 200, `"X-Test": "yes"`},
		{"hostname", "GET", "/hostname", 200, "httpbin-abc"},
		{"unknown path", "GET", "/nope", 404, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req, _ := http.NewRequest(tt.method, srv.URL+tt.path, nil)
			req.Header.Set("X-Test", "yes")
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			body, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != tt.wantStatus {
				t.Fatalf("status %d, want %d (body %q)", resp.StatusCode, tt.wantStatus, body)
			}
			if !strings.Contains(string(body), tt.wantBody) {
				t.Fatalf("body %q does not contain %q", body, tt.wantBody)
			}
			if got := resp.Header.Get("Server"); got != "ambient-lab-httpbin" {
				t.Fatalf("Server header %q", got)
			}
		})
	}
}

func TestHeadersIncludeHost(t *testing.T) {
	srv := httptest.NewServer(newHandler("h"))
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/headers")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var got struct{ Headers map[string]string }
	if err := json.NewDecoder(resp.Body).Decode(&got); err != nil {
		t.Fatal(err)
	}
	if got.Headers["Host"] != strings.TrimPrefix(srv.URL, "http://") {
		t.Fatalf("Host header %q", got.Headers["Host"])
	}
}

func TestEchoLines(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go serveEcho(ln, "pod-1")
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r := bufio.NewReader(c)
	for i := range 3 {
		fmt.Fprintf(c, "ping %d\n", i)
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		if want := fmt.Sprintf("pod-1 ping %d\n", i); line != want {
			t.Fatalf("got %q want %q", line, want)
		}
	}
}

func TestTLSListener(t *testing.T) {
	dir := t.TempDir()
	roots := waypointtest.WriteSelfSigned(t, dir, "httpbin-tls.example.com")
	ln, err := tlsListener("127.0.0.1:0", filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go http.Serve(ln, newHandler("pod-tls"))
	c := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, ServerName: "httpbin-tls.example.com"}}}
	resp, err := c.Get("https://" + ln.Addr().String() + "/")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if !strings.Contains(string(body), "<title>httpbin.org</title>") || !strings.Contains(string(body), "pod-tls") {
		t.Fatalf("page %q", body)
	}
	if _, err := tlsListener("127.0.0.1:0", filepath.Join(dir, "missing.crt"), filepath.Join(dir, "tls.key")); err == nil {
		t.Error("a missing certificate was accepted")
	}
}

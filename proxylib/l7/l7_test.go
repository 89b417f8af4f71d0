package l7

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// seen is what the backend observed of a request.
type seen struct {
	Method, Path, Host, Proto string
	Header                    http.Header
	Body                      string
	Trailer                   http.Header
}

// backend echoes what it received as JSON and sets hop-by-hop headers on
// the response that must not reach the client.
func backend(t *testing.T, h2 bool) *httptest.Server {
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") == "websocket" {
			upgradeEcho(w)
			return
		}
		body, _ := io.ReadAll(r.Body)
		s := seen{r.Method, r.URL.RequestURI(), r.Host, r.Proto, r.Header, string(body), r.Trailer}
		w.Header().Set("Connection", "X-Resp-Secret")
		w.Header().Set("X-Resp-Secret", "leak")
		w.Header().Set("Keep-Alive", "timeout=5")
		w.Header().Set("Proxy-Authenticate", "Basic")
		if r.URL.Path == "/trailers" {
			w.Header().Set("Trailer", "Grpc-Status")
			w.Header().Set("Content-Type", "application/json")
			json.NewEncoder(w).Encode(s)
			w.Header().Set("Grpc-Status", "0")
			return
		}
		json.NewEncoder(w).Encode(s)
	})
	srv := httptest.NewUnstartedServer(h)
	if h2 {
		p := new(http.Protocols)
		p.SetUnencryptedHTTP2(true)
		p.SetHTTP1(true)
		srv.Config.Protocols = p
	}
	srv.Start()
	t.Cleanup(srv.Close)
	return srv
}

// proxy is a minimal L7 forwarder built from this package's parts, serving
// on a real TCP listener: sniff, serve, Outbound, Upstream.
func proxy(t *testing.T, be *httptest.Server) net.Addr {
	target := netip.MustParseAddrPort(be.Listener.Addr().String())
	up := NewUpstream(func(ctx context.Context, ep netip.AddrPort) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", ep.String())
	})
	t.Cleanup(up.Close)
	srv := &Server{Handler: HandlerFunc(func(in *http.Request) *http.Response {
		out := Outbound(in.Context(), in, Forwarding{
			ClientIP: netip.MustParseAddr("10.1.2.3"),
			PeerID:   "spiffe://cluster.local/ns/a/sa/sleep",
			ProxyID:  "spiffe://cluster.local/ns/a/sa/waypoint",
		})
		StartSpan(out.Header, true)
		resp, err := up.RoundTrip(out, target, in.ProtoMajor == 2)
		if err != nil {
			return &http.Response{StatusCode: 503, Header: http.Header{}, Body: http.NoBody, ContentLength: 0}
		}
		return resp
	})}
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
			go func() {
				defer c.Close()
				p, br := Sniff(c, 200*time.Millisecond)
				if p == TCP {
					fmt.Fprint(c, "tcp passthrough")
					return
				}
				srv.ServeConn(context.Background(), c, br, p)
			}()
		}
	}()
	return ln.Addr()
}

func rawExchange(t *testing.T, addr net.Addr, raw string) (*http.Response, string) {
	t.Helper()
	c, err := net.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, raw); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("reading response: %v", err)
	}
	b, _ := io.ReadAll(resp.Body)
	return resp, string(b)
}

// Case 24: request smuggling shapes and oversized heads are refused.
func TestHostileRequestHeads(t *testing.T) {
	addr := proxy(t, backend(t, false))
	big := strings.Repeat("a", 70<<10)
	many := strings.Repeat("X-H: 1\r\n", 150)
	tests := []struct {
		name string
		raw  string
		want int
	}{
		{"duplicate identical Content-Length", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400},
		{"differing Content-Length", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400},
		{"Content-Length list", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\nabc", 400},
		{"CL with TE", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 400},
		{"TE with CL (reversed)", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 400},
		{"TE not chunked", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501},
		{"duplicate TE", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400},
		{"negative Content-Length", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400},
		{"obs-fold", "GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n  folded\r\n\r\n", 400},
		{"space before colon", "GET / HTTP/1.1\r\nHost: a\r\nContent-Length : 0\r\n\r\n", 400},
		{"bare LF", "GET / HTTP/1.1\nHost: a\n\n", 400},
		{"missing Host", "GET / HTTP/1.1\r\n\r\n", 400},
		{"two Hosts", "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400},
		{"bad version", "GET / HTTP/1.2\r\nHost: a\r\n\r\n", 400},
		{"oversized header", "GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + big + "\r\n\r\n", 431},
		{"too many headers", "GET / HTTP/1.1\r\nHost: a\r\n" + many + "\r\n", 431},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			resp, body := rawExchange(t, addr, tc.raw)
			if resp.StatusCode != tc.want {
				t.Fatalf("status %d (%s), want %d", resp.StatusCode, strings.TrimSpace(body), tc.want)
			}
			if strings.Contains(body, `"Method"`) {
				t.Fatal("refused request reached the backend")
			}
		})
	}
}

// Cases 24-25: hop-by-hop headers stripped both ways; forwarding headers
// replaced, never trusted.
func TestHeaderHygieneBothWays(t *testing.T) {
	addr := proxy(t, backend(t, false))
	raw := "GET /p?q=1 HTTP/1.1\r\nHost: echo.default:80\r\n" +
		"Connection: keep-alive, X-Secret\r\nX-Secret: s\r\nKeep-Alive: 300\r\nProxy-Authorization: Basic x\r\n" +
		"Proxy-Connection: keep-alive\r\nTE: trailers\r\nUpgrade: websocket\r\n" +
		"X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Client-Cert: URI=spiffe://evil/ns/x/sa/y\r\nForwarded: for=6.6.6.6\r\n" +
		"Traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\nX-Keep: yes\r\n\r\n"
	resp, body := rawExchange(t, addr, raw)
	if resp.StatusCode != 200 {
		t.Fatalf("status %d: %s", resp.StatusCode, body)
	}
	var s seen
	if err := json.Unmarshal([]byte(body), &s); err != nil {
		t.Fatal(err)
	}
	for _, h := range []string{"Connection", "X-Secret", "Keep-Alive", "Proxy-Authorization", "Proxy-Connection", "Te", "Upgrade", "Forwarded"} {
		if v := s.Header.Get(h); v != "" {
			t.Errorf("backend received hop-by-hop %s: %q", h, v)
		}
	}
	if got := s.Header.Values("X-Forwarded-For"); len(got) != 1 || got[0] != "10.1.2.3" {
		t.Errorf("X-Forwarded-For %q, want only the verified peer", got)
	}
	if got := s.Header.Get("X-Forwarded-Client-Cert"); got != "By=spiffe://cluster.local/ns/a/sa/waypoint;URI=spiffe://cluster.local/ns/a/sa/sleep" {
		t.Errorf("XFCC %q", got)
	}
	if s.Header.Get("X-Keep") != "yes" || s.Host != "echo.default:80" || s.Path != "/p?q=1" {
		t.Errorf("end-to-end fields lost: %+v", s)
	}
	tp := s.Header.Get("Traceparent")
	if !strings.HasPrefix(tp, "00-0af7651916cd43dd8448eb211c80319c-") || strings.Contains(tp, "b7ad6b7169203331") {
		t.Errorf("traceparent %q: want same trace, new span", tp)
	}
	for _, h := range []string{"X-Resp-Secret", "Keep-Alive", "Proxy-Authenticate"} {
		if v := resp.Header.Get(h); v != "" {
			t.Errorf("client received hop-by-hop response header %s: %q", h, v)
		}
	}
	if c := resp.Header.Get("Connection"); c != "" {
		t.Errorf("client received Connection %q", c)
	}
}

// Keep-alive with pipelining, a chunked body with trailers, Expect and a
// Content-Length body on one connection.
func TestKeepAliveChunkedTrailersPipelined(t *testing.T) {
	addr := proxy(t, backend(t, false))
	c, err := net.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(c, "POST /one HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"+
		"3\r\nabc\r\n2\r\nde\r\n0\r\nX-Sum: 5\r\n\r\n"+
		"POST /two HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nwxyz"+
		"GET /trailers HTTP/1.1\r\nHost: a\r\n\r\n")
	br := bufio.NewReader(c)
	var got []seen
	for i := 0; i < 3; i++ {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("response %d: %v", i, err)
		}
		var s seen
		if err := json.NewDecoder(resp.Body).Decode(&s); err != nil {
			t.Fatalf("response %d: %v", i, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		got = append(got, s)
		if i == 2 && resp.Trailer.Get("Grpc-Status") != "0" {
			t.Errorf("response trailers lost: %v", resp.Trailer)
		}
	}
	if got[0].Body != "abcde" || got[0].Trailer.Get("X-Sum") != "5" {
		t.Errorf("chunked request: %+v", got[0])
	}
	if got[1].Body != "wxyz" || got[1].Path != "/two" {
		t.Errorf("CL request: %+v", got[1])
	}
}

func TestExpectContinue(t *testing.T) {
	addr := proxy(t, backend(t, false))
	c, err := net.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(c, "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
	br := bufio.NewReader(c)
	line, _ := br.ReadString('\n')
	if !strings.HasPrefix(line, "HTTP/1.1 100") {
		t.Fatalf("want 100 Continue first, got %q", line)
	}
	br.ReadString('\n')
	io.WriteString(c, "hi")
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	var s seen
	json.NewDecoder(resp.Body).Decode(&s)
	if s.Body != "hi" || s.Header.Get("Expect") != "" {
		t.Fatalf("backend saw %+v", s)
	}
}

func h2cClient() *http.Client {
	p := new(http.Protocols)
	p.SetUnencryptedHTTP2(true)
	return &http.Client{Transport: &http.Transport{Protocols: p}, Timeout: 10 * time.Second}
}

func TestH2CPriorKnowledgeWithTrailers(t *testing.T) {
	addr := proxy(t, backend(t, true))
	req, _ := http.NewRequest("POST", "http://"+addr.String()+"/trailers", strings.NewReader("body"))
	req.Header.Set("X-Forwarded-For", "6.6.6.6")
	req.Header.Set("Te", "trailers")
	resp, err := h2cClient().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var s seen
	if err := json.NewDecoder(resp.Body).Decode(&s); err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	if resp.ProtoMajor != 2 || s.Proto != "HTTP/2.0" || s.Body != "body" {
		t.Fatalf("client proto %s, backend saw %+v", resp.Proto, s)
	}
	if s.Header.Get("Te") != "trailers" || s.Header.Get("X-Forwarded-For") != "10.1.2.3" {
		t.Errorf("h2 headers at backend: %v", s.Header)
	}
	if resp.Trailer.Get("Grpc-Status") != "0" {
		t.Errorf("trailers %v", resp.Trailer)
	}
}

func TestH2CUpgrade(t *testing.T) {
	addr := proxy(t, backend(t, true))
	c, err := net.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	var settings bytes.Buffer
	fr := http2.NewFramer(&settings, nil)
	fr.WriteSettings()
	payload := settings.Bytes()[9:] // settings frame payload, without the frame header
	fmt.Fprintf(c, "GET /up HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: %s\r\n\r\n",
		base64.RawURLEncoding.EncodeToString(payload))
	br := bufio.NewReader(c)
	line, _ := br.ReadString('\n')
	if !strings.HasPrefix(line, "HTTP/1.1 101") {
		t.Fatalf("want 101, got %q", line)
	}
	for {
		l, _ := br.ReadString('\n')
		if l == "\r\n" || l == "" {
			break
		}
	}
	io.WriteString(c, h2Preface)
	framer := http2.NewFramer(c, br)
	framer.WriteSettings()
	dec := hpack.NewDecoder(4096, nil)
	for {
		f, err := framer.ReadFrame()
		if err != nil {
			t.Fatal(err)
		}
		if sf, ok := f.(*http2.SettingsFrame); ok && !sf.IsAck() {
			framer.WriteSettingsAck()
		}
		if hf, ok := f.(*http2.HeadersFrame); ok && hf.StreamID == 1 {
			fields, err := dec.DecodeFull(hf.HeaderBlockFragment())
			if err != nil {
				t.Fatal(err)
			}
			if fields[0].Name != ":status" || fields[0].Value != "200" {
				t.Fatalf("upgraded stream answered %v", fields)
			}
			return
		}
	}
}

func TestSniff(t *testing.T) {
	tests := []struct {
		name  string
		input string
		want  Protocol
	}{
		{"http1 get", "GET / HTTP/1.1\r\n", HTTP1},
		{"http1 short", "GET / HTTP/1.0\r\n\r\n", HTTP1},
		{"h2 preface", h2Preface, HTTP2},
		{"tls", "\x16\x03\x01\x02\x00", TCP},
		{"redis", "*1\r\n$4\r\nPING\r\n", TCP},
		{"partial preface then silence", "PRI * HT", TCP},
		{"server-first (silent)", "", TCP},
		{"long uppercase", "ABCDEFGHIJKLMNOPQRSTUVWXYZ", TCP},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a, b := net.Pipe()
			defer a.Close()
			defer b.Close()
			go io.WriteString(a, tc.input)
			got, br := Sniff(b, 100*time.Millisecond)
			if got != tc.want {
				t.Fatalf("got %v want %v", got, tc.want)
			}
			if n := br.Buffered(); n > len(tc.input) {
				t.Fatalf("buffered %d > input", n)
			}
		})
	}
}

func TestTCPPassthroughOnListener(t *testing.T) {
	addr := proxy(t, backend(t, false))
	c, err := tls.Dial("tcp", addr.String(), &tls.Config{InsecureSkipVerify: true})
	if err == nil {
		c.Close()
		t.Fatal("TLS handshake should not succeed against the passthrough marker")
	}
}

func TestStartSpan(t *testing.T) {
	h := http.Header{}
	if _, ok := StartSpan(h, false); ok || h.Get("Traceparent") != "" {
		t.Fatal("generated a trace with tracing disabled")
	}
	s, ok := StartSpan(h, true)
	if !ok || len(s.TraceID) != 32 || h.Get("Traceparent") != s.Traceparent() {
		t.Fatalf("generated %+v %q", s, h.Get("Traceparent"))
	}
	for _, bad := range []string{
		"00-00000000000000000000000000000000-b7ad6b7169203331-01",
		"00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
		"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
		"ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
		"garbage",
	} {
		h := http.Header{"Traceparent": {bad}, "Tracestate": {"a=b"}}
		if _, ok := StartSpan(h, false); ok || h.Get("Traceparent") != "" || h.Get("Tracestate") != "" {
			t.Errorf("accepted invalid traceparent %q", bad)
		}
	}
}

func FuzzHead(f *testing.F) {
	f.Add("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
	f.Add("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n")
	f.Fuzz(func(t *testing.T, s string) {
		head, err := readHead(bufio.NewReader(strings.NewReader(s)), 4096, 50)
		if err != nil {
			return
		}
		if validateHead(head) != nil {
			return
		}
		req, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(head)))
		if err != nil {
			return
		}
		// What we accept, Go must frame the same way we do.
		if len(req.Header.Values("Content-Length")) > 1 || (req.ContentLength > 0 && len(req.TransferEncoding) > 0) {
			t.Fatalf("accepted ambiguous framing: %q", s)
		}
	})
}

// Slowloris: a head that drips never reaches the handler and the
// connection is closed by the head timeout.
func TestSlowHeadIsClosed(t *testing.T) {
	srv := &Server{HeadTimeout: 200 * time.Millisecond, Handler: HandlerFunc(func(*http.Request) *http.Response {
		t.Error("handler reached")
		return &http.Response{StatusCode: 200, Header: http.Header{}, Body: http.NoBody}
	})}
	a, b := net.Pipe()
	defer a.Close()
	done := make(chan struct{})
	go func() {
		srv.ServeConn(context.Background(), b, bufio.NewReader(b), HTTP1)
		close(done)
	}()
	io.WriteString(a, "GET / HTTP/1.1\r\nHost: a\r\n")
	go func() {
		for i := 0; i < 100; i++ {
			if _, err := io.WriteString(a, "X: 1\r\n"); err != nil {
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
	}()
	select {
	case <-done:
	case <-time.After(3 * time.Second):
		t.Fatal("slow head kept the connection open")
	}
}

// upgradeEcho accepts a protocol upgrade and echoes bytes upper-cased.
func upgradeEcho(w http.ResponseWriter) {
	c, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		return
	}
	defer c.Close()
	brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
	brw.Flush()
	buf := make([]byte, 1024)
	for {
		n, err := brw.Read(buf)
		if n > 0 {
			c.Write(bytes.ToUpper(buf[:n]))
		}
		if err != nil {
			return
		}
	}
}

func TestUpgradeRelayed(t *testing.T) {
	addr := proxy(t, backend(t, false))
	c, err := net.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(c, "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n")
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != 101 || resp.Header.Get("Upgrade") != "websocket" {
		t.Fatalf("upgrade answer %v %v", resp, err)
	}
	for _, msg := range []string{"hello", "again"} {
		io.WriteString(c, msg)
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(br, got); err != nil || string(got) != strings.ToUpper(msg) {
			t.Fatalf("relay after upgrade: %q %v", got, err)
		}
	}
}

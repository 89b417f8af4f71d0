package appprobe

import (
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

func port(t *testing.T, addr string) int {
	t.Helper()
	return int(netip.MustParseAddrPort(addr).Port())
}

// app is an HTTP app that checks what the kubelet would send.
func app(t *testing.T, tlsOn bool) *httptest.Server {
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Path == "/redirect":
			http.Redirect(w, r, "/elsewhere", http.StatusFound)
		case r.URL.Path == "/fail":
			w.WriteHeader(http.StatusServiceUnavailable)
		case r.URL.Path == "/headers" && (r.Header.Get("X-Probe") != "yes" || r.Host != "app.example"):
			w.WriteHeader(http.StatusBadRequest)
		}
	})
	s := httptest.NewUnstartedServer(h)
	if tlsOn {
		s.StartTLS()
	} else {
		s.Start()
	}
	t.Cleanup(s.Close)
	return s
}

func grpcApp(t *testing.T, status healthpb.HealthCheckResponse_ServingStatus) int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	hs := health.NewServer()
	hs.SetServingStatus("", status)
	hs.SetServingStatus("named", healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(s, hs)
	go s.Serve(ln)
	t.Cleanup(s.Stop)
	return port(t, ln.Addr().String())
}

func TestHandler(t *testing.T) {
	plain, secure := app(t, false), app(t, true)
	pp, sp := port(t, plain.Listener.Addr().String()), port(t, secure.Listener.Addr().String())
	closed, _ := net.Listen("tcp", "127.0.0.1:0")
	cp := port(t, closed.Addr().String())
	closed.Close()
	serving, notServing := grpcApp(t, healthpb.HealthCheckResponse_SERVING), grpcApp(t, healthpb.HealthCheckResponse_NOT_SERVING)
	named := "named"

	tests := []struct {
		name   string
		prober *Prober
		want   int
	}{
		{"http ok", &Prober{HTTPGet: &HTTPGet{Path: "/ok", Port: pp}}, 200},
		{"http path without slash", &Prober{HTTPGet: &HTTPGet{Path: "ok", Port: pp}}, 200},
		{"http app status kept", &Prober{HTTPGet: &HTTPGet{Path: "/fail", Port: pp}}, 503},
		{"http redirect not followed, a pass for the kubelet", &Prober{HTTPGet: &HTTPGet{Path: "/redirect", Port: pp}}, 200},
		{"http headers and Host", &Prober{HTTPGet: &HTTPGet{Path: "/headers", Port: pp,
			Headers: []Header{{"X-Probe", "yes"}, {"Host", "app.example"}}}}, 200},
		{"http headers missing", &Prober{HTTPGet: &HTTPGet{Path: "/headers", Port: pp}}, 400},
		{"https without certificate check", &Prober{HTTPGet: &HTTPGet{Path: "/", Port: sp, Scheme: "HTTPS"}}, 200},
		{"http to an HTTPS port fails", &Prober{HTTPGet: &HTTPGet{Path: "/", Port: sp, Scheme: "HTTP"}}, 400},
		{"http nothing listening", &Prober{HTTPGet: &HTTPGet{Path: "/", Port: cp}}, 500},
		{"tcp open", &Prober{TCPSocket: &TCPSocket{Port: pp}}, 200},
		{"tcp closed", &Prober{TCPSocket: &TCPSocket{Port: cp}}, 500},
		{"grpc serving", &Prober{GRPC: &GRPC{Port: serving}}, 200},
		{"grpc not serving", &Prober{GRPC: &GRPC{Port: notServing}}, 500},
		{"grpc named service", &Prober{GRPC: &GRPC{Port: notServing, Service: &named}}, 200},
		{"grpc nothing listening", &Prober{GRPC: &GRPC{Port: cp}, TimeoutSeconds: 1}, 500},
	}
	probers := Probers{}
	for i, tt := range tests {
		probers[Path("c"+string(rune('a'+i)), "readyz")] = tt.prober
	}
	h := &Handler{Probers: probers, Host: "127.0.0.1"}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, Path("c"+string(rune('a'+i)), "readyz"), nil))
			if rec.Code != tt.want {
				t.Fatalf("got %d (%s), want %d", rec.Code, rec.Body, tt.want)
			}
		})
	}
	t.Run("unknown container is 404", func(t *testing.T) {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, Path("nope", "livez"), nil))
		if rec.Code != http.StatusNotFound {
			t.Fatalf("got %d, want 404", rec.Code)
		}
	})
}

func TestParse(t *testing.T) {
	tests := []struct {
		name, in, err string
		n             int
	}{
		{"empty", "", "", 0},
		{"istio's shape", `{"/app-health/app/livez":{"httpGet":{"path":"/healthz","port":8080,"scheme":"HTTP","httpHeaders":[{"name":"a","value":"b"}]},"timeoutSeconds":3},` +
			`"/app-health/app/readyz":{"tcpSocket":{"port":8080}},"/app-health/app/startupz":{"grpc":{"port":9090,"service":"x"}}}`, "", 3},
		{"not json", "{", "ISTIO_KUBE_APP_PROBERS", 0},
		{"two actions", `{"/app-health/a/livez":{"httpGet":{"port":1},"tcpSocket":{"port":1}}}`, "exactly one", 0},
		{"no action", `{"/app-health/a/livez":{}}`, "exactly one", 0},
		{"null", `{"/app-health/a/livez":null}`, "no probe", 0},
		{"bad port", `{"/app-health/a/livez":{"tcpSocket":{"port":0}}}`, "out of range", 0},
		{"named port left", `{"/app-health/a/livez":{"tcpSocket":{"port":"http"}}}`, "ISTIO_KUBE_APP_PROBERS", 0},
		{"bad scheme", `{"/app-health/a/livez":{"httpGet":{"port":1,"scheme":"ftp"}}}`, "scheme", 0},
		{"path outside", `{"/metrics":{"tcpSocket":{"port":1}}}`, "not under", 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := Parse(tt.in)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("err %v, want %q", err, tt.err)
				}
				return
			}
			if err != nil || len(p) != tt.n {
				t.Fatalf("got %d probers, %v; want %d", len(p), err, tt.n)
			}
		})
	}
}

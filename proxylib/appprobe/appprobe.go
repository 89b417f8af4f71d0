// Package appprobe runs an injected pod's own liveness, readiness and
// startup probes from inside the pod, for the kubelet.
//
// Under PeerAuthentication STRICT the sidecar's inbound refuses plaintext,
// and the kubelet probes in plaintext from the node. As Istio does, the
// injector rewrites each httpGet/tcpSocket/grpc probe to an httpGet of the
// sidecar's status port (:15020, left out of the pod's redirection) at
// /app-health/<container>/livez|readyz|startupz, and hands the original
// probes to the sidecar in ISTIO_KUBE_APP_PROBERS (Istio's variable and
// JSON shape). The sidecar then probes the app itself from inside the pod
// (its own user's connections are never redirected) and answers the
// kubelet with the outcome.
package appprobe

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"google.golang.org/protobuf/encoding/protowire"

	"github.com/ambientmesh/ambient/proxylib/grpcwire"
)

// EnvVar carries the original probes to the sidecar (Istio's name).
const EnvVar = "ISTIO_KUBE_APP_PROBERS"

// PathPrefix is where the rewritten probes point.
const PathPrefix = "/app-health/"

// Path is the status-port path a probe of kind ("livez", "readyz" or
// "startupz") of container is rewritten to.
func Path(container, kind string) string { return PathPrefix + container + "/" + kind }

// Header is one HTTP header of an httpGet probe.
type Header struct {
	Name  string `json:"name"`
	Value string `json:"value"`
}

// HTTPGet is an httpGet probe with its port resolved to a number.
type HTTPGet struct {
	Path    string   `json:"path,omitempty"`
	Port    int      `json:"port"`
	Host    string   `json:"host,omitempty"`
	Scheme  string   `json:"scheme,omitempty"`
	Headers []Header `json:"httpHeaders,omitempty"`
}

// TCPSocket is a tcpSocket probe.
type TCPSocket struct {
	Host string `json:"host,omitempty"`
	Port int    `json:"port"`
}

// GRPC is a grpc probe (grpc.health.v1).
type GRPC struct {
	Port    int     `json:"port"`
	Service *string `json:"service,omitempty"`
}

// Prober is one original probe: exactly one action.
type Prober struct {
	HTTPGet        *HTTPGet   `json:"httpGet,omitempty"`
	TCPSocket      *TCPSocket `json:"tcpSocket,omitempty"`
	GRPC           *GRPC      `json:"grpc,omitempty"`
	TimeoutSeconds int32      `json:"timeoutSeconds,omitempty"`
}

// Probers maps a status-port path to its original probe.
type Probers map[string]*Prober

// Parse reads EnvVar's value; empty means no probes. Every entry is
// checked so a bad one fails the sidecar's start, not the kubelet's probe.
func Parse(s string) (Probers, error) {
	p := Probers{}
	if strings.TrimSpace(s) == "" {
		return p, nil
	}
	if err := json.Unmarshal([]byte(s), &p); err != nil {
		return nil, fmt.Errorf("%s: %w", EnvVar, err)
	}
	for path, pr := range p {
		if err := pr.validate(path); err != nil {
			return nil, fmt.Errorf("%s: %w", EnvVar, err)
		}
	}
	return p, nil
}

func (p *Prober) validate(path string) error {
	if !strings.HasPrefix(path, PathPrefix) {
		return fmt.Errorf("path %q is not under %s", path, PathPrefix)
	}
	if p == nil {
		return fmt.Errorf("%s: no probe", path)
	}
	n, port := 0, 0
	if p.HTTPGet != nil {
		n, port = n+1, p.HTTPGet.Port
		if s := p.HTTPGet.Scheme; s != "" && !strings.EqualFold(s, "http") && !strings.EqualFold(s, "https") {
			return fmt.Errorf("%s: scheme %q is not HTTP or HTTPS", path, s)
		}
	}
	if p.TCPSocket != nil {
		n, port = n+1, p.TCPSocket.Port
	}
	if p.GRPC != nil {
		n, port = n+1, p.GRPC.Port
	}
	if n != 1 {
		return fmt.Errorf("%s: want exactly one of httpGet, tcpSocket, grpc; got %d", path, n)
	}
	if port < 1 || port > 65535 {
		return fmt.Errorf("%s: port %d out of range", path, port)
	}
	return nil
}

// Handler answers the kubelet's rewritten probes by running the originals
// against Host, the pod's IP (where the kubelet would have sent them; a
// probe's own host overrides it, as for the kubelet; empty means
// 127.0.0.1). Unknown paths are 404.
type Handler struct {
	Probers Probers
	Host    string
	// Dial opens the probes' connections; nil is net.Dialer's (the
	// sidecar runs inside the pod's network namespace already).
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)

	once   sync.Once
	client *http.Client
}

// defaultTimeout is the kubelet's default timeoutSeconds.
const defaultTimeout = time.Second

func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	pr, ok := h.Probers[r.URL.Path]
	if !ok {
		http.Error(w, "no app probe at "+r.URL.Path, http.StatusNotFound)
		return
	}
	timeout := defaultTimeout
	if pr.TimeoutSeconds > 0 {
		timeout = time.Duration(pr.TimeoutSeconds) * time.Second
	}
	ctx, cancel := context.WithTimeout(r.Context(), timeout)
	defer cancel()
	var code int
	var err error
	switch {
	case pr.HTTPGet != nil:
		code, err = h.httpGet(ctx, pr.HTTPGet)
	case pr.TCPSocket != nil:
		err = h.tcp(ctx, pr.TCPSocket)
	default:
		err = h.grpc(ctx, pr.GRPC)
	}
	switch {
	case err != nil:
		http.Error(w, "probe failed: "+err.Error(), http.StatusInternalServerError)
	case code >= 300 && code < 400:
		// A pass for the kubelet; passed on, it would follow the Location
		// to the app's port in plaintext, which STRICT refuses.
		w.WriteHeader(http.StatusOK)
	case code != 0:
		// The app's own status: the kubelet applies its 200-399 rule.
		w.WriteHeader(code)
	default:
		w.WriteHeader(http.StatusOK)
	}
}

func (h *Handler) target(host string, port int) string {
	if host == "" {
		host = h.Host
	}
	if host == "" {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, strconv.Itoa(port))
}

func (h *Handler) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	if h.Dial != nil {
		return h.Dial(ctx, network, addr)
	}
	var d net.Dialer
	return d.DialContext(ctx, network, addr)
}

// httpClient is the kubelet's: no keep-alive, no certificate check on
// HTTPS, redirects not followed (a 3xx is a success to the kubelet anyway).
func (h *Handler) httpClient() *http.Client {
	h.once.Do(func() {
		h.client = &http.Client{
			Transport: &http.Transport{DisableKeepAlives: true, Proxy: nil, DialContext: h.dial,
				TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}, //nolint:gosec // as the kubelet's prober
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		}
	})
	return h.client
}

func (h *Handler) httpGet(ctx context.Context, g *HTTPGet) (int, error) {
	scheme := "http"
	if strings.EqualFold(g.Scheme, "https") {
		scheme = "https"
	}
	path := g.Path
	if !strings.HasPrefix(path, "/") {
		path = "/" + path
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, scheme+"://"+h.target(g.Host, g.Port)+path, nil)
	if err != nil {
		return 0, err
	}
	req.Header.Set("User-Agent", "kube-probe/ambient-sidecar")
	for _, hd := range g.Headers {
		if strings.EqualFold(hd.Name, "Host") {
			req.Host = hd.Value
			continue
		}
		req.Header.Add(hd.Name, hd.Value)
	}
	resp, err := h.httpClient().Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	_, _ = io.CopyN(io.Discard, resp.Body, 10<<10)
	return resp.StatusCode, nil
}

func (h *Handler) tcp(ctx context.Context, t *TCPSocket) error {
	c, err := h.dial(ctx, "tcp", h.target(t.Host, t.Port))
	if err != nil {
		return err
	}
	return c.Close()
}

// healthCheckMethod is grpc.health.v1's Check. Its request is one string
// (service, field 1) and its answer one enum (status, field 1, SERVING=1),
// encoded here by hand: the generated types come with grpc-go.
const healthCheckMethod = "/grpc.health.v1.Health/Check"

const healthServing = 1

// grpc is the kubelet's gRPC probe: grpc.health.v1 Check over plaintext
// HTTP/2, healthy only when SERVING.
func (h *Handler) grpc(ctx context.Context, g *GRPC) error {
	conn, err := grpcwire.New(grpcwire.Config{Address: h.target("", g.Port), Plaintext: true, Dial: h.dial})
	if err != nil {
		return err
	}
	defer conn.Close()
	var req []byte
	if g.Service != nil && *g.Service != "" {
		req = protowire.AppendTag(req, 1, protowire.BytesType)
		req = protowire.AppendString(req, *g.Service)
	}
	resp, err := conn.InvokeRaw(ctx, healthCheckMethod, req)
	if err != nil {
		return err
	}
	status, err := servingStatus(resp)
	if err != nil {
		return err
	}
	if status != healthServing {
		return fmt.Errorf("grpc health: %s", servingStatusName(status))
	}
	return nil
}

// servingStatus reads HealthCheckResponse.status (the last occurrence
// wins, as in protobuf; absent is UNKNOWN).
func servingStatus(b []byte) (uint64, error) {
	var status uint64
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return 0, fmt.Errorf("grpc health: malformed response: %w", protowire.ParseError(n))
		}
		b = b[n:]
		if num == 1 && typ == protowire.VarintType {
			v, m := protowire.ConsumeVarint(b)
			if m < 0 {
				return 0, fmt.Errorf("grpc health: malformed response: %w", protowire.ParseError(m))
			}
			status, b = v, b[m:]
			continue
		}
		m := protowire.ConsumeFieldValue(num, typ, b)
		if m < 0 {
			return 0, fmt.Errorf("grpc health: malformed response: %w", protowire.ParseError(m))
		}
		b = b[m:]
	}
	return status, nil
}

func servingStatusName(s uint64) string {
	switch s {
	case 0:
		return "UNKNOWN"
	case 2:
		return "NOT_SERVING"
	case 3:
		return "SERVICE_UNKNOWN"
	}
	return "status " + strconv.FormatUint(s, 10)
}

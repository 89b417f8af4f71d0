// Package admin serves a proxy's local endpoints: admin (:15000:
// /config_dump, /workloads, /certificates, /logging, /debug/pprof),
// Prometheus metrics (:15020) and readiness (:15021 /healthz/ready). The
// /config_dump JSON shape is the contract in docs/interfaces.md "Admin API".
package admin

import (
	"crypto/x509"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"sort"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/ambientmesh/ambient/proxylib/admin/adminapi"
	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi/security"
	"github.com/ambientmesh/ambient/proxylib/identity"
)

// The /config_dump document types, shared with ambientctl.
type (
	Workload    = adminapi.Workload
	Service     = adminapi.Service
	Policy      = adminapi.Policy
	Certificate = adminapi.Certificate
	ConfigDump  = adminapi.ConfigDump
)

// Config wires the admin endpoints; nil fields serve empty data.
type Config struct {
	State *discovery.State
	// Certificates lists the certificates held (identity.Store.Status).
	Certificates func() []identity.CertificateStatus
	// SetLogLevel changes the log level ("debug", "info", "error", ...).
	SetLogLevel func(level string) error
	// Roots returns the current trust roots (they rotate), listed as "CA"
	// entries after each identity's certificate chain.
	Roots func() []*x509.Certificate
	// DNS describes the DNS proxy (nil: none).
	DNS func() *adminapi.DNS
	Now func() time.Time
}

// Handler serves the admin endpoints.
func Handler(cfg Config) http.Handler {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /config_dump", func(w http.ResponseWriter, r *http.Request) { writeJSON(w, Dump(cfg)) })
	mux.HandleFunc("GET /workloads", func(w http.ResponseWriter, r *http.Request) { writeJSON(w, Dump(cfg).Workloads) })
	mux.HandleFunc("GET /certificates", func(w http.ResponseWriter, r *http.Request) { writeJSON(w, Dump(cfg).Certificates) })
	mux.HandleFunc("/logging", func(w http.ResponseWriter, r *http.Request) {
		level := r.URL.Query().Get("level")
		if level == "" || cfg.SetLogLevel == nil {
			http.Error(w, "usage: /logging?level=debug|info|warn|error", http.StatusBadRequest)
			return
		}
		if err := cfg.SetLogLevel(level); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		fmt.Fprintf(w, "log level set to %s\n", level)
	})
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return mux
}

// MetricsHandler serves Prometheus metrics from g.
func MetricsHandler(g prometheus.Gatherer) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(g, promhttp.HandlerOpts{}))
	mux.Handle("/stats/prometheus", promhttp.HandlerFor(g, promhttp.HandlerOpts{}))
	return mux
}

// ReadinessHandler answers /healthz/ready with 200 only when ready().
func ReadinessHandler(ready func() bool) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz/ready", func(w http.ResponseWriter, r *http.Request) {
		if !ready() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ready\n"))
	})
	return mux
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

// Dump builds the /config_dump document.
func Dump(cfg Config) ConfigDump {
	d := ConfigDump{Workloads: []Workload{}, Services: []Service{}, Policies: []Policy{}, Certificates: []Certificate{}}
	if cfg.DNS != nil {
		d.DNS = cfg.DNS()
	}
	if s := cfg.State; s != nil {
		for _, w := range s.Workloads() {
			d.Workloads = append(d.Workloads, workload(s, w))
		}
		for _, svc := range s.Services() {
			d.Services = append(d.Services, service(s, svc))
		}
		for _, p := range s.Policies() {
			d.Policies = append(d.Policies, Policy{Name: p.GetName(), Namespace: p.GetNamespace(), Action: p.GetAction().String(), Scope: scope(p.GetScope())})
		}
	}
	if cfg.Certificates != nil {
		now := cfg.Now()
		for _, c := range cfg.Certificates() {
			cert := Certificate{Identity: c.Identity.String(), Type: "Cert Chain", Serial: c.Serial}
			switch {
			case c.Serial != "":
				cert.State = "Available"
				cert.NotBefore = c.NotBefore.UTC().Format(time.RFC3339)
				cert.NotAfter = c.NotAfter.UTC().Format(time.RFC3339)
				cert.Valid = !now.Before(c.NotBefore) && now.Before(c.NotAfter)
			case c.LastError != "":
				cert.State = "Unavailable"
			default:
				cert.State = "Pending"
			}
			d.Certificates = append(d.Certificates, cert)
			var roots []*x509.Certificate
			if cfg.Roots != nil {
				roots = cfg.Roots()
			}
			for _, r := range roots {
				d.Certificates = append(d.Certificates, Certificate{Identity: cert.Identity, Type: "CA", State: "Available",
					Valid: !now.Before(r.NotBefore) && now.Before(r.NotAfter), Serial: r.SerialNumber.Text(16),
					NotBefore: r.NotBefore.UTC().Format(time.RFC3339), NotAfter: r.NotAfter.UTC().Format(time.RFC3339)})
			}
		}
	}
	return d
}

func workload(s *discovery.State, w *workloadapi.Workload) Workload {
	out := Workload{Name: w.GetName(), Namespace: w.GetNamespace(), UID: w.GetUid(), Addresses: ips(w.GetAddresses()),
		Hostname: w.GetHostname(), Node: w.GetNode(), ServiceAccount: w.GetServiceAccount(), Waypoint: waypointName(s, w.GetWaypoint()),
		Protocol: "TCP", Status: "Healthy"}
	if w.GetTunnelProtocol() == workloadapi.TunnelProtocol_HBONE {
		out.Protocol = "HBONE"
	}
	if w.GetStatus() == workloadapi.WorkloadStatus_UNHEALTHY {
		out.Status = "Unhealthy"
	}
	return out
}

func service(s *discovery.State, svc *workloadapi.Service) Service {
	out := Service{Name: svc.GetName(), Namespace: svc.GetNamespace(), Hostname: svc.GetHostname(), Ports: map[string]uint32{},
		Endpoints: len(s.Endpoints(discovery.ServiceKey(svc.GetNamespace(), svc.GetHostname()))), Waypoint: waypointName(s, svc.GetWaypoint())}
	for _, a := range svc.GetAddresses() {
		out.Addresses = append(out.Addresses, ips([][]byte{a.GetAddress()})...)
	}
	for _, p := range svc.GetPorts() {
		tp := p.GetTargetPort()
		if tp == 0 {
			tp = p.GetServicePort()
		}
		out.Ports[strconv.Itoa(int(p.GetServicePort()))] = tp
	}
	return out
}

// waypointName is "<namespace>/<name>" of the waypoint's service, the
// address when it names no known service, "" when none.
func waypointName(s *discovery.State, g *workloadapi.GatewayAddress) string {
	if g == nil {
		return ""
	}
	switch d := g.GetDestination().(type) {
	case *workloadapi.GatewayAddress_Hostname:
		if svc := s.ServiceByKey(discovery.ServiceKey(d.Hostname.GetNamespace(), d.Hostname.GetHostname())); svc != nil {
			return svc.GetNamespace() + "/" + svc.GetName()
		}
		return d.Hostname.GetNamespace() + "/" + d.Hostname.GetHostname()
	case *workloadapi.GatewayAddress_Address:
		ip, ok := netip.AddrFromSlice(d.Address.GetAddress())
		if !ok {
			return ""
		}
		if svc := s.ServiceByVIP(ip); svc != nil {
			return svc.GetNamespace() + "/" + svc.GetName()
		}
		if w := s.WorkloadByAddr(ip); w != nil {
			return w.GetNamespace() + "/" + w.GetName()
		}
		return ip.Unmap().String()
	}
	return ""
}

func scope(s security.Scope) string {
	switch s {
	case security.Scope_GLOBAL:
		return "Global"
	case security.Scope_NAMESPACE:
		return "Namespace"
	}
	return "WorkloadSelector"
}

func ips(bs [][]byte) []string {
	out := []string{}
	for _, b := range bs {
		if a, ok := netip.AddrFromSlice(b); ok {
			out = append(out, a.Unmap().String())
		}
	}
	sort.Strings(out)
	return out
}

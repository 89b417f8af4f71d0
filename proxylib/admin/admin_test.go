package admin

import (
	"crypto/x509"
	"encoding/json"
	"math/big"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/ambientmesh/ambient/proxylib/admin/adminapi"
	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi/security"
	"github.com/ambientmesh/ambient/proxylib/identity"
)

func apply(t *testing.T, s *discovery.State, typeURL, name string, m proto.Message) {
	body, err := anypb.New(m)
	if err != nil {
		t.Fatal(err)
	}
	body.TypeUrl = typeURL
	if err := s.Apply(typeURL, []discovery.Resource{{Name: name, Version: "1", Body: body}}, nil); err != nil {
		t.Fatal(err)
	}
}

func TestConfigDump(t *testing.T) {
	s := discovery.NewState(discovery.AddressType, discovery.AuthorizationType)
	svcKey := "ambient-demo/httpbin.ambient-demo.svc.cluster.local"
	apply(t, s, discovery.AddressType, svcKey, &workloadapi.Address{Type: &workloadapi.Address_Service{Service: &workloadapi.Service{
		Name: "httpbin", Namespace: "ambient-demo", Hostname: "httpbin.ambient-demo.svc.cluster.local",
		Addresses: []*workloadapi.NetworkAddress{{Address: []byte{10, 96, 12, 7}}}, Ports: []*workloadapi.Port{{ServicePort: 8000, TargetPort: 80}}}}})
	uid := "Kubernetes//Pod/ambient-demo/httpbin-1"
	apply(t, s, discovery.AddressType, uid, &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: &workloadapi.Workload{
		Uid: uid, Name: "httpbin-1", Namespace: "ambient-demo", Addresses: [][]byte{{10, 244, 1, 4}}, Node: "n1", ServiceAccount: "httpbin",
		TunnelProtocol: workloadapi.TunnelProtocol_HBONE, Services: map[string]*workloadapi.PortList{svcKey: {}},
		Waypoint: &workloadapi.GatewayAddress{Destination: &workloadapi.GatewayAddress_Address{Address: &workloadapi.NetworkAddress{Address: []byte{10, 96, 12, 7}}}}}}})
	apply(t, s, discovery.AuthorizationType, "ambient-demo/allow", &security.Authorization{Name: "allow", Namespace: "ambient-demo", Scope: security.Scope_WORKLOAD_SELECTOR})
	now := time.Date(2026, 11, 22, 5, 0, 0, 0, time.UTC)
	id := identity.MustParse("spiffe://cluster.local/ns/ambient-demo/sa/httpbin")
	pending := identity.MustParse("spiffe://cluster.local/ns/ambient-demo/sa/sleep")
	root := &x509.Certificate{SerialNumber: big.NewInt(0x3b9d), NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour)}
	dnsStatus := &adminapi.DNS{ClusterDomain: "cluster.local", Pods: []adminapi.DNSPod{{Name: "sleep-1", Namespace: "ambient-demo", Captured: true}}}
	h := Handler(Config{State: s, DNS: func() *adminapi.DNS { return dnsStatus }, Roots: func() []*x509.Certificate { return []*x509.Certificate{root} }, Now: func() time.Time { return now }, Certificates: func() []identity.CertificateStatus {
		return []identity.CertificateStatus{{Identity: id, Serial: "ec30", NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour)}, {Identity: pending}}
	}})
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/config_dump", nil))
	if rec.Code != 200 || rec.Header().Get("Content-Type") != "application/json" {
		t.Fatalf("status %d, content type %q", rec.Code, rec.Header().Get("Content-Type"))
	}
	var d ConfigDump
	if err := json.Unmarshal(rec.Body.Bytes(), &d); err != nil {
		t.Fatal(err)
	}
	w := d.Workloads[0]
	if w.UID != uid || w.Protocol != "HBONE" || w.Addresses[0] != "10.244.1.4" || w.Waypoint != "ambient-demo/httpbin" || w.Status != "Healthy" {
		t.Errorf("workload = %+v", w)
	}
	sv := d.Services[0]
	if sv.Ports["8000"] != 80 || sv.Endpoints != 1 || sv.Addresses[0] != "10.96.12.7" {
		t.Errorf("service = %+v", sv)
	}
	if p := d.Policies[0]; p.Action != "ALLOW" || p.Scope != "WorkloadSelector" {
		t.Errorf("policy = %+v", p)
	}
	if c := d.Certificates[0]; c.State != "Available" || !c.Valid || c.Type != "Cert Chain" || c.NotAfter != "2026-11-22T06:00:00Z" {
		t.Errorf("certificate = %+v", c)
	}
	if c := d.Certificates[1]; c.Type != "CA" || c.Serial != "3b9d" || !c.Valid || c.Identity != id.String() {
		t.Errorf("root entry = %+v", c)
	}
	if c := d.Certificates[2]; c.State != "Pending" || c.Valid {
		t.Errorf("pending certificate = %+v", c)
	}
	if d.DNS == nil || d.DNS.ClusterDomain != "cluster.local" || len(d.DNS.Pods) != 1 || !d.DNS.Pods[0].Captured {
		t.Errorf("dns = %+v", d.DNS)
	}
}

func TestReadinessAndLogging(t *testing.T) {
	ready := false
	rh := ReadinessHandler(func() bool { return ready })
	for _, want := range []int{503, 200} {
		rec := httptest.NewRecorder()
		rh.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/healthz/ready", nil))
		if rec.Code != want {
			t.Fatalf("ready=%v: status %d, want %d", ready, rec.Code, want)
		}
		ready = true
	}
	var level string
	h := Handler(Config{SetLogLevel: func(l string) error { level = l; return nil }})
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/logging?level=debug", nil))
	if rec.Code != 200 || level != "debug" {
		t.Fatalf("status %d level %q", rec.Code, level)
	}
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/logging", nil))
	if rec.Code != 400 {
		t.Fatalf("missing level: status %d", rec.Code)
	}
}

package waypointtest

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/gateway"
	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/hbone/h2"
	"github.com/ambientmesh/ambient/proxylib/identity"
	"github.com/ambientmesh/ambient/proxylib/waypoint"
)

// GatewayNamespace is where test ingress gateways run (not the apps').
const GatewayNamespace = "istio-ingress"

// Gateway is a running ingress gateway: the L7 engine in ingress mode with
// its listeners on a loopback address of its own.
type Gateway struct {
	Name     string
	IP       netip.Addr
	ID       identity.Identity
	Server   *waypoint.Server
	Registry *prometheus.Registry
	// CertDir holds the HTTPS listeners' certificates (<secret>/tls.crt,
	// tls.key), as the operator mounts them.
	CertDir string
	ls      *gateway.Listeners
}

// AddGateway starts the ingress gateway of Gateway name in
// GatewayNamespace (its Gateway object arrives with ApplyL7, as from the
// control plane), published as a workload outside the mesh.
func (m *Mesh) AddGateway(name string) *Gateway {
	t := m.t
	id := identity.Identity{TrustDomain: TrustDomain, Namespace: GatewayNamespace, ServiceAccount: name}
	m.issue(id)
	g := &Gateway{Name: name, IP: m.nextIP(), ID: id, Registry: prometheus.NewRegistry()}
	w := &workloadapi.Workload{
		Uid: discovery.PodUID("Kubernetes", GatewayNamespace, name+"-0"), Name: name + "-0", Namespace: GatewayNamespace,
		Addresses: [][]byte{g.IP.AsSlice()}, TrustDomain: TrustDomain, ServiceAccount: name, WorkloadName: name,
		CanonicalName: name, TunnelProtocol: workloadapi.TunnelProtocol_NONE, ClusterId: "Kubernetes",
	}
	m.applyAddress(w.Uid, &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: w}})
	dialer, err := h2.NewDialer(h2.DialerConfig{Certs: m.Certs, Log: m.Log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dialer.Close() })
	srv, err := waypoint.New(waypoint.Config{
		Name: name, Namespace: GatewayNamespace, Identity: id, State: m.State, Dialer: dialer,
		Registry: g.Registry, Log: m.Log, RootNamespace: RootNamespace, Ingress: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	g.Server = srv
	g.CertDir = t.TempDir()
	g.ls = &gateway.Listeners{Engine: srv, Host: g.IP.String(), CertDir: g.CertDir, Log: m.Log}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go g.ls.Run(ctx)
	return g
}

// WaitReady waits until the gateway has its Gateway and listens on every
// port of it.
func (g *Gateway) WaitReady(m *Mesh) {
	deadline := time.Now().Add(10 * time.Second)
	for !g.ls.Ready() {
		if time.Now().After(deadline) {
			m.t.Fatalf("gateway %s never listened", g.Name)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// URL is http://<gateway>:<port><path>.
func (g *Gateway) URL(port uint16, path string) string {
	return "http://" + net.JoinHostPort(g.IP.String(), strconv.Itoa(int(port))) + path
}

// PublishWaypointWorkload publishes wp's own pod as the endpoint of its
// Service, so mesh clients can resolve the waypoint to an address.
func (m *Mesh) PublishWaypointWorkload(wp *Waypoint) {
	key := discovery.ServiceKey(Namespace, Hostname(wp.Name))
	m.PublishPod(&Pod{Name: wp.Name + "-0", ServiceAccount: wp.Name, IP: wp.Addr.Addr(), Identity: wp.ID,
		Labels: map[string]string{"app": wp.Name}}, nil,
		map[string]*workloadapi.PortList{key: {Ports: []*workloadapi.Port{{ServicePort: hbone.Port, TargetPort: hbone.Port}}}})
}

// MarkOutsideMesh republishes p as a workload outside the mesh (no HBONE:
// clients reach its servers in plain TCP).
func (m *Mesh) MarkOutsideMesh(p *Pod) {
	w := m.State.WorkloadByUID(UID(p.Name))
	if w == nil {
		m.t.Fatalf("pod %s is not published", p.Name)
	}
	w = proto.Clone(w).(*workloadapi.Workload)
	w.TunnelProtocol = workloadapi.TunnelProtocol_NONE
	m.applyAddress(w.Uid, &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: w}})
}

// WriteCertificate stores a certificate for hosts, signed by the test CA's
// own self-signed root (returned for clients to trust), as Secret secret.
func (g *Gateway) WriteCertificate(t testing.TB, secret string, hosts ...string) *x509.CertPool {
	t.Helper()
	return WriteSelfSigned(t, filepath.Join(g.CertDir, secret), hosts...)
}

// WriteSelfSigned writes a self-signed certificate for hosts as dir/tls.crt
// and dir/tls.key (a kubernetes.io/tls Secret's keys) and returns the pool
// that trusts it.
func WriteSelfSigned(t testing.TB, dir string, hosts ...string) *x509.CertPool {
	t.Helper()
	crt, key, pool := SelfSigned(t, hosts...)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, b := range map[string][]byte{"tls.crt": crt, "tls.key": key} {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return pool
}

// SelfSigned makes a self-signed certificate for hosts: the certificate
// and key in PEM, and the pool that trusts it.
func SelfSigned(t testing.TB, hosts ...string) (crtPEM, keyPEM []byte, pool *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: hosts[0]}, DNSNames: hosts,
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true, IsCA: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool = x509.NewCertPool()
	pool.AddCert(cert)
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), pool
}

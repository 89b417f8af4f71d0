package meshtest

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"

	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/hbone/h2"
	"github.com/ambientmesh/ambient/proxylib/identity"
	"github.com/ambientmesh/ambient/proxylib/netnsutil"
	"github.com/ambientmesh/ambient/proxylib/waypoint"
)

// RunWaypoint runs a real waypoint (proxylib/waypoint) in p's namespace
// until the test ends, serving HBONE over HTTP/2 on :15008 as cmd/waypoint
// does, with p's identity. cfg gives the rest (Name, State, Registry, Log,
// …); RunWaypoint sets its Identity, Dialer and DialTCP, which open
// connections from inside p, and Namespace when empty.
func (m *Mesh) RunWaypoint(p *Pod, cfg waypoint.Config) *waypoint.Server {
	t := m.T
	id := p.ID()
	certs := identity.NewStaticSource(m.CA.TrustDomain, m.CA.Roots())
	certs.Set(id, m.CA.Issue(t, id))
	f, err := p.Open()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	dialer, err := h2.NewDialer(h2.DialerConfig{Certs: certs, DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
		return netnsutil.DialTCP(ctx, f, netip.AddrPort{}, netip.MustParseAddrPort(addr), netnsutil.SocketOptions{})
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dialer.Close() })
	if cfg.Namespace == "" {
		cfg.Namespace = Namespace
	}
	cfg.Identity, cfg.Dialer = id, dialer
	cfg.DialTCP = func(ctx context.Context, a netip.AddrPort) (net.Conn, error) {
		return netnsutil.DialTCP(ctx, f, netip.AddrPort{}, a, netnsutil.SocketOptions{})
	}
	srv, err := waypoint.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	hs, err := h2.NewServer(h2.ServerConfig{Certs: certs, Identity: id, Handler: srv})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := netnsutil.ListenTCP(f, ":15008", netnsutil.SocketOptions{})
	if err != nil {
		t.Fatal(err)
	}
	go hs.Serve(ln)
	t.Cleanup(func() { hs.Close() })
	return srv
}

// StandInWaypoint runs a real HBONE server (the transport under test) in
// the waypoint pod wp that answers each tunnel with "waypoint: <target>
// from <peer>". It stands in for cmd/waypoint to observe what a proxy sends
// to a waypoint.
func (m *Mesh) StandInWaypoint(wp *Pod) {
	t := m.T
	certs := identity.NewStaticSource(m.CA.TrustDomain, m.CA.Roots())
	certs.Set(wp.ID(), m.CA.Issue(t, wp.ID()))
	f, _ := wp.Open()
	defer f.Close()
	srv, err := Transport(t, certs).NewServer(f, "", wp.ID(), hbone.HandlerFunc(
		func(ctx context.Context, req *hbone.Request, resp hbone.Responder) {
			s, err := resp.Accept()
			if err != nil {
				return
			}
			fmt.Fprintf(s, "waypoint: %s from %s", req.Target, req.Peer)
			// End our side gracefully (Close alone resets the tunnel).
			s.CloseWrite()
			io.Copy(io.Discard, s)
			s.Close()
		}))
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve()
	t.Cleanup(func() { srv.Close() })
}

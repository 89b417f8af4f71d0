package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/hbone/fallback"
	"github.com/ambientmesh/ambient/proxylib/hbone/h2"
	"github.com/ambientmesh/ambient/proxylib/hbone/h3"
	"github.com/ambientmesh/ambient/proxylib/identity"
)

// The waypoint speaks the mesh's HBONE transport (HBONE_TRANSPORT, set by
// the operator from the AmbientMesh or WaypointPolicy). HTTP/2 on TCP is
// always served, so HTTP/2 peers and HTTP/3 peers that fell back reach it;
// with HTTP3 the waypoint also serves QUIC on the same port (UDP) and dials
// onward HTTP/3 first, falling back to HTTP/2 as ztunnel does.

func parseTransport(s string) (hbone.Protocol, error) {
	switch p := hbone.Protocol(s); p {
	case hbone.HTTP2, "":
		return hbone.HTTP2, nil
	case hbone.HTTP3:
		return p, nil
	}
	return "", fmt.Errorf("unknown HBONE transport %q (HTTP2 or HTTP3)", s)
}

// newDialer is the onward HBONE dialer for proto.
func newDialer(proto hbone.Protocol, certs hbone.CertSource, reg prometheus.Registerer, log logr.Logger) (hbone.Dialer, error) {
	d2, err := h2.NewDialer(h2.DialerConfig{Certs: certs, Log: log.WithName("h2")})
	if err != nil {
		return nil, err
	}
	if proto != hbone.HTTP3 {
		return d2, nil
	}
	d3, err := h3.NewDialer(h3.DialerConfig{Certs: certs, Log: log.WithName("h3")})
	if err != nil {
		d2.Close()
		return nil, err
	}
	d, err := fallback.New(fallback.Config{H2: d2, H3: d3, Protocol: hbone.HTTP3, Log: log, Registerer: reg})
	if err != nil {
		d2.Close()
		d3.Close()
		return nil, err
	}
	return d, nil
}

// hboneServers are the waypoint's HBONE listeners.
type hboneServers struct {
	h2 *h2.Server
	h3 *h3.Server
}

// startHBONE serves h on addr: HTTP/2 over TCP, plus HTTP/3 over UDP when
// proto is HTTP3. Errors of a running listener go to failed.
func startHBONE(proto hbone.Protocol, addr string, certs hbone.CertSource, self identity.Identity, h hbone.Handler,
	forbidden []netip.AddrPort, log logr.Logger, failed func(error)) (*hboneServers, error) {
	s := &hboneServers{}
	var err error
	if s.h2, err = h2.NewServer(h2.ServerConfig{Certs: certs, Identity: self, Handler: h, Log: log.WithName("h2"), ForbiddenTargets: forbidden}); err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	go func() {
		if err := s.h2.Serve(ln); err != nil && !errors.Is(err, h2.ErrServerClosed) {
			failed(fmt.Errorf("HBONE (HTTP/2) listener: %w", err))
		}
	}()
	if proto != hbone.HTTP3 {
		return s, nil
	}
	if s.h3, err = h3.NewServer(h3.ServerConfig{Certs: certs, Identity: self, Handler: h, Log: log.WithName("h3"), ForbiddenTargets: forbidden}); err == nil {
		err = s.h3.Listen(addr)
	}
	if err != nil {
		s.h2.Close()
		return nil, fmt.Errorf("HBONE (HTTP/3) listener: %w", err)
	}
	go func() {
		if err := s.h3.Serve(); err != nil && !errors.Is(err, http.ErrServerClosed) {
			failed(fmt.Errorf("HBONE (HTTP/3) listener: %w", err))
		}
	}()
	return s, nil
}

// Shutdown drains both servers within ctx.
func (s *hboneServers) Shutdown(ctx context.Context) error {
	var errs []error
	if s.h3 != nil {
		errs = append(errs, s.h3.Shutdown(ctx))
	}
	errs = append(errs, s.h2.Shutdown(ctx))
	return errors.Join(errs...)
}

package meshtest

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/hbone/hbonetest"
	"github.com/ambientmesh/ambient/proxylib/identity"
	"github.com/ambientmesh/ambient/proxylib/inpod"
	"github.com/ambientmesh/ambient/proxylib/netnsutil"
	"github.com/ambientmesh/ambient/test/netns"
)

// Pod is a pod namespace and its workload.
type Pod struct {
	*netns.Pod
	// PodName is the Kubernetes pod name ("sleep-1"); the embedded Name is
	// the namespace's (prefixed) name.
	PodName        string
	Namespace      string
	ServiceAccount string
	// Node is the pod's node (it shadows the embedded netns.Pod's Node,
	// which is Node.Node).
	Node     *Node
	UID      string
	Workload *workloadapi.Workload

	nsFile *os.File // the namespace handed to the ztunnel, kept open
	// AppUID, when set, owns the sockets of the pod's app clients (Client,
	// Dial): in a sidecar pod the test process's own user is the sidecar's,
	// whose connections the redirection lets pass.
	AppUID int
}

// dial connects from inside the pod as its app: unmarked, as AppUID.
func (p *Pod) dial(ctx context.Context, dst netip.AddrPort) (net.Conn, error) {
	f, err := p.Open()
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if p.AppUID != 0 {
		return netns.DialAs(ctx, f, dst, p.AppUID)
	}
	return netnsutil.DialTCP(ctx, f, netip.AddrPort{}, dst, netnsutil.SocketOptions{})
}

// Capture installs the redirection rules and hands the pod to its node's
// ztunnel (what the node agent does), then publishes the workload as
// HBONE-capable.
func (p *Pod) Capture(m *Mesh) {
	m.T.Helper()
	f, err := p.Open()
	if err != nil {
		m.T.Fatal(err)
	}
	rd := m.Redirect
	if m.CaptureDNS {
		rd = m.DNSRedirect
	}
	if err := rd.Install(f); err != nil {
		m.T.Fatal(err)
	}
	p.Workload.TunnelProtocol = workloadapi.TunnelProtocol_HBONE
	m.CP.Workload(p.Workload)
	info := inpod.WorkloadInfo{Name: p.PodName, Namespace: p.Namespace, ServiceAccount: p.ServiceAccount, PreserveSource: rd.PreservesSource(),
		InboundTPROXY: rd.InboundTPROXY()}
	if m.CaptureDNS {
		info.CaptureDNS, info.DNSNameservers = true, m.DNSNameservers
	}
	if err := p.Node.Proxy.AddWorkload(p.UID, info, f); err != nil {
		m.T.Fatal(err)
	}
	p.nsFile = f
}

// Release undoes Capture.
func (p *Pod) Release(m *Mesh) {
	m.T.Helper()
	f, err := p.Open()
	if err != nil {
		m.T.Fatal(err)
	}
	defer f.Close()
	p.Workload.TunnelProtocol = workloadapi.TunnelProtocol_NONE
	m.CP.Workload(p.Workload)
	if err := p.Node.Proxy.DelWorkload(p.UID); err != nil {
		m.T.Fatal(err)
	}
	if err := m.Redirect.Remove(f); err != nil {
		m.T.Fatal(err)
	}
}

// ID is the pod's identity.
func (p *Pod) ID() identity.Identity {
	return identity.Identity{TrustDomain: hbonetest.DefaultTrustDomain, Namespace: p.Namespace, ServiceAccount: p.ServiceAccount}
}

// Addr is the pod's IPv4 address with port.
func (p *Pod) Addr(port uint16) netip.AddrPort { return netip.AddrPortFrom(p.IP, port) }

// Addr6 is the pod's IPv6 address with port.
func (p *Pod) Addr6(port uint16) netip.AddrPort { return netip.AddrPortFrom(p.IP6, port) }

// ServeHTTP runs an httpbin-like server on port that answers "<pod name>"
// (to a POST: "<pod name> got <body length>") until t ends.
func (p *Pod) ServeHTTP(t testing.TB, port int) {
	f, err := p.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ln, err := netnsutil.ListenTCP(f, fmt.Sprintf(":%d", port), netnsutil.SocketOptions{})
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost {
			n, _ := io.Copy(io.Discard, r.Body)
			fmt.Fprintf(w, "%s got %d", p.PodName, n)
			return
		}
		io.WriteString(w, p.PodName)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
}

// ServeTCP runs handler for each connection accepted on port inside the pod
// until t ends.
func (p *Pod) ServeTCP(t testing.TB, port int, handler func(net.Conn)) {
	f, err := p.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ln, err := netnsutil.ListenTCP(f, fmt.Sprintf(":%d", port), netnsutil.SocketOptions{})
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
			go handler(c)
		}
	}()
}

// Client returns an HTTP client without keep-alives whose connections start
// inside the pod, unmarked, so the pod's redirection captures them like an
// app's.
func (p *Pod) Client() *http.Client {
	return &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			return p.dial(ctx, netip.MustParseAddrPort(addr))
		}}}
}

// Get fetches http://dst/ from inside the pod; a status other than 200 is
// an error.
func (p *Pod) Get(dst netip.AddrPort) (string, error) {
	resp, err := p.Client().Get("http://" + dst.String() + "/")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != 200 {
		return "", fmt.Errorf("status %d", resp.StatusCode)
	}
	return string(b), nil
}

// Dial opens a raw TCP connection from inside the pod, as its app would.
func (p *Pod) Dial(dst netip.AddrPort) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return p.dial(ctx, dst)
}

// Echo is a ServeTCP handler that copies everything back.
func Echo(c net.Conn) {
	defer c.Close()
	io.Copy(c, c)
}

// CountThenReply is a ServeTCP handler that reads until EOF, then answers
// "got <n>" and closes: a half-close probe.
func CountThenReply(c net.Conn) {
	defer c.Close()
	n, _ := io.Copy(io.Discard, c)
	fmt.Fprintf(c, "got %d", n)
}

// ExpectRefused fails t if a request from p to dst gets through.
func ExpectRefused(t testing.TB, p *Pod, dst netip.AddrPort) {
	t.Helper()
	if got, err := p.Get(dst); err == nil {
		t.Fatalf("%s -> %s succeeded (%q), want refused", p.PodName, dst, got)
	}
}

// ExpectOK fails t unless a request from p to dst answers want.
func ExpectOK(t testing.TB, p *Pod, dst netip.AddrPort, want string) {
	t.Helper()
	got, err := p.Get(dst)
	if err != nil || got != want {
		t.Fatalf("%s -> %s = %q, %v; want %q", p.PodName, dst, got, err, want)
	}
}

package proctest

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ambientmesh/ambient/proxylib/netnsutil"
)

// Sidecar is a cmd/sidecar process to start for a pod.
type Sidecar struct {
	Exe            string   // the sidecar binary (or a test binary running its main)
	PodNS, ProbeNS *os.File // the pod's namespace; where the kubelet's probe comes from
	IP             netip.Addr
	Name           string // pod and service account name, namespace "default"
	Roots          string // trust bundle file, readable by user 1337
	Token          string // bearer token for the control plane; Token when empty
	Env            []string
}

// StartSidecar runs s as the injected pod runs it: `sidecar init` as a user
// holding CAP_NET_ADMIN only, then the sidecar as user 1337 without any
// capability, in the pod's namespace, with the control plane on the pod's
// 127.0.0.1:15010/15012 (ServeIn); it returns the sidecar's output and pid
// once it is ready, asked as the kubelet does from ProbeNS on :15021.
func StartSidecar(t *testing.T, s Sidecar) (*LogBuffer, int) {
	t.Helper()
	exe, podNS, probeNS, ip, name, env := s.Exe, s.PodNS, s.ProbeNS, s.IP, s.Name, s.Env
	if s.Token == "" {
		s.Token = Token
	}
	token := filepath.Join(SharedDir(t), "token")
	if err := os.WriteFile(token, []byte(s.Token), 0o644); err != nil {
		t.Fatal(err)
	}
	// The init container: CAP_NET_ADMIN only (an unprivileged user with it
	// as an ambient capability), nothing else.
	initOut := NewLogBuffer(t, name+" init")
	initCmd := exec.Command(exe, "init")
	initCmd.Env = append(append(os.Environ(), env...), "SIDECAR_UID=1337")
	initCmd.Stdout, initCmd.Stderr = initOut, initOut
	initCmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 4000, Gid: 4000},
		AmbientCaps: []uintptr{unix.CAP_NET_ADMIN}}
	if err := netnsutil.Run(podNS, initCmd.Start); err != nil {
		t.Fatal(err)
	}
	if err := initCmd.Wait(); err != nil {
		t.Fatalf("sidecar init with CAP_NET_ADMIN only: %v", err)
	}

	// The sidecar: user 1337, no capabilities.
	out := NewLogBuffer(t, name+" sidecar")
	cpName := "ambient-controlplane.ambient-system.svc"
	sc := exec.Command(exe, "-pod-name", name, "-pod-namespace", "default", "-service-account", name,
		"-xds-address", "127.0.0.1:15010", "-xds-server-name", cpName, "-ca-address", "127.0.0.1:15012", "-ca-server-name", cpName,
		"-token-path", token, "-root-cert", s.Roots)
	sc.Env = append(os.Environ(), env...)
	sc.Stdout, sc.Stderr = out, out
	sc.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 1337, Gid: 1337}}
	if err := netnsutil.Run(podNS, sc.Start); err != nil {
		t.Fatal(err)
	}
	// exited is closed when the process has ended (waitErr then holds
	// why), so both the readiness loop and the cleanup can see it.
	exited := make(chan struct{})
	var waitErr error
	go func() { waitErr = sc.Wait(); close(exited) }()
	t.Cleanup(func() {
		sc.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(30 * time.Second):
			sc.Process.Kill()
			<-exited
		}
	})
	ready := &http.Client{Timeout: time.Second, Transport: &http.Transport{DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
		return netnsutil.DialTCP(ctx, probeNS, netip.AddrPort{}, netip.MustParseAddrPort(addr), netnsutil.SocketOptions{})
	}}}
	for i := 0; ; i++ {
		resp, err := ready.Get(fmt.Sprintf("http://%s/healthz/ready", netip.AddrPortFrom(ip, 15021)))
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		select {
		case <-exited:
			t.Fatalf("sidecar exited: %v", waitErr)
		default:
		}
		if i == 300 {
			t.Fatalf("sidecar never ready: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	return out, sc.Process.Pid
}

package proxy

import (
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/ambientmesh/ambient/proxylib/proxyerr"
	"github.com/ambientmesh/ambient/proxylib/rbac"
	"github.com/ambientmesh/ambient/proxylib/telemetry"
)

// session is one proxied connection: its log prefix, telemetry labels and
// the sockets to close when policy or drain ends it early.
type session struct {
	p      *Proxy
	prefix string // "outbound{id=7}" / "inbound{id=8 peer_ip=… peer_id=…}"
	start  time.Time
	src    netip.AddrPort
	dst    netip.AddrPort
	labels telemetry.Labels
	opened bool

	mu     sync.Mutex
	conns  []net.Conn
	reason proxyerr.Reason // set when we closed it on purpose
	remove func()
}

func (p *Proxy) newSession(prefix string, src net.Addr) *session {
	return &session{p: p, prefix: prefix, start: time.Now(), src: addrPortOf(src)}
}

func (s *session) info(format string, args ...any) {
	s.p.log.Info(s.prefix + ": " + fmt.Sprintf(format, args...))
}

// attach adds sockets closed by kill.
func (s *session) attach(cs ...net.Conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.conns = append(s.conns, cs...)
}

// kill closes the session's sockets for reason (policy change, drain).
func (s *session) kill(reason proxyerr.Reason) {
	s.mu.Lock()
	if s.reason == "" {
		s.reason = reason
	}
	cs := s.conns
	s.mu.Unlock()
	for _, c := range cs {
		c.Close()
	}
}

// track registers the session; dstUID non-empty makes it subject to
// re-authorization against the local destination's policies.
func (s *session) track(owner, dstUID string, c rbac.Conn) error {
	remove, err := s.p.tracker.Add(owner, dstUID, c, s.kill)
	if err != nil {
		return err
	}
	s.remove = remove
	return nil
}

func (s *session) open() {
	s.opened = true
	s.p.cfg.Metrics.ConnOpened(s.labels)
}

// job serves an accepted connection to its end: the relay, or the L7
// engine of a sidecar.
type job func() (received, sent int64, err error)

func relayJob(down, up net.Conn) job {
	return func() (int64, int64, error) { return Relay(down, up) }
}

// run ends the session with err, or runs serve on a goroutine of its own
// and returns at once. The caller's goroutine grew its stack routing,
// authorizing and dialing (TLS handshakes, network-namespace dials); a
// tunnel that then idles for hours would hold that stack, where a fresh
// goroutine's stays small (runtime stacks shrink only while little of
// them is in use). down, when set, is closed at the end.
func (s *session) run(serve job, err error, down net.Conn) {
	if err != nil {
		if down != nil {
			down.Close()
		}
		s.finish(0, 0, err)
		return
	}
	go func() {
		received, sent, err := serve()
		if down != nil {
			down.Close()
		}
		s.finish(received, sent, err)
	}()
}

// finish writes the access-log line and closes the metrics.
func (s *session) finish(received, sent int64, err error) {
	if s.remove != nil {
		s.remove()
	}
	s.mu.Lock()
	if s.reason != "" {
		err = proxyerr.New(s.reason, "closed by proxy")
	}
	s.mu.Unlock()
	reason := proxyerr.ReasonOf(err)
	dur := time.Since(s.start).Round(time.Microsecond)
	line := fmt.Sprintf("complete dur=%s src.addr=%s src.workload=%s src.namespace=%s src.identity=%s dst.addr=%s dst.service=%s dst.workload=%s dst.namespace=%s dst.identity=%s direction=%s bytes_sent=%d bytes_recv=%d",
		dur, s.src, s.labels.Source.Workload, s.labels.Source.Namespace, s.labels.Source.Principal,
		s.dst, s.labels.Service.Host, s.labels.Destination.Workload, s.labels.Destination.Namespace, s.labels.Destination.Principal,
		direction(s.labels.Reporter), sent, received)
	if err != nil {
		line += fmt.Sprintf(" reason=%s error=%q", reason, err.Error())
		s.p.log.Error(nil, s.prefix+": "+line)
	} else {
		s.p.log.Info(s.prefix + ": " + line)
	}
	if s.opened {
		l := s.labels
		if reason != "" {
			l.ResponseFlags = string(reason)
		}
		s.p.cfg.Metrics.ConnClosed(l, received, sent)
	}
}

func direction(reporter string) string {
	if reporter == telemetry.ReporterSource {
		return "outbound"
	}
	return "inbound"
}

func addrPortOf(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	return netip.AddrPort{}
}

package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"time"

	"github.com/go-logr/logr"

	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/identity"
	"github.com/ambientmesh/ambient/proxylib/proxyerr"
	"github.com/ambientmesh/ambient/proxylib/rbac"
	"github.com/ambientmesh/ambient/proxylib/telemetry"

	"github.com/ambientmesh/ambient/proxylib/handover"
)

// handOffTimeout bounds the new ztunnel's resume of one connection.
const handOffTimeout = 15 * time.Second

// controlTimeout bounds a suspend or resume request.
const controlTimeout = 30 * time.Second

// offerSession reports whether an outbound tunnel along rt offers a
// resumable session: direct HBONE to one known identity, from a socket.
func (p *Proxy) offerSession(rt Route, down net.Conn) bool {
	_, tcp := down.(*net.TCPConn)
	return p.cfg.Handover != nil && tcp && rt.Kind == HBONE && !rt.Waypoint && len(rt.Expected) == 1
}

// outboundSession returns the job relaying down over up: a resumable
// session when the peer answered the offer, else the plain relay.
func (p *Proxy) outboundSession(s *session, pd *pod, down, up net.Conn, rt Route, srcID identity.Identity) job {
	st, ok := up.(hbone.Stream)
	if !ok {
		return relayJob(down, up)
	}
	id, err := handover.Answered(st)
	if err != nil {
		if !errors.Is(err, handover.ErrNoSession) {
			s.info("session answer ignored: %v", err)
		}
		return relayJob(down, up)
	}
	info := handover.Info{Pod: pd.info.UID, Local: srcID, Peer: rt.Expected[0], Resume: rt.ProxyAddr, Target: rt.Target, Direction: "outbound"}
	hs, err := p.cfg.Handover.NewSession(id, 0, info, down.(*net.TCPConn), st, 0, 0)
	if err != nil {
		return relayJob(down, up)
	}
	return sessionJob(hs)
}

// localSession returns the job relaying a node-local pair: a session that
// can be handed over whole (both sockets) when hand-over is on.
func (p *Proxy) localSession(src *pod, down, up net.Conn, rt Route, srcID identity.Identity) job {
	a, ok1 := down.(*net.TCPConn)
	b, ok2 := up.(*net.TCPConn)
	if p.cfg.Handover == nil || !ok1 || !ok2 {
		return relayJob(down, up)
	}
	id, err := handover.NewID()
	if err != nil {
		return relayJob(down, up)
	}
	info := handover.Info{Pod: src.info.UID, Local: srcID, Peer: p.router.WorkloadIdentity(rt.Dest), Resume: rt.Target, Target: rt.Target,
		Direction: handover.DirectionLocal}
	hs, err := p.cfg.Handover.NewSession(id, 0, info, a, b, 0, 0)
	if err != nil {
		return relayJob(down, up)
	}
	return sessionJob(hs)
}

// sessionJob serves a resumable session to its end here. The relay's
// sent (app→tunnel) is what the session received from its app.
func sessionJob(hs *handover.Session) job {
	return func() (int64, int64, error) {
		sent, recv, err := hs.Serve()
		return sent, recv, err
	}
}

// acceptSession answers an inbound CONNECT that offered a session with a
// new session id, and serves it as one. Without a registry, or with an app
// connection that is not a socket, it is a plain tunnel.
func (p *Proxy) acceptSession(s *session, pd *pod, req *hbone.Request, resp hbone.Responder, up net.Conn, dstUID string, c rbac.Conn) (job, error) {
	ha, ok := resp.(hbone.HeaderAccepter)
	app, tcp := up.(*net.TCPConn)
	if p.cfg.Handover == nil || !ok || !tcp || req.Header.Get(handover.HeaderSession) != handover.Version {
		return p.acceptAndRelay(s, pd, resp, up, dstUID, c)
	}
	id, err := handover.NewID()
	if err != nil {
		return p.acceptAndRelay(s, pd, resp, up, dstUID, c)
	}
	if err := s.track(pd.info.UID, dstUID, c); err != nil {
		up.Close()
		resp.Reject(http.StatusServiceUnavailable, err.Error())
		return nil, err
	}
	down, err := ha.AcceptWithHeader(http.Header{handover.HeaderSession: {handover.FormatAnswer(id)}})
	if err != nil {
		up.Close()
		return nil, proxyerr.Wrap(proxyerr.ConnectionClosed, err, "accept CONNECT")
	}
	peerPod := req.PeerAddr.Addr()
	info := handover.Info{Pod: pd.info.UID, Local: p.podIdentity(pd.info), Peer: req.Peer,
		Resume: netip.AddrPortFrom(peerPod, hbone.Port), Target: netip.AddrPortFrom(peerPod, req.Target.Port()), Direction: "inbound"}
	hs, err := p.cfg.Handover.NewSession(id, 0, info, app, down, 0, 0)
	if err != nil {
		s.attach(down, up)
		s.open()
		return relayJob(down, up), nil
	}
	s.attach(down, up)
	s.open()
	// Inbound: the relay's sent (app→tunnel) is what the app sent back.
	return func() (int64, int64, error) {
		sent, recv, err := hs.Serve()
		return recv, sent, err
	}, nil
}

// serveControl answers a suspend or resume CONNECT (proxylib/handover);
// false when req is neither.
func (p *Proxy) serveControl(pd *pod, req *hbone.Request, resp hbone.Responder) bool {
	reg := p.cfg.Handover
	sus, res := req.Header.Get(handover.HeaderSuspend), req.Header.Get(handover.HeaderResume)
	if sus == "" && res == "" {
		return false
	}
	refuse := func(what string, err error) bool {
		p.log.Info("session "+what+" refused", "peer_id", req.Peer.String(), "peer_ip", req.PeerAddr.Addr().String(), "err", err.Error())
		resp.Reject(handover.Status(err), err.Error())
		return true
	}
	if reg == nil {
		return refuse("control", handover.ErrUnknown)
	}
	if sus != "" {
		prm, err := handover.ParseSuspend(sus)
		if err != nil {
			return refuse("suspend", err)
		}
		e, err := reg.Find(prm.ID, req.Peer, prm.Epoch)
		if err != nil {
			return refuse("suspend", err)
		}
		hs := e.Value.(*handover.Session)
		sent, err := hs.SuspendedByPeer(prm)
		if err != nil {
			return refuse("suspend", err)
		}
		prm.Sent = sent
		if ha, ok := resp.(hbone.HeaderAccepter); ok {
			if st, err := ha.AcceptWithHeader(http.Header{handover.HeaderSuspend: {handover.FormatSuspend(prm)}}); err == nil {
				st.CloseWrite()
				st.Close()
			}
		}
		p.log.Info("session suspended by its peer, parked", "session", prm.ID.String(), "peer_id", req.Peer.String(), "sent", sent, "recv", prm.Sent)
		return true
	}
	prm, err := handover.ParseResume(res)
	if err != nil {
		return refuse("resume", err)
	}
	e, _, err := reg.Claim(prm, req.Peer)
	if err != nil {
		return refuse("resume", err)
	}
	hs := e.Value.(*handover.Session)
	st, err := resp.Accept()
	if err != nil {
		hs.Finish(err) // parked, then the new tunnel failed: nothing carries it
		hs.Relay().App().Close()
		return true
	}
	hs.Continue(st)
	p.log.Info("session resumed by its peer", "session", prm.ID.String(), "peer_id", req.Peer.String(), "epoch", prm.Epoch+1)
	return true
}

// dialControl sends a suspend or resume for hs from pod pd.
func (p *Proxy) dialControl(ctx context.Context, pd *pod, info handover.Info, h http.Header) (hbone.Stream, error) {
	// Longer than the peer may take to answer a suspend (handover's pause
	// and delivery bounds, 15 s): giving up earlier would leave it parked
	// while we read on.
	ctx, cancel := context.WithTimeout(ctx, max(p.cfg.ConnectTimeout, controlTimeout))
	defer cancel()
	return pd.dialer.Dial(ctx, hbone.DialRequest{Source: info.Local, Expected: []identity.Identity{info.Peer},
		ProxyAddr: info.Resume, Target: info.Target, Header: h})
}

// HandOver suspends every resumable session and passes its app socket to
// the new ztunnel through c. A session that cannot be suspended keeps
// running here; one suspended but not taken is resumed here. It returns
// how many were handed over and how many stay.
func (p *Proxy) HandOver(ctx context.Context, c *handover.Client) (handed, kept int) {
	for _, hs := range p.cfg.Handover.Sessions() {
		if p.handOverOne(ctx, c, hs) {
			handed++
		} else {
			kept++
		}
	}
	return handed, kept
}

func (p *Proxy) handOverOne(ctx context.Context, c *handover.Client, hs *handover.Session) bool {
	info := hs.Info
	pd := p.podByUID(info.Pod)
	if pd == nil {
		return false
	}
	log := p.log.WithValues("session", hs.ID().String(), "direction", info.Direction, "peer_id", info.Peer.String())
	if hs.Local() {
		return p.handOverLocal(c, hs, log)
	}
	prm, err := hs.Suspend(func(h http.Header) (http.Header, error) {
		st, err := p.dialControl(ctx, pd, info, h)
		if err != nil {
			return nil, err
		}
		defer st.Close()
		rh, ok := st.(hbone.ResponseHeaderer)
		if !ok {
			return nil, handover.ErrNoSession
		}
		return rh.ResponseHeader(), nil
	})
	if err != nil {
		log.Info("connection not handed over, kept until the drain ends", "err", err.Error())
		return false
	}
	f, err := hs.Relay().App().File()
	if err == nil {
		h := handover.Handoff{V: 1, Session: prm.ID.String(), Epoch: prm.Epoch, Sent: prm.Sent, Recv: prm.Recv, Pod: info.Pod,
			Local: info.Local.String(), Peer: info.Peer.String(), Resume: info.Resume.String(), Target: info.Target.String(), Direction: info.Direction}
		err = c.HandOff(h, handOffTimeout, f)
		f.Close()
	}
	if err == nil {
		log.Info("connection handed over to the new ztunnel", "sent", prm.Sent, "recv", prm.Recv)
		hs.Finish(nil)
		return true
	}
	// Take it back: resume here, the drain serves it as before.
	st, rerr := p.dialControl(ctx, pd, info, handover.ResumeHeader(prm))
	if rerr != nil {
		if hbone.StatusOf(rerr) == http.StatusConflict {
			// Already resumed: the new ztunnel took it after all.
			log.Info("connection taken by the new ztunnel (ack lost)", "err", err.Error())
			hs.Finish(nil)
			return true
		}
		log.Error(rerr, "connection lost: hand-over failed and the session could not be resumed here", "handover_err", err.Error())
		hs.Relay().App().Close()
		hs.Finish(rerr)
		return false
	}
	hs.Resumed()
	hs.Continue(st)
	log.Info("hand-over failed, connection resumed here until the drain ends", "err", err.Error())
	return false
}

// handOverLocal passes a node-local pair whole: both sockets stop at a
// clean byte boundary and go together; if the new ztunnel does not take
// them, the pair relays on here.
func (p *Proxy) handOverLocal(c *handover.Client, hs *handover.Session, log logr.Logger) bool {
	if err := hs.SuspendLocal(); err != nil {
		log.Info("local connection not handed over, kept until the drain ends", "err", err.Error())
		return false
	}
	r := hs.Relay()
	sent, recv := r.Counts()
	info := hs.Info
	h := handover.Handoff{V: 1, Session: hs.ID().String(), Sent: sent, Recv: recv, Pod: info.Pod, Local: info.Local.String(),
		Peer: info.Peer.String(), Resume: info.Resume.String(), Target: info.Target.String(), Direction: info.Direction}
	src, err := r.App().File()
	if err == nil {
		var dst *os.File
		if dst, err = r.Tunnel().(*net.TCPConn).File(); err == nil {
			err = c.HandOff(h, handOffTimeout, src, dst)
			dst.Close()
		}
		src.Close()
	}
	if errors.Is(err, handover.ErrUnanswered) {
		// No peer can tell who has it: relaying here too could repeat
		// bytes, so leave it to the new ztunnel.
		log.Info("local connection left to the new ztunnel (no ack)", "err", err.Error())
		r.Tunnel().Close()
		hs.Finish(err)
		return true
	}
	if err != nil {
		log.Info("hand-over failed, local connection relayed here until the drain ends", "err", err.Error())
		hs.Continue(r.Tunnel())
		return false
	}
	r.Tunnel().Close() // our copy; the new ztunnel holds the socket
	log.Info("local connection handed over to the new ztunnel", "sent", sent, "recv", recv)
	hs.Finish(nil)
	return true
}

// takeOverLocal relays a handed-over node-local pair.
func (p *Proxy) takeOverLocal(d handover.Decoded, pd *pod, files []*os.File) error {
	var socks [2]*net.TCPConn
	for i, f := range files {
		c, err := net.FileConn(f)
		if err == nil {
			if tc, ok := c.(*net.TCPConn); ok {
				socks[i] = tc
				continue
			}
			c.Close()
			err = errors.New("not a TCP socket")
		}
		for _, s := range socks[:i] {
			s.Close()
		}
		return fmt.Errorf("handed-over descriptor %d: %w", i, err)
	}
	info := handover.Info{Pod: d.Pod, Local: d.Local, Peer: d.Peer, Resume: d.Resume, Target: d.Target, Direction: d.Direction}
	hs, err := p.cfg.Handover.NewSession(d.ID, 0, info, socks[0], socks[1], d.Sent, d.Recv)
	if err != nil {
		socks[0].Close()
		socks[1].Close()
		return err
	}
	for _, f := range files {
		f.Close()
	}
	s := p.newSession(fmt.Sprintf("outbound{id=%d local-pair=%s}", p.nextID(), d.ID), socks[0].RemoteAddr())
	s.dst = d.Target
	s.labels = telemetry.Labels{Reporter: telemetry.ReporterDestination, Source: telemetry.PeerOf(nil, &d.Local),
		Destination: telemetry.PeerOf(nil, &d.Peer), Service: telemetry.ServiceOf(nil), SecurityPolicy: telemetry.MutualTLS}
	s.attach(socks[0], socks[1])
	if err := s.track(pd.info.UID, "", rbac.Conn{}); err != nil {
		hs.Relay().Fail(err)
		return nil
	}
	s.open()
	s.info("node-local connection taken over from the previous ztunnel: sent=%d recv=%d", d.Sent, d.Recv)
	s.run(sessionJob(hs), nil, nil)
	return nil
}

// TakeOver resumes a connection handed over by a draining ztunnel (the
// hand-over socket's Accept): it re-dials the peer with the session's
// counts and serves it. It owns f only on success.
func (p *Proxy) TakeOver(d handover.Decoded, files []*os.File) error {
	if p.cfg.Handover == nil {
		return errors.New("handover disabled")
	}
	// The node agent may still be sending us the pod (a rollout waits for
	// our readiness, so this is short).
	pd := p.podByUID(d.Pod)
	for i := 0; pd == nil && i < 50; i++ {
		time.Sleep(100 * time.Millisecond)
		pd = p.podByUID(d.Pod)
	}
	if pd == nil {
		return fmt.Errorf("pod %s not served here", d.Pod)
	}
	if d.Direction == handover.DirectionLocal {
		return p.takeOverLocal(d, pd, files)
	}
	f := files[0]
	fc, err := net.FileConn(f)
	if err != nil {
		return err
	}
	app, ok := fc.(*net.TCPConn)
	if !ok {
		fc.Close()
		return errors.New("handed-over descriptor is not a TCP socket")
	}
	info := handover.Info{Pod: d.Pod, Local: d.Local, Peer: d.Peer, Resume: d.Resume, Target: d.Target, Direction: d.Direction}
	st, err := p.dialControl(context.Background(), pd, info, handover.ResumeHeader(d.Params))
	if err != nil {
		app.Close() // our copy only: the old ztunnel keeps its own
		return fmt.Errorf("resume: %w", err)
	}
	hs, err := p.cfg.Handover.NewSession(d.ID, d.Epoch+1, info, app, st, d.Sent, d.Recv)
	if err != nil {
		st.Close()
		app.Close()
		return err
	}
	f.Close()
	s := p.newSession(fmt.Sprintf("%s{id=%d resumed=%s}", d.Direction, p.nextID(), d.ID), app.RemoteAddr())
	s.dst = d.Target
	s.labels = telemetry.Labels{Reporter: telemetry.ReporterSource, Source: telemetry.PeerOf(nil, &d.Local),
		Destination: telemetry.PeerOf(nil, &d.Peer), Service: telemetry.ServiceOf(nil), SecurityPolicy: telemetry.MutualTLS}
	if d.Direction == "inbound" {
		s.labels.Reporter = telemetry.ReporterDestination
		s.labels.Source, s.labels.Destination = s.labels.Destination, s.labels.Source
	}
	s.attach(app, st)
	if err := s.track(pd.info.UID, "", rbac.Conn{}); err != nil {
		hs.Relay().Fail(err)
		return nil // ours now; the fail closes it
	}
	s.open()
	s.info("connection taken over from the previous ztunnel: session %s epoch %d sent=%d recv=%d", d.ID, d.Epoch+1, d.Sent, d.Recv)
	s.run(sessionJob(hs), nil, nil)
	return nil
}

func (p *Proxy) podByUID(uid string) *pod {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.pods[uid]
}

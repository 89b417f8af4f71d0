package inpod

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"github.com/go-logr/logr"

	"github.com/ambientmesh/ambient/proxylib/inpod/zds"
)

// Conn is one node-agent connection to ztunnel. Requests are synchronous:
// each returns after ztunnel's Ack. Safe for concurrent use.
type Conn struct {
	c      *net.UnixConn
	mu     sync.Mutex
	acks   chan ackOrErr
	closed chan struct{}
}

type ackOrErr struct {
	ack *zds.Ack
	err error
}

// Dial connects to ztunnel's socket and says Hello.
func Dial(ctx context.Context, path string) (*Conn, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unixpacket", path)
	if err != nil {
		return nil, fmt.Errorf("inpod: dial ztunnel: %w", err)
	}
	c := &Conn{c: nc.(*net.UnixConn), acks: make(chan ackOrErr, 1), closed: make(chan struct{})}
	go c.readLoop()
	if err := c.request(ctx, &zds.WorkloadRequest{Payload: &zds.WorkloadRequest_Hello{Hello: &zds.Hello{Version: zds.Version_V1}}}, nil); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// readLoop delivers acks and notices when ztunnel goes away even while idle.
func (c *Conn) readLoop() {
	defer close(c.closed)
	for {
		var resp zds.WorkloadResponse
		fd, err := recv(c.c, &resp)
		closeFile(fd) // ztunnel never sends descriptors
		if err == nil && resp.GetAck() == nil {
			err = errors.New("inpod: response without Ack")
		}
		select {
		case c.acks <- ackOrErr{resp.GetAck(), err}:
		default: // unsolicited: protocol violation
			err = errors.New("inpod: unsolicited response")
		}
		if err != nil {
			c.c.Close()
			return
		}
	}
}

// Done is closed when the connection has failed or been closed.
func (c *Conn) Done() <-chan struct{} { return c.closed }

// Close closes the connection.
func (c *Conn) Close() error { return c.c.Close() }

func (c *Conn) request(ctx context.Context, req *zds.WorkloadRequest, fd *os.File) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := send(c.c, req, fd); err != nil {
		c.c.Close()
		return fmt.Errorf("inpod: send: %w", err)
	}
	select {
	case r := <-c.acks:
		if r.err != nil {
			return r.err
		}
		if r.ack.GetError() != "" {
			return &AckError{Msg: r.ack.GetError()}
		}
		return nil
	case <-c.closed:
		// The reader may have queued a final ack before exiting.
		select {
		case r := <-c.acks:
			if r.err == nil && r.ack.GetError() == "" {
				return nil
			}
		default:
		}
		return errors.New("inpod: connection to ztunnel closed")
	case <-ctx.Done():
		c.c.Close() // the ack pairing is lost; start over
		return ctx.Err()
	}
}

// AckError is ztunnel's refusal of a request.
type AckError struct{ Msg string }

func (e *AckError) Error() string { return "ztunnel refused: " + e.Msg }

// AddWorkload hands ztunnel the pod's namespace.
func (c *Conn) AddWorkload(ctx context.Context, uid string, info WorkloadInfo, netns *os.File) error {
	if netns == nil {
		return errors.New("inpod: AddWorkload needs a namespace")
	}
	return c.request(ctx, &zds.WorkloadRequest{Payload: &zds.WorkloadRequest_Add{Add: info.addProto(uid)}}, netns)
}

// KeepWorkload asks ztunnel to keep a workload it already serves.
func (c *Conn) KeepWorkload(ctx context.Context, uid string) error {
	return c.request(ctx, &zds.WorkloadRequest{Payload: &zds.WorkloadRequest_Keep{Keep: &zds.KeepWorkload{Uid: uid}}}, nil)
}

// DelWorkload releases a pod.
func (c *Conn) DelWorkload(ctx context.Context, uid string) error {
	return c.request(ctx, &zds.WorkloadRequest{Payload: &zds.WorkloadRequest_Del{Del: &zds.DelWorkload{Uid: uid}}}, nil)
}

// SnapshotSent ends the snapshot: ztunnel releases workloads not named since Hello.
func (c *Conn) SnapshotSent(ctx context.Context) error {
	return c.request(ctx, &zds.WorkloadRequest{Payload: &zds.WorkloadRequest_SnapshotSent{SnapshotSent: &zds.SnapshotSent{}}}, nil)
}

// Pod is what the node agent tells ztunnel about a captured pod.
type Pod struct {
	UID       string
	Info      WorkloadInfo
	NetnsPath string // e.g. /var/run/netns/cni-…; opened at each send
	// Netns, when set, is used instead of NetnsPath (the caller keeps it
	// open while the pod is captured, e.g. a handle found via /proc).
	Netns *os.File
}

// Syncer is the node agent's side: it holds the set of captured pods and
// keeps ztunnel in step with it, re-sending the whole set (then
// SnapshotSent) on every (re)connection, so a restarted ztunnel re-adopts
// every pod and a restarted node agent's snapshot releases stale ones.
type Syncer struct {
	path string
	log  logr.Logger

	mu      sync.Mutex
	pods    map[string]Pod
	refused map[string]bool // pods ztunnel refused (e.g. no certificate yet): retried
	conn    *Conn           // nil while disconnected
	synced  chan struct{}   // closed after the current connection's snapshot
}

// NewSyncer returns a syncer for ztunnel's socket path.
func NewSyncer(path string, log logr.Logger) *Syncer {
	return &Syncer{path: path, log: log, pods: map[string]Pod{}, refused: map[string]bool{}, synced: make(chan struct{})}
}

// ErrNotConnected means ztunnel is not connected; the change is recorded
// and will be sent in the next snapshot.
var ErrNotConnected = errors.New("inpod: ztunnel not connected (change queued for the next snapshot)")

// Upsert records a captured pod and sends it to ztunnel if connected.
func (s *Syncer) Upsert(ctx context.Context, p Pod) error {
	s.mu.Lock()
	s.pods[p.UID] = p
	conn := s.conn
	s.mu.Unlock()
	if conn == nil {
		return ErrNotConnected
	}
	err := sendAdd(ctx, conn, p)
	s.noteRefusal(p.UID, err)
	return err
}

// noteRefusal remembers pods ztunnel refused so Run retries them.
func (s *Syncer) noteRefusal(uid string, err error) {
	var ack *AckError
	s.mu.Lock()
	defer s.mu.Unlock()
	if errors.As(err, &ack) {
		s.refused[uid] = true
	} else if err == nil {
		delete(s.refused, uid)
	}
}

// retryRefused re-sends pods ztunnel refused earlier.
func (s *Syncer) retryRefused(ctx context.Context, conn *Conn) {
	s.mu.Lock()
	var retry []Pod
	for uid := range s.refused {
		if p, ok := s.pods[uid]; ok {
			retry = append(retry, p)
		} else {
			delete(s.refused, uid)
		}
	}
	s.mu.Unlock()
	for _, p := range retry {
		err := sendAdd(ctx, conn, p)
		if err != nil {
			s.log.Error(err, "ztunnel still refuses pod", "uid", p.UID, "pod", p.Info)
		} else {
			s.log.Info("ztunnel accepted previously refused pod", "uid", p.UID, "pod", p.Info)
		}
		s.noteRefusal(p.UID, err)
	}
}

// Remove forgets a pod and tells ztunnel if connected. Not being
// connected is not an error: the next snapshot will not name the pod.
func (s *Syncer) Remove(ctx context.Context, uid string) error {
	s.mu.Lock()
	delete(s.pods, uid)
	delete(s.refused, uid)
	conn := s.conn
	s.mu.Unlock()
	if conn == nil {
		return nil
	}
	return conn.DelWorkload(ctx, uid)
}

// Synced returns a channel closed once ztunnel has the current snapshot.
func (s *Syncer) Synced() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.synced
}

func sendAdd(ctx context.Context, c *Conn, p Pod) error {
	if p.Netns != nil {
		return c.AddWorkload(ctx, p.UID, p.Info, p.Netns)
	}
	f, err := os.Open(p.NetnsPath)
	if err != nil {
		return fmt.Errorf("open netns of %s: %w", p.Info, err)
	}
	defer f.Close()
	return c.AddWorkload(ctx, p.UID, p.Info, f)
}

// Run connects, sends the snapshot and reconnects with backoff until ctx ends.
func (s *Syncer) Run(ctx context.Context) {
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		conn, err := Dial(ctx, s.path)
		if err != nil {
			s.log.V(1).Info("ztunnel not reachable", "err", err.Error())
			select {
			case <-ctx.Done():
			case <-time.After(backoff):
			}
			backoff = min(backoff*2, 5*time.Second)
			continue
		}
		backoff = 100 * time.Millisecond
		if err := s.snapshot(ctx, conn); err != nil {
			s.log.Error(err, "snapshot to ztunnel failed")
			conn.Close()
			continue
		}
		s.waitConnected(ctx, conn)
		s.mu.Lock()
		s.conn = nil
		s.synced = make(chan struct{})
		s.mu.Unlock()
		conn.Close()
	}
}

// waitConnected retries refused pods until the connection ends.
func (s *Syncer) waitConnected(ctx context.Context, conn *Conn) {
	retry := time.NewTicker(2 * time.Second)
	defer retry.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-conn.Done():
			s.log.Info("ztunnel connection lost; will reconnect and resend all pods")
			return
		case <-retry.C:
			s.retryRefused(ctx, conn)
		}
	}
}

// snapshot sends every pod then SnapshotSent. The connection is published
// (so Upsert/Remove go straight through) only after the snapshot, under
// the lock, so no concurrent change is lost or reordered.
func (s *Syncer) snapshot(ctx context.Context, conn *Conn) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for uid, p := range s.pods {
		if err := sendAdd(ctx, conn, p); err != nil {
			var ack *AckError
			if !errors.As(err, &ack) {
				return err
			}
			// ztunnel refused this pod (e.g. no certificate yet): report and
			// continue; it stays desired and is retried while connected.
			s.log.Error(err, "ztunnel refused pod in snapshot", "uid", uid, "pod", p.Info)
			s.refused[uid] = true
		} else {
			delete(s.refused, uid)
		}
	}
	if err := conn.SnapshotSent(ctx); err != nil {
		var ack *AckError
		if !errors.As(err, &ack) {
			return err
		}
		s.log.Error(err, "snapshot applied with errors")
	}
	s.conn = conn
	close(s.synced)
	s.log.Info("ztunnel in sync", "pods", len(s.pods))
	return nil
}

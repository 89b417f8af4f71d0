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
// keeps every ztunnel on the node in step with it. The socket path leads to
// the newest ztunnel; the Syncer watches the socket file, connects to each
// new one (a restart, or an upgrade's new instance) while keeping its
// connections to older ones that still run (an upgrade's draining
// instance), and sends each connection the whole set (then SnapshotSent),
// so a restarted ztunnel re-adopts every pod and a restarted node agent's
// snapshot releases stale ones. Upsert and Remove go to every connection.
type Syncer struct {
	path string
	log  logr.Logger

	mu     sync.Mutex
	pods   map[string]Pod
	links  map[*link]bool // connected ztunnels that have the snapshot
	synced chan struct{}  // closed while at least one ztunnel is in sync
}

// link is the connection to one ztunnel instance.
type link struct {
	conn    *Conn
	inode   uint64          // the socket file it was dialled through
	refused map[string]bool // pods this ztunnel refused (e.g. no certificate yet): retried
}

// NewSyncer returns a syncer for ztunnel's socket path.
func NewSyncer(path string, log logr.Logger) *Syncer {
	return &Syncer{path: path, log: log, pods: map[string]Pod{}, links: map[*link]bool{}, synced: make(chan struct{})}
}

// ErrNotConnected means ztunnel is not connected; the change is recorded
// and will be sent in the next snapshot.
var ErrNotConnected = errors.New("inpod: ztunnel not connected (change queued for the next snapshot)")

// Upsert records a captured pod and sends it to every connected ztunnel.
// It returns their refusals, joined.
func (s *Syncer) Upsert(ctx context.Context, p Pod) error {
	s.mu.Lock()
	s.pods[p.UID] = p
	links := s.linkList()
	s.mu.Unlock()
	if len(links) == 0 {
		return ErrNotConnected
	}
	var errs []error
	for _, l := range links {
		err := sendAdd(ctx, l.conn, p)
		s.noteRefusal(l, p.UID, err)
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func (s *Syncer) linkList() []*link {
	out := make([]*link, 0, len(s.links))
	for l := range s.links {
		out = append(out, l)
	}
	return out
}

// noteRefusal remembers pods a ztunnel refused so they are retried.
func (s *Syncer) noteRefusal(l *link, uid string, err error) {
	var ack *AckError
	s.mu.Lock()
	defer s.mu.Unlock()
	if errors.As(err, &ack) {
		l.refused[uid] = true
	} else if err == nil {
		delete(l.refused, uid)
	}
}

// retryRefused re-sends the pods l's ztunnel refused earlier.
func (s *Syncer) retryRefused(ctx context.Context, l *link) {
	s.mu.Lock()
	var retry []Pod
	for uid := range l.refused {
		if p, ok := s.pods[uid]; ok {
			retry = append(retry, p)
		} else {
			delete(l.refused, uid)
		}
	}
	s.mu.Unlock()
	for _, p := range retry {
		err := sendAdd(ctx, l.conn, p)
		if err != nil {
			s.log.Error(err, "ztunnel still refuses pod", "uid", p.UID, "pod", p.Info, "socket", l.inode)
		} else {
			s.log.Info("ztunnel accepted previously refused pod", "uid", p.UID, "pod", p.Info, "socket", l.inode)
		}
		s.noteRefusal(l, p.UID, err)
	}
}

// Remove forgets a pod and releases it in every connected ztunnel. Not
// being connected is not an error: the next snapshot will not name the pod.
func (s *Syncer) Remove(ctx context.Context, uid string) error {
	s.mu.Lock()
	delete(s.pods, uid)
	links := s.linkList()
	for _, l := range links {
		delete(l.refused, uid)
	}
	s.mu.Unlock()
	var errs []error
	for _, l := range links {
		errs = append(errs, l.conn.DelWorkload(ctx, uid))
	}
	return errors.Join(errs...)
}

// Synced returns a channel closed once a ztunnel has the current snapshot.
func (s *Syncer) Synced() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.synced
}

// Connected is the number of ztunnel instances in sync (tests, debug).
func (s *Syncer) Connected() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.links)
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

// socketPoll is how often Run looks for a new ztunnel behind the path.
const socketPoll = 250 * time.Millisecond

// Run connects to every ztunnel that appears behind the socket path, sends
// each its snapshot and keeps it in step, until ctx ends. A socket file it
// cannot connect to (a ztunnel that died) is retried with backoff; a new
// file is tried at once.
func (s *Syncer) Run(ctx context.Context) {
	var failed struct {
		inode uint64
		retry time.Time
		delay time.Duration
	}
	ended := make(chan struct{}, 1)
	for ctx.Err() == nil {
		inode, err := socketInode(s.path)
		due := inode != failed.inode || !time.Now().Before(failed.retry)
		if err == nil && due && !s.hasLink(inode) {
			l, err := s.connect(ctx, inode)
			if err != nil {
				s.log.V(1).Info("ztunnel not reachable", "err", err.Error())
				if inode != failed.inode {
					failed.delay = 0
				}
				failed.delay = min(max(2*failed.delay, 100*time.Millisecond), 5*time.Second)
				failed.inode, failed.retry = inode, time.Now().Add(failed.delay)
			} else {
				failed.inode = 0
				go func() {
					s.serveLink(ctx, l)
					select {
					case ended <- struct{}{}:
					default:
					}
				}()
				continue
			}
		}
		select {
		case <-ctx.Done():
		case <-ended: // look again at once: the ztunnel may have restarted
		case <-time.After(socketPoll):
		}
	}
}

func (s *Syncer) hasLink(inode uint64) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for l := range s.links {
		if l.inode == inode {
			return true
		}
	}
	return false
}

// connect dials the ztunnel behind the socket file with inode and sends it
// the snapshot. The file is checked again after dialling, so the link is
// never attributed to the wrong instance.
func (s *Syncer) connect(ctx context.Context, inode uint64) (*link, error) {
	conn, err := Dial(ctx, s.path)
	if err != nil {
		return nil, err
	}
	if now, err := socketInode(s.path); err != nil || now != inode {
		conn.Close()
		return nil, errors.New("inpod: socket replaced while connecting")
	}
	l := &link{conn: conn, inode: inode, refused: map[string]bool{}}
	if err := s.snapshot(ctx, l); err != nil {
		conn.Close()
		return nil, fmt.Errorf("snapshot to ztunnel: %w", err)
	}
	return l, nil
}

// serveLink retries refused pods until the connection ends, then forgets it.
func (s *Syncer) serveLink(ctx context.Context, l *link) {
	retry := time.NewTicker(2 * time.Second)
	defer retry.Stop()
	defer l.conn.Close()
	defer s.dropLink(l)
	for {
		select {
		case <-ctx.Done():
			return
		case <-l.conn.Done():
			s.log.Info("ztunnel connection lost", "socket", l.inode)
			return
		case <-retry.C:
			s.retryRefused(ctx, l)
		}
	}
}

func (s *Syncer) dropLink(l *link) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.links, l)
	if len(s.links) == 0 {
		s.synced = make(chan struct{})
	}
}

// snapshot sends every pod then SnapshotSent. The link is published (so
// Upsert/Remove reach it) only after the snapshot, under the lock, so no
// concurrent change is lost or reordered.
func (s *Syncer) snapshot(ctx context.Context, l *link) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for uid, p := range s.pods {
		if err := sendAdd(ctx, l.conn, p); err != nil {
			var ack *AckError
			if !errors.As(err, &ack) {
				return err
			}
			// ztunnel refused this pod (e.g. no certificate yet): report and
			// continue; it stays desired and is retried while connected.
			s.log.Error(err, "ztunnel refused pod in snapshot", "uid", uid, "pod", p.Info)
			l.refused[uid] = true
		}
	}
	if err := l.conn.SnapshotSent(ctx); err != nil {
		var ack *AckError
		if !errors.As(err, &ack) {
			return err
		}
		s.log.Error(err, "snapshot applied with errors")
	}
	if len(s.links) == 0 {
		close(s.synced)
	}
	s.links[l] = true
	s.log.Info("ztunnel in sync", "pods", len(s.pods), "socket", l.inode, "ztunnels", len(s.links))
	return nil
}

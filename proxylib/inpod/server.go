package inpod

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"

	"github.com/go-logr/logr"
	"golang.org/x/sys/unix"

	"github.com/ambientmesh/ambient/proxylib/inpod/zds"
	"github.com/ambientmesh/ambient/proxylib/netnsutil"
)

// WorkloadHandler is ztunnel's proxy: it starts and stops serving pods.
// Calls are serialized.
type WorkloadHandler interface {
	// AddWorkload starts serving the pod whose network namespace is netns
	// (typically with OpenListeners). On success the handler owns netns and
	// closes it in DelWorkload; on error the server closes it. It is also
	// called for a uid already served in the same namespace when the info
	// changed: the handler keeps the pod and takes the new info.
	AddWorkload(uid string, info WorkloadInfo, netns *os.File) error
	// DelWorkload stops serving the pod and closes its listeners.
	DelWorkload(uid string) error
	// SnapshotDone is called once a node-agent snapshot has been applied
	// and every pod it named is served (readiness): after SnapshotSent, or
	// later when the last pod this ztunnel refused is finally added. An
	// upgrade's new ztunnel must not look ready while it refuses pods, or
	// the old one would be stopped with nobody serving them.
	SnapshotDone()
}

// Server is ztunnel's side: it listens on a unix SOCK_SEQPACKET socket and
// applies the node agent's requests to a WorkloadHandler. One node agent is
// served at a time; a new connection replaces the old one and starts a new
// snapshot. Workloads survive node-agent disconnects.
type Server struct {
	path    string
	handler WorkloadHandler
	log     logr.Logger

	mu      sync.Mutex             // serializes connections' requests
	serving map[string]workloadRef // uid -> namespace identity
	active  *net.UnixConn
	// refused: pods of the current snapshot the handler could not add yet.
	// While any is left the snapshot is not done.
	refused map[string]bool
}

type workloadRef struct {
	info  WorkloadInfo
	inode uint64
}

// NewServer returns a server for socket path (DefaultSocketPath in production).
func NewServer(path string, h WorkloadHandler, log logr.Logger) *Server {
	return &Server{path: path, handler: h, log: log, serving: map[string]workloadRef{}, refused: map[string]bool{}}
}

// Workloads returns the uids being served (for admin/debug output).
func (s *Server) Workloads() map[string]WorkloadInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string]WorkloadInfo, len(s.serving))
	for uid, ref := range s.serving {
		out[uid] = ref.info
	}
	return out
}

// ListenAndServe serves until ctx ends. The socket file is replaced: during
// an upgrade the path leads to the newest ztunnel while the node agent keeps
// its connection to the old one (docs/interfaces.md, ZDS). On exit the file
// is removed only if it is still ours.
func (s *Server) ListenAndServe(ctx context.Context) error {
	if err := os.MkdirAll(filepath.Dir(s.path), 0o750); err != nil {
		return err
	}
	_ = os.Remove(s.path)
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: s.path, Net: "unixpacket"})
	if err != nil {
		return fmt.Errorf("inpod: listen %s: %w", s.path, err)
	}
	ln.SetUnlinkOnClose(false) // the path may belong to a newer ztunnel by then
	if err := os.Chmod(s.path, 0o600); err != nil {
		ln.Close()
		return err
	}
	ours, err := socketInode(s.path)
	if err != nil {
		ln.Close()
		return err
	}
	defer func() {
		if cur, err := socketInode(s.path); err == nil && cur == ours {
			os.Remove(s.path)
		}
	}()
	return s.Serve(ctx, ln)
}

// socketInode identifies the socket file at path (0 and an error if absent).
func socketInode(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}

// Serve accepts node-agent connections on ln until ctx ends.
func (s *Server) Serve(ctx context.Context, ln *net.UnixListener) error {
	go func() { <-ctx.Done(); ln.Close() }()
	for {
		c, err := ln.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		s.mu.Lock()
		if s.active != nil {
			s.log.Info("new node agent connection replaces the previous one")
			s.active.Close()
		}
		s.active = c
		s.refused = map[string]bool{} // the new connection sends a new snapshot
		s.mu.Unlock()
		go s.handle(ctx, c)
	}
}

func (s *Server) handle(ctx context.Context, c *net.UnixConn) {
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	sess := session{seen: map[string]bool{}}
	for {
		var req zds.WorkloadRequest
		fd, err := recv(c, &req)
		if err != nil {
			if !errors.Is(err, errEOF) && ctx.Err() == nil {
				s.log.Error(err, "node agent connection")
			}
			return
		}
		herr := s.apply(c, &sess, &req, fd)
		ack := &zds.Ack{}
		if herr != nil {
			ack.Error = herr.Error()
			s.log.Error(herr, "node agent request refused")
		}
		if err := send(c, &zds.WorkloadResponse{Payload: &zds.WorkloadResponse_Ack{Ack: ack}}, nil); err != nil {
			s.log.Error(err, "ack to node agent")
			return
		}
		if herr != nil && !sess.hello {
			return // a peer that does not speak the protocol gets one error and is dropped
		}
	}
}

// session is one node-agent connection's snapshot progress.
type session struct {
	hello    bool
	snapshot bool // SnapshotSent received
	seen     map[string]bool
}

func (s *Server) apply(c *net.UnixConn, sess *session, req *zds.WorkloadRequest, fd *os.File) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.active != c {
		closeFile(fd)
		return errors.New("connection replaced by a newer node agent")
	}
	if _, isAdd := req.Payload.(*zds.WorkloadRequest_Add); !isAdd && fd != nil {
		closeFile(fd)
		return errors.New("file descriptor attached to a message other than AddWorkload")
	}
	if !sess.hello {
		h := req.GetHello()
		if h == nil {
			closeFile(fd)
			return errors.New("first message must be Hello")
		}
		if h.GetVersion() != zds.Version_V1 {
			return fmt.Errorf("unsupported protocol version %v", h.GetVersion())
		}
		sess.hello = true
		return nil
	}
	switch p := req.Payload.(type) {
	case *zds.WorkloadRequest_Add:
		err := s.add(sess, p.Add, fd)
		s.noteAdd(sess, p.Add.GetUid(), err)
		return err
	case *zds.WorkloadRequest_Keep:
		uid := p.Keep.GetUid()
		if _, ok := s.serving[uid]; !ok {
			return fmt.Errorf("keep %q: workload unknown to this ztunnel", uid)
		}
		sess.seen[uid] = true
		return nil
	case *zds.WorkloadRequest_Del:
		s.noteAdd(sess, p.Del.GetUid(), nil) // no longer wanted: not pending either
		return s.del(p.Del.GetUid())
	case *zds.WorkloadRequest_SnapshotSent:
		if sess.snapshot {
			return errors.New("snapshot already sent on this connection")
		}
		sess.snapshot = true
		var errs []error
		for uid := range s.serving {
			if !sess.seen[uid] {
				s.log.Info("workload absent from node agent snapshot, releasing", "uid", uid)
				errs = append(errs, s.del(uid))
			}
		}
		for uid := range s.refused {
			if !sess.seen[uid] {
				delete(s.refused, uid)
			}
		}
		if len(s.refused) == 0 {
			s.handler.SnapshotDone()
		} else {
			s.log.Info("snapshot applied, but not ready until every pod is served", "refused", len(s.refused))
		}
		return errors.Join(errs...)
	case *zds.WorkloadRequest_Hello:
		return errors.New("duplicate Hello")
	default:
		return errors.New("empty or unknown request")
	}
}

// noteAdd keeps the set of refused pods of the current connection and
// completes the snapshot when the last one is served.
func (s *Server) noteAdd(sess *session, uid string, err error) {
	if err != nil {
		s.refused[uid] = true
		return
	}
	if !s.refused[uid] {
		return
	}
	delete(s.refused, uid)
	if sess.snapshot && len(s.refused) == 0 {
		s.log.Info("every pod of the snapshot is served now")
		s.handler.SnapshotDone()
	}
}

func (s *Server) add(sess *session, add *zds.AddWorkload, fd *os.File) error {
	uid := add.GetUid()
	if uid == "" {
		closeFile(fd)
		return errors.New("add: empty uid")
	}
	if fd == nil {
		return fmt.Errorf("add %q: no network namespace attached", uid)
	}
	if !isNetns(fd) {
		closeFile(fd)
		return fmt.Errorf("add %q: attached descriptor is not a network namespace", uid)
	}
	inode, err := netnsutil.Inode(fd)
	if err != nil {
		closeFile(fd)
		return err
	}
	info := infoFromProto(add)
	sess.seen[uid] = true
	if ref, ok := s.serving[uid]; ok {
		if ref.inode == inode && ref.info.Equal(info) {
			closeFile(fd) // already served: this is re-adoption
			return nil
		}
		if ref.inode == inode {
			// Same namespace, new facts (e.g. the node agent restarted with
			// another --preserve-source): the handler re-adopts it.
			if err := s.handler.AddWorkload(uid, info, fd); err != nil {
				closeFile(fd)
				return fmt.Errorf("re-add %q (%s): %w", uid, info, err)
			}
			s.serving[uid] = workloadRef{info: info, inode: inode}
			return nil
		}
		s.log.Info("workload namespace changed, replacing", "uid", uid, "pod", info)
		if err := s.del(uid); err != nil {
			closeFile(fd)
			return err
		}
	}
	if err := s.handler.AddWorkload(uid, info, fd); err != nil {
		closeFile(fd)
		return fmt.Errorf("add %q (%s): %w", uid, info, err)
	}
	s.serving[uid] = workloadRef{info: info, inode: inode}
	s.log.Info("workload added", "uid", uid, "pod", info)
	return nil
}

func (s *Server) del(uid string) error {
	if _, ok := s.serving[uid]; !ok {
		return nil // already gone: deletes are idempotent
	}
	delete(s.serving, uid)
	if err := s.handler.DelWorkload(uid); err != nil {
		return fmt.Errorf("del %q: %w", uid, err)
	}
	s.log.Info("workload removed", "uid", uid)
	return nil
}

func closeFile(f *os.File) {
	if f != nil {
		f.Close()
	}
}

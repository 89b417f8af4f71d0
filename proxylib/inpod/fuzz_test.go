package inpod_test

import (
	"context"
	"errors"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"google.golang.org/protobuf/proto"

	"github.com/ambientmesh/ambient/proxylib/inpod"
	"github.com/ambientmesh/ambient/proxylib/inpod/zds"
)

// recorder is a ztunnel that serves nothing: it keeps the uids it was
// given and closes each namespace at once (so descriptors can be counted).
type recorder struct {
	mu   sync.Mutex
	uids map[string]bool
}

func (r *recorder) AddWorkload(uid string, _ inpod.WorkloadInfo, ns *os.File) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	ns.Close()
	r.uids[uid] = true
	return nil
}

func (r *recorder) DelWorkload(uid string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.uids[uid] {
		return errors.New("del of a workload never added")
	}
	delete(r.uids, uid)
	return nil
}

func (r *recorder) SnapshotDone() {}

func (r *recorder) held() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Sorted(maps.Keys(r.uids))
}

// fuzzAttach says what goes with a packet (flags byte of a message).
const (
	attachNetns   = 1 << 0 // this process's network namespace
	attachRegular = 1 << 1 // a regular file
)

// splitPackets cuts data into (flags, payload) messages: [len][flags][len bytes]...
func splitPackets(data []byte) (flags []byte, payloads [][]byte) {
	for len(data) >= 2 && len(payloads) < 16 {
		n := min(int(data[0]), len(data)-2)
		flags = append(flags, data[1])
		payloads = append(payloads, data[2:2+n])
		data = data[2+n:]
	}
	return flags, payloads
}

func openFDs(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

func packet(flags byte, payload []byte) []byte {
	return append([]byte{byte(len(payload)), flags}, payload...)
}

// FuzzServerMessages sends arbitrary ZDS packets, with or without a
// namespace or another descriptor attached, to a real server over a real
// SOCK_SEQPACKET socket. The server must answer each with an Ack or drop
// the connection, accept an Add only with a namespace and a uid, keep its
// view of the served pods equal to what it told the proxy, and close every
// descriptor it does not hand over (a hostile node agent cannot leak them).
func FuzzServerMessages(f *testing.F) {
	req := func(m *zds.WorkloadRequest) []byte { b, _ := proto.Marshal(m); return b }
	hello := req(&zds.WorkloadRequest{Payload: &zds.WorkloadRequest_Hello{Hello: &zds.Hello{Version: zds.Version_V1}}})
	add := req(&zds.WorkloadRequest{Payload: &zds.WorkloadRequest_Add{Add: &zds.AddWorkload{Uid: "u1",
		WorkloadInfo: &zds.WorkloadInfo{Name: "p", Namespace: "n", ServiceAccount: "sa"}, DnsNameservers: []string{"10.0.0.1:53"}}}})
	keep := req(&zds.WorkloadRequest{Payload: &zds.WorkloadRequest_Keep{Keep: &zds.KeepWorkload{Uid: "u1"}}})
	del := req(&zds.WorkloadRequest{Payload: &zds.WorkloadRequest_Del{Del: &zds.DelWorkload{Uid: "u1"}}})
	snap := req(&zds.WorkloadRequest{Payload: &zds.WorkloadRequest_SnapshotSent{SnapshotSent: &zds.SnapshotSent{}}})
	join := func(ps ...[]byte) []byte { return slices.Concat(ps...) }
	f.Add(join(packet(0, hello), packet(attachNetns, add), packet(0, keep), packet(0, snap), packet(0, del)))
	f.Add(join(packet(0, hello), packet(attachRegular, add), packet(attachNetns|attachRegular, add)))
	f.Add(join(packet(attachNetns, hello), packet(0, add)))
	f.Add(join(packet(0, hello), packet(attachNetns, keep), packet(0, hello), packet(0, []byte{0xff, 0x01})))
	f.Add(join(packet(0, add), packet(0, hello)))
	f.Add(join(packet(0, hello), packet(attachNetns, add), packet(attachNetns, add), packet(0, snap), packet(0, snap)))

	sock := filepath.Join(f.TempDir(), "z.sock")
	rec := &recorder{uids: map[string]bool{}}
	srv := inpod.NewServer(sock, rec, logr.Discard())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.ListenAndServe(ctx) }()
	f.Cleanup(func() { cancel(); <-done })
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, err := os.Stat(sock); err == nil {
			break
		} else if time.Now().After(deadline) {
			f.Fatal("server socket:", err)
		}
	}
	netnsFile, err := os.Open("/proc/self/ns/net")
	if err != nil {
		f.Skip("no network namespace file:", err)
	}
	regular, err := os.Open("/proc/self/stat")
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		base := openFDs(t)
		flags, payloads := splitPackets(data)
		c := raw(t, sock)
		for i, p := range payloads {
			var fds []int
			if flags[i]&attachNetns != 0 {
				fds = append(fds, int(netnsFile.Fd()))
			}
			if flags[i]&attachRegular != 0 {
				fds = append(fds, int(regular.Fd()))
			}
			var m zds.WorkloadRequest
			decodes := proto.Unmarshal(p, &m) == nil
			ackErr, err := exchange(t, c, p, fds...)
			if err != nil {
				break // dropped: allowed for any refusal
			}
			if ackErr != "" {
				continue
			}
			switch {
			case !decodes:
				t.Fatalf("packet %d (%x) does not decode but was accepted", i, p)
			case m.GetAdd() != nil && (m.GetAdd().GetUid() == "" || len(fds) != 1 || flags[i]&attachNetns == 0):
				t.Fatalf("packet %d: add %v with fds %v accepted", i, m.GetAdd(), fds)
			case m.GetAdd() == nil && len(fds) > 0:
				t.Fatalf("packet %d: %v with fds %v accepted", i, &m, fds)
			case m.GetDel() != nil:
				if _, ok := srv.Workloads()[m.GetDel().GetUid()]; ok {
					t.Fatalf("packet %d: del %q acknowledged but still served", i, m.GetDel().GetUid())
				}
			}
		}
		c.Close()
		if got, want := slices.Sorted(maps.Keys(srv.Workloads())), rec.held(); !slices.Equal(got, want) {
			t.Fatalf("server serves %v, the proxy holds %v", got, want)
		}
		// The server's connection goroutine ends after our close.
		deadline := time.Now().Add(2 * time.Second)
		for openFDs(t) > base {
			if time.Now().After(deadline) {
				t.Fatalf("%d descriptors open, %d before: the server leaked what it received", openFDs(t), base)
			}
			time.Sleep(5 * time.Millisecond)
		}
	})
}

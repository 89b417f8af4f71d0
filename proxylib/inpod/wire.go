// Package inpod is the node agent ↔ ztunnel protocol (modelled on Istio's
// ZDS) and ztunnel's side of in-pod capture: the node agent hands each
// captured pod's network namespace to ztunnel as a file descriptor over a
// unix SOCK_SEQPACKET socket; ztunnel opens its listeners inside it.
//
// Node agent: Syncer (keeps the desired set, re-sends it after reconnects).
// ztunnel: Server calling a WorkloadHandler, plus OpenListeners/DialFromPod.
package inpod

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	"github.com/ambientmesh/ambient/proxylib/inpod/zds"
	"github.com/ambientmesh/ambient/proxylib/netnsutil"
)

// DefaultSocketPath is where ztunnel listens (docs/interfaces.md).
const DefaultSocketPath = "/var/run/ambient/ztunnel.sock"

// maxMessage bounds one packet; real messages are a few hundred bytes.
const maxMessage = 16 << 10

// WorkloadInfo names the pod a namespace belongs to, and what the node
// agent installed in it.
type WorkloadInfo struct {
	Name, Namespace, ServiceAccount string
	// PreserveSource (AddWorkload.preserve_source) says the pod's namespace
	// has the return-path rules for transparent dials from client addresses.
	PreserveSource bool
	// CaptureDNS (AddWorkload.capture_dns) says the pod's DNS is redirected
	// to 127.0.0.1:15053, where ztunnel serves its DNS proxy.
	CaptureDNS bool
	// DNSNameservers (host:port) are the pod's own resolvers, where the DNS
	// proxy forwards what it does not answer; empty: ztunnel's defaults.
	DNSNameservers []string
	// InboundTPROXY (AddWorkload.inbound_tproxy) says inbound TCP reaches
	// :15006 by TPROXY, not NAT: the original destination is the accepted
	// socket's local address and no NAT entry holds the client's tuple.
	InboundTPROXY bool
}

// Equal reports whether w and o say the same.
func (w WorkloadInfo) Equal(o WorkloadInfo) bool {
	return w.Name == o.Name && w.Namespace == o.Namespace && w.ServiceAccount == o.ServiceAccount &&
		w.PreserveSource == o.PreserveSource && w.CaptureDNS == o.CaptureDNS && w.InboundTPROXY == o.InboundTPROXY && slices.Equal(w.DNSNameservers, o.DNSNameservers)
}

func (w WorkloadInfo) String() string { return w.Namespace + "/" + w.Name }

func infoFromProto(add *zds.AddWorkload) WorkloadInfo {
	p := add.GetWorkloadInfo()
	return WorkloadInfo{Name: p.GetName(), Namespace: p.GetNamespace(), ServiceAccount: p.GetServiceAccount(),
		PreserveSource: add.GetPreserveSource(), CaptureDNS: add.GetCaptureDns(), DNSNameservers: add.GetDnsNameservers(),
		InboundTPROXY: add.GetInboundTproxy()}
}

func (w WorkloadInfo) addProto(uid string) *zds.AddWorkload {
	return &zds.AddWorkload{Uid: uid, PreserveSource: w.PreserveSource, CaptureDns: w.CaptureDNS, DnsNameservers: w.DNSNameservers,
		InboundTproxy: w.InboundTPROXY,
		WorkloadInfo:  &zds.WorkloadInfo{Name: w.Name, Namespace: w.Namespace, ServiceAccount: w.ServiceAccount}}
}

// send writes one message, with fd attached when non-nil.
func send(c *net.UnixConn, m proto.Message, fd *os.File) error {
	b, err := proto.Marshal(m)
	if err != nil {
		return err
	}
	if len(b) > maxMessage {
		return fmt.Errorf("inpod: message of %d bytes exceeds %d", len(b), maxMessage)
	}
	var oob []byte
	if fd != nil {
		oob = unix.UnixRights(int(fd.Fd()))
	}
	n, oobn, err := c.WriteMsgUnix(b, oob, nil)
	if err != nil {
		return err
	}
	if n != len(b) || oobn != len(oob) {
		return fmt.Errorf("inpod: short write (%d/%d bytes, %d/%d oob)", n, len(b), oobn, len(oob))
	}
	return nil
}

// recv reads one message and at most one attached fd. Extra descriptors,
// truncated packets and undecodable payloads are errors; any received
// descriptor is closed on error so a hostile peer cannot leak them.
func recv(c *net.UnixConn, m proto.Message) (*os.File, error) {
	buf := make([]byte, maxMessage+1)
	oob := make([]byte, unix.CmsgSpace(4*4)) // room to detect (and close) extra fds
	n, oobn, flags, _, err := c.ReadMsgUnix(buf, oob)
	if errors.Is(err, io.EOF) {
		return nil, errEOF
	}
	if err != nil {
		return nil, err
	}
	if n == 0 && oobn == 0 {
		return nil, errEOF
	}
	fds, ferr := parseRights(oob[:oobn])
	closeAll := func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}
	switch {
	case ferr != nil:
		closeAll()
		return nil, ferr
	case flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 || n > maxMessage:
		closeAll()
		return nil, errors.New("inpod: truncated message")
	case len(fds) > 1:
		closeAll()
		return nil, fmt.Errorf("inpod: %d file descriptors in one message, want at most 1", len(fds))
	}
	if err := proto.Unmarshal(buf[:n], m); err != nil {
		closeAll()
		return nil, fmt.Errorf("inpod: decode: %w", err)
	}
	if len(fds) == 1 {
		return os.NewFile(uintptr(fds[0]), "netns"), nil
	}
	return nil, nil
}

var errEOF = errors.New("inpod: peer closed the connection")

func parseRights(oob []byte) ([]int, error) {
	if len(oob) == 0 {
		return nil, nil
	}
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("inpod: control message: %w", err)
	}
	var fds []int
	for _, m := range msgs {
		if m.Header.Level != unix.SOL_SOCKET || m.Header.Type != unix.SCM_RIGHTS {
			continue
		}
		r, err := unix.ParseUnixRights(&m)
		if err != nil {
			return fds, err
		}
		fds = append(fds, r...)
	}
	return fds, nil
}

func isNetns(f *os.File) bool { return netnsutil.IsNetNS(f) }

package nodeagent

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"

	"github.com/ambientmesh/ambient/proxylib/dnsproxy"
	"github.com/ambientmesh/ambient/proxylib/netnsutil"
)

// Resolver finds a pod's network namespace. Order:
//  1. the record the CNI plugin left at sandbox creation (exact: the
//     runtime told us the path);
//  2. a process whose cgroup path names the pod UID (kubelet puts every
//     container of the pod, including the pause sandbox, under
//     .../pod<uid>/...; the lowest PID is the sandbox);
//  3. a non-host namespace of some process that holds exactly the pod's IPs
//     (pods started before any cgroup-naming scheme we know).
//
// A namespace from 2 or 3 must also hold the pod IP when it is known, so a
// stale record or a reused PID never captures the wrong pod.
type Resolver struct {
	Store    *Store
	ProcRoot string // "/proc"
}

var errNoNetns = errors.New("pod network namespace not found (sandbox not running yet?)")

// Resolve returns an open namespace file for the pod.
func (r *Resolver) Resolve(pod *corev1.Pod) (*os.File, error) {
	ips := podIPs(pod)
	if rec, ok := r.Store.Get(string(pod.UID)); ok {
		if f, err := openNetns(rec.Netns); err == nil {
			if len(ips) == 0 || hasIPs(f, ips) {
				return f, nil
			}
			f.Close()
		}
	}
	host, err := netnsutil.Open(filepath.Join(r.ProcRoot, "self/ns/net"))
	if err != nil {
		return nil, err
	}
	hostIno, _ := netnsutil.Inode(host)
	host.Close()
	pids := r.pids()
	uid := string(pod.UID)
	for _, pid := range pids {
		if uid == "" || !cgroupMentions(filepath.Join(r.ProcRoot, strconv.Itoa(pid), "cgroup"), uid) {
			continue
		}
		f, err := openNetns(filepath.Join(r.ProcRoot, strconv.Itoa(pid), "ns/net"))
		if err != nil {
			continue
		}
		if ino, _ := netnsutil.Inode(f); ino != hostIno && (len(ips) == 0 || hasIPs(f, ips)) {
			return f, nil
		}
		f.Close()
	}
	if len(ips) == 0 {
		return nil, errNoNetns
	}
	seen := map[uint64]bool{hostIno: true}
	for _, pid := range pids {
		f, err := openNetns(filepath.Join(r.ProcRoot, strconv.Itoa(pid), "ns/net"))
		if err != nil {
			continue
		}
		ino, _ := netnsutil.Inode(f)
		if !seen[ino] {
			seen[ino] = true
			if hasIPs(f, ips) {
				return f, nil
			}
		}
		f.Close()
	}
	return nil, errNoNetns
}

func (r *Resolver) pids() []int {
	entries, _ := os.ReadDir(r.ProcRoot)
	var pids []int
	for _, e := range entries {
		if pid, err := strconv.Atoi(e.Name()); err == nil {
			pids = append(pids, pid)
		}
	}
	slices.Sort(pids)
	return pids
}

// cgroupMentions matches both cgroupfs (pod<uid>) and systemd
// (pod<uid with underscores>.slice) spellings.
func cgroupMentions(path, uid string) bool {
	b, err := os.ReadFile(path)
	if err != nil {
		return false
	}
	s := string(b)
	return strings.Contains(s, "pod"+uid) || strings.Contains(s, "pod"+strings.ReplaceAll(uid, "-", "_"))
}

func openNetns(path string) (*os.File, error) {
	f, err := netnsutil.Open(path)
	if err != nil {
		return nil, err
	}
	if !netnsutil.IsNetNS(f) {
		f.Close()
		return nil, fmt.Errorf("%s is not a network namespace", path)
	}
	return f, nil
}

func podIPs(pod *corev1.Pod) []netip.Addr {
	var out []netip.Addr
	for _, ip := range pod.Status.PodIPs {
		if a, err := netip.ParseAddr(ip.IP); err == nil {
			out = append(out, a)
		}
	}
	if len(out) == 0 && pod.Status.PodIP != "" {
		if a, err := netip.ParseAddr(pod.Status.PodIP); err == nil {
			out = append(out, a)
		}
	}
	return out
}

// hasIPs reports whether every ip is assigned inside namespace f.
func hasIPs(f *os.File, ips []netip.Addr) bool {
	var addrs []net.Addr
	if err := netnsutil.Run(f, func() (err error) { addrs, err = net.InterfaceAddrs(); return err }); err != nil {
		return false
	}
	have := map[netip.Addr]bool{}
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil {
			have[p.Addr().Unmap()] = true
		}
	}
	for _, ip := range ips {
		if !have[ip.Unmap()] {
			return false
		}
	}
	return true
}

// Record is what the CNI plugin told the agent about a sandbox.
type Record struct {
	UID          string `json:"uid"`
	ContainerID  string `json:"containerID"`
	Netns        string `json:"netns"`
	PodName      string `json:"podName"`
	PodNamespace string `json:"podNamespace"`
}

// Store keeps CNI records as files (one per pod UID) so that a restarted
// agent still knows the namespaces of the pods it captured.
type Store struct{ Dir string }

func (s *Store) path(uid string) (string, error) {
	if uid == "" || strings.ContainsAny(uid, "/\\") || uid == "." || uid == ".." {
		return "", fmt.Errorf("invalid pod uid %q", uid)
	}
	return filepath.Join(s.Dir, uid+".json"), nil
}

// Put writes a record atomically.
func (s *Store) Put(r Record) error {
	p, err := s.path(r.UID)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(s.Dir, 0o700); err != nil {
		return err
	}
	b, _ := json.Marshal(r)
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, p)
}

// Get reads a record.
func (s *Store) Get(uid string) (Record, bool) {
	p, err := s.path(uid)
	if err != nil {
		return Record{}, false
	}
	b, err := os.ReadFile(p)
	if err != nil {
		return Record{}, false
	}
	var r Record
	if json.Unmarshal(b, &r) != nil {
		return Record{}, false
	}
	return r, true
}

// ByContainer finds the record of a sandbox (CNI DEL only knows the container).
func (s *Store) ByContainer(id string) (Record, bool) {
	entries, _ := os.ReadDir(s.Dir)
	for _, e := range entries {
		if uid, ok := strings.CutSuffix(e.Name(), ".json"); ok {
			if r, ok := s.Get(uid); ok && r.ContainerID == id {
				return r, true
			}
		}
	}
	return Record{}, false
}

// Delete removes a record.
func (s *Store) Delete(uid string) {
	if p, err := s.path(uid); err == nil {
		_ = os.Remove(p)
	}
}

// nsAddrs lists the global unicast addresses inside a namespace (the pod's IPs).
func nsAddrs(f *os.File) []netip.Addr {
	var addrs []net.Addr
	if err := netnsutil.Run(f, func() (err error) { addrs, err = net.InterfaceAddrs(); return err }); err != nil {
		return nil
	}
	var out []netip.Addr
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil && p.Addr().IsGlobalUnicast() {
			out = append(out, p.Addr().Unmap())
		}
	}
	return out
}

// podNameservers reads the resolvers (host:port) of a process whose network
// namespace is ns, from its root's /etc/resolv.conf under procRoot; nil
// when no process there has one.
func podNameservers(procRoot string, ns *os.File) []string {
	want, err := netnsutil.Inode(ns)
	if err != nil {
		return nil
	}
	entries, _ := os.ReadDir(procRoot)
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		f, err := netnsutil.Open(filepath.Join(procRoot, e.Name(), "ns/net"))
		if err != nil {
			continue
		}
		ino, err := netnsutil.Inode(f)
		f.Close()
		if err != nil || ino != want {
			continue
		}
		if ns, err := dnsproxy.ResolvConf(filepath.Join(procRoot, e.Name(), "root/etc/resolv.conf")); err == nil && len(ns) > 0 {
			return ns
		}
	}
	return nil
}

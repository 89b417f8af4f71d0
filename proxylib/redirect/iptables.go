package redirect

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"

	"github.com/ambientmesh/ambient/proxylib/netnsutil"
)

// IPTables implements Redirector with the iptables/ip6tables binaries
// (whichever variant the host has), for nodes where nftables is not
// wanted. Rules live in two nat chains, AMBIENT_OUTPUT and
// AMBIENT_PREROUTING, jumped to from OUTPUT and PREROUTING, with the same
// semantics as the nftables backend; with PreserveSource also two mangle
// chains, AMBIENT_MANGLE_PRE and AMBIENT_MANGLE_OUT, for the connmark.
type IPTables struct{ cfg Config }

// NewIPTables returns the iptables backend.
func NewIPTables(cfg Config) *IPTables { return &IPTables{cfg: cfg} }

var _ Redirector = (*IPTables)(nil)

const (
	iptOutput     = "AMBIENT_OUTPUT"     // nat
	iptPrerouting = "AMBIENT_PREROUTING" // nat
	iptManglePre  = "AMBIENT_MANGLE_PRE" // mangle, source preservation
	iptMangleOut  = "AMBIENT_MANGLE_OUT" // mangle, source preservation
)

type family struct {
	save, restore, cmd string
	v6                 bool
}

var families = []family{
	{"iptables-save", "iptables-restore", "iptables", false},
	{"ip6tables-save", "ip6tables-restore", "ip6tables", true},
}

// run executes a binary inside ns: a child forked from the switched thread
// inherits its network namespace.
func run(ns *os.File, stdin string, name string, args ...string) (string, error) {
	var out bytes.Buffer
	err := netnsutil.Run(ns, func() error {
		cmd := exec.Command(name, args...)
		cmd.Stdin = strings.NewReader(stdin)
		cmd.Stdout, cmd.Stderr = &out, &out
		return cmd.Run()
	})
	if err != nil {
		return out.String(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(out.String()))
	}
	return out.String(), nil
}

func (t *IPTables) rules(f family) string {
	var b strings.Builder
	mark := fmt.Sprintf("-m mark --mark %#x/%#x -j RETURN", t.cfg.Mark&t.cfg.MarkMask, t.cfg.MarkMask)
	// Declaring a chain in --noflush mode creates or empties it.
	fmt.Fprintf(&b, "*nat\n:%s - [0:0]\n:%s - [0:0]\n", iptOutput, iptPrerouting)
	fmt.Fprintf(&b, "-A %s %s\n", iptOutput, mark)
	for _, uid := range t.cfg.SkipOwnerUIDs {
		fmt.Fprintf(&b, "-A %s -m owner --uid-owner %d -j RETURN\n", iptOutput, uid)
	}
	fmt.Fprintf(&b, "-A %s -o lo -j RETURN\n", iptOutput)
	for _, port := range t.cfg.SkipOutboundPorts {
		fmt.Fprintf(&b, "-A %s -p tcp --dport %d -j RETURN\n", iptOutput, port)
		if t.cfg.DNSPort != 0 {
			fmt.Fprintf(&b, "-A %s -p udp --dport %d -j RETURN\n", iptOutput, port)
		}
	}
	for _, p := range t.cfg.SkipOutboundDestinations {
		if p.Addr().Is6() == f.v6 {
			fmt.Fprintf(&b, "-A %s -d %s -j RETURN\n", iptOutput, p.Masked())
		}
	}
	if t.cfg.DNSPort != 0 {
		fmt.Fprintf(&b, "-A %s -p udp --dport 53 -j REDIRECT --to-ports %d\n", iptOutput, t.cfg.DNSPort)
		fmt.Fprintf(&b, "-A %s -p tcp --dport 53 -j REDIRECT --to-ports %d\n", iptOutput, t.cfg.DNSPort)
	}
	fmt.Fprintf(&b, "-A %s -p tcp -j REDIRECT --to-ports %d\n", iptOutput, t.cfg.OutboundPort)
	fmt.Fprintf(&b, "-A %s %s\n-A %s -i lo -j RETURN\n", iptPrerouting, mark, iptPrerouting)
	for _, p := range t.cfg.SkipInboundSources {
		if p.Addr().Is6() == f.v6 {
			fmt.Fprintf(&b, "-A %s -s %s -j RETURN\n", iptPrerouting, p.Masked())
		}
	}
	for _, port := range t.cfg.SkipInboundPorts {
		fmt.Fprintf(&b, "-A %s -p tcp --dport %d -j RETURN\n", iptPrerouting, port)
	}
	fmt.Fprintf(&b, "-A %s -p tcp -j REDIRECT --to-ports %d\nCOMMIT\n", iptPrerouting, t.cfg.InboundPort)
	if t.cfg.PreserveSource {
		// The same connmark as the nftables backend (sourcepreserve.go).
		fmt.Fprintf(&b, "*mangle\n:%s - [0:0]\n:%s - [0:0]\n", iptManglePre, iptMangleOut)
		fmt.Fprintf(&b, "-A %s -m mark --mark %#x/%#x -j CONNMARK --set-xmark %#x/%#x\n",
			iptManglePre, t.cfg.Mark&t.cfg.MarkMask, t.cfg.MarkMask, ConnMark, t.cfg.MarkMask)
		fmt.Fprintf(&b, "-A %s -m connmark --mark %#x/%#x -j MARK --set-xmark %#x/%#x\nCOMMIT\n",
			iptMangleOut, ConnMark, t.cfg.MarkMask, ConnMark, t.cfg.MarkMask)
	}
	return b.String()
}

func (t *IPTables) expectedRuleCount(f family) int {
	return strings.Count(t.rules(f), "\n-A ")
}

// PreservesSource reports whether Install sets up source preservation.
func (t *IPTables) PreservesSource() bool { return t.cfg.PreserveSource }

// InboundTPROXY reports the configured mode; Install refuses TPROXY.
func (t *IPTables) InboundTPROXY() bool { return t.cfg.InboundTPROXY }

// jump is a rule in a built-in chain sending packets to one of ours.
type jump struct{ table, from, to string }

var (
	natJumps    = []jump{{"nat", "OUTPUT", iptOutput}, {"nat", "PREROUTING", iptPrerouting}}
	mangleJumps = []jump{{"mangle", "PREROUTING", iptManglePre}, {"mangle", "OUTPUT", iptMangleOut}}
)

func (t *IPTables) jumps() []jump {
	if t.cfg.PreserveSource {
		return append(append([]jump{}, natJumps...), mangleJumps...)
	}
	return natJumps
}

// Install writes both families' chains (replacing their contents) and adds
// the jumps once. Without PreserveSource it removes the mangle chains and
// return path an earlier install may have left, so the rules always match
// the configuration.
func (t *IPTables) Install(ns *os.File) error {
	if t.cfg.InboundTPROXY {
		// Only the nftables backend implements TPROXY capture so far.
		return errors.New("redirect: iptables backend does not support InboundTPROXY; use nftables")
	}
	for _, f := range families {
		if _, err := run(ns, t.rules(f), f.restore, "--noflush"); err != nil {
			return err
		}
		for _, j := range t.jumps() {
			if _, err := run(ns, "", f.cmd, "-t", j.table, "-C", j.from, "-j", j.to); err == nil {
				continue
			}
			if _, err := run(ns, "", f.cmd, "-t", j.table, "-I", j.from, "1", "-j", j.to); err != nil {
				return err
			}
		}
		if !t.cfg.PreserveSource {
			if err := removeJumps(ns, f, mangleJumps); err != nil {
				return err
			}
		}
	}
	return setLocalRouting(ns, t.cfg.MarkMask, t.cfg.PreserveSource)
}

// removeJumps deletes the jumps and then their target chains; absent ones
// are fine.
func removeJumps(ns *os.File, f family, js []jump) error {
	for _, j := range js {
		for i := 0; i < 10; i++ { // every copy, should someone have added more
			if _, err := run(ns, "", f.cmd, "-t", j.table, "-D", j.from, "-j", j.to); err != nil {
				break
			}
		}
	}
	for _, j := range js {
		if _, err := run(ns, "", f.cmd, "-t", j.table, "-S", j.to); err != nil {
			continue // chain absent
		}
		if _, err := run(ns, "", f.cmd, "-t", j.table, "-F", j.to); err != nil {
			return err
		}
		if _, err := run(ns, "", f.cmd, "-t", j.table, "-X", j.to); err != nil {
			return err
		}
	}
	return nil
}

// Remove deletes the jumps, the chains and the return path; absent ones
// are fine.
func (t *IPTables) Remove(ns *os.File) error {
	for _, f := range families {
		if err := removeJumps(ns, f, append(append([]jump{}, natJumps...), mangleJumps...)); err != nil {
			return err
		}
	}
	// Always: a previous install may have preserved sources.
	return setLocalRouting(ns, t.cfg.MarkMask, false)
}

// Installed checks jumps and rule counts in both families, and the return
// path when preserving sources.
func (t *IPTables) Installed(ns *os.File) (bool, error) {
	if t.cfg.InboundTPROXY {
		// Rules this backend could install are never the TPROXY ones asked
		// for: a re-adopted pod must go through Install, which refuses,
		// rather than keep its NAT rules under a TPROXY announcement.
		return false, nil
	}
	for _, f := range families {
		n := 0
		for _, j := range t.jumps() {
			if _, err := run(ns, "", f.cmd, "-t", j.table, "-C", j.from, "-j", j.to); err != nil {
				return false, nil
			}
			out, err := run(ns, "", f.cmd, "-t", j.table, "-S", j.to)
			if err != nil {
				return false, nil
			}
			n += strings.Count(out, "-A "+j.to+" ")
		}
		if n != t.expectedRuleCount(f) {
			return false, nil
		}
	}
	if t.cfg.PreserveSource {
		return HasSourceRouting(ns)
	}
	return true, nil
}

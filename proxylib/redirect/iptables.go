package redirect

import (
	"bytes"
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
// semantics as the nftables backend.
type IPTables struct{ cfg Config }

// NewIPTables returns the iptables backend.
func NewIPTables(cfg Config) *IPTables { return &IPTables{cfg: cfg} }

var _ Redirector = (*IPTables)(nil)

const (
	iptOutput     = "AMBIENT_OUTPUT"
	iptPrerouting = "AMBIENT_PREROUTING"
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
	fmt.Fprintf(&b, "-A %s %s\n-A %s -o lo -j RETURN\n-A %s -p tcp -j REDIRECT --to-ports %d\n",
		iptOutput, mark, iptOutput, iptOutput, t.cfg.OutboundPort)
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
	return b.String()
}

func (t *IPTables) expectedRuleCount(f family) int {
	return strings.Count(t.rules(f), "\n-A ")
}

var jumps = [][2]string{{"OUTPUT", iptOutput}, {"PREROUTING", iptPrerouting}}

// Install writes both families' chains (replacing their contents) and adds
// the jumps once.
func (t *IPTables) Install(ns *os.File) error {
	if t.cfg.PreserveSource {
		return fmt.Errorf("iptables backend: source preservation is only implemented with nftables")
	}
	for _, f := range families {
		if _, err := run(ns, t.rules(f), f.restore, "--noflush"); err != nil {
			return err
		}
		for _, j := range jumps {
			if _, err := run(ns, "", f.cmd, "-t", "nat", "-C", j[0], "-j", j[1]); err == nil {
				continue
			}
			if _, err := run(ns, "", f.cmd, "-t", "nat", "-I", j[0], "1", "-j", j[1]); err != nil {
				return err
			}
		}
	}
	return nil
}

// Remove deletes the jumps and the chains; absent ones are fine.
func (t *IPTables) Remove(ns *os.File) error {
	for _, f := range families {
		for _, j := range jumps {
			for i := 0; i < 10; i++ { // every copy, should someone have added more
				if _, err := run(ns, "", f.cmd, "-t", "nat", "-D", j[0], "-j", j[1]); err != nil {
					break
				}
			}
		}
		for _, c := range []string{iptOutput, iptPrerouting} {
			if _, err := run(ns, "", f.cmd, "-t", "nat", "-S", c); err != nil {
				continue // chain absent
			}
			if _, err := run(ns, "", f.cmd, "-t", "nat", "-F", c); err != nil {
				return err
			}
			if _, err := run(ns, "", f.cmd, "-t", "nat", "-X", c); err != nil {
				return err
			}
		}
	}
	return nil
}

// Installed checks jumps and rule counts in both families.
func (t *IPTables) Installed(ns *os.File) (bool, error) {
	for _, f := range families {
		for _, j := range jumps {
			if _, err := run(ns, "", f.cmd, "-t", "nat", "-C", j[0], "-j", j[1]); err != nil {
				return false, nil
			}
		}
		n := 0
		for _, c := range []string{iptOutput, iptPrerouting} {
			out, err := run(ns, "", f.cmd, "-t", "nat", "-S", c)
			if err != nil {
				return false, nil
			}
			n += strings.Count(out, "-A "+c+" ")
		}
		if n != t.expectedRuleCount(f) {
			return false, nil
		}
	}
	return true, nil
}

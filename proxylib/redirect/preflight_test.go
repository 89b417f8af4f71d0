package redirect_test

import (
	"strings"
	"testing"

	"github.com/google/nftables"

	"github.com/ambientmesh/ambient/proxylib/redirect"
	"github.com/ambientmesh/ambient/test/netns"
)

// Preflight tries each configuration's rules in a scratch namespace: what
// this kernel supports passes, and what a backend cannot install fails
// with the features named; the caller's namespace is not touched.
func TestPreflight(t *testing.T) {
	netns.RequireRoot(t)
	tproxy := redirect.DefaultConfig()
	tproxy.InboundTPROXY, tproxy.PreserveSource = true, true
	cases := []struct {
		name    string
		r       redirect.Redirector
		wantErr string // "" = passes
	}{
		{"nftables, NAT", redirect.NewNFTables(redirect.DefaultConfig()), ""},
		{"nftables, DNS capture", redirect.NewNFTables(redirect.DefaultConfig().WithDNS()), ""},
		{"nftables, TPROXY", redirect.NewNFTables(tproxy), ""},
		{"iptables, NAT", redirect.NewIPTables(redirect.DefaultConfig()), ""},
		{"iptables, TPROXY", redirect.NewIPTables(tproxy), "inbound TPROXY"},
	}
	for _, c := range cases {
		err := redirect.Preflight(c.r)
		switch {
		case c.wantErr == "" && err != nil:
			t.Errorf("%s: %v", c.name, err)
		case c.wantErr != "" && (err == nil || !strings.Contains(err.Error(), c.wantErr)):
			t.Errorf("%s: err %v, want one naming %q", c.name, err, c.wantErr)
		}
	}
	conn, err := nftables.New()
	if err != nil {
		t.Fatal(err)
	}
	tables, err := conn.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		t.Fatal(err)
	}
	for _, tb := range tables {
		if tb.Name == redirect.TableName {
			t.Errorf("preflight left table inet %s in the test's own namespace", redirect.TableName)
		}
	}
}

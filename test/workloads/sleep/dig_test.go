package main

import (
	"bytes"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/miekg/dns"
)

// digServer answers A web.ns.svc.cluster.local. and AAAA v6.example., SERVFAIL
// for fail.example. and NXDOMAIN for everything else, on UDP and TCP of
// one port; it records the names it was asked.
func digServer(t *testing.T) (addr string, asked *[]string) {
	t.Helper()
	var names []string
	h := dns.HandlerFunc(func(w dns.ResponseWriter, q *dns.Msg) {
		r := new(dns.Msg)
		r.SetReply(q)
		name := q.Question[0].Name
		names = append(names, w.LocalAddr().Network()+" "+name)
		switch name {
		case "web.ns.svc.cluster.local.":
			r.Answer = append(r.Answer, &dns.A{Hdr: dns.RR_Header{Name: name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 30}, A: net.ParseIP("10.96.0.5")})
		case "v6.example.":
			r.Answer = append(r.Answer, &dns.AAAA{Hdr: dns.RR_Header{Name: name, Rrtype: dns.TypeAAAA, Class: dns.ClassINET, Ttl: 30}, AAAA: net.ParseIP("2001:2::1")})
		case "big.example.":
			for i := 1; i <= 40; i++ {
				r.Answer = append(r.Answer, &dns.A{Hdr: dns.RR_Header{Name: name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 30}, A: net.IPv4(192, 0, 2, byte(i))})
			}
			if w.LocalAddr().Network() == "udp" {
				r.Truncate(dns.MinMsgSize)
			}
		case "fail.example.":
			r.Rcode = dns.RcodeServerFailure
		default:
			r.Rcode = dns.RcodeNameError
		}
		_ = w.WriteMsg(r)
	})
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", pc.LocalAddr().String())
	if err != nil {
		pc.Close()
		t.Skipf("TCP port of the UDP listener taken: %v", err)
	}
	udp, tcp := &dns.Server{PacketConn: pc, Handler: h}, &dns.Server{Listener: ln, Handler: h}
	go udp.ActivateAndServe()
	go tcp.ActivateAndServe()
	t.Cleanup(func() { _ = udp.Shutdown(); _ = tcp.Shutdown() })
	return pc.LocalAddr().String(), &names
}

func TestDigSearch(t *testing.T) {
	addr, asked := digServer(t)
	conf := filepath.Join(t.TempDir(), "resolv.conf")
	if err := os.WriteFile(conf, []byte("nameserver 127.0.0.1\nsearch ns.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cc, err := dns.ClientConfigFromFile(conf)
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name, net string
		qtype     uint16
		want      string
		asked     int // queries until the search ended
	}{
		{"web", "udp", dns.TypeA, "web.ns.svc.cluster.local. NOERROR 10.96.0.5", 1},
		{"web.ns", "tcp", dns.TypeA, "web.ns.svc.cluster.local. NOERROR 10.96.0.5", 2},
		{"v6.example.", "udp", dns.TypeAAAA, "v6.example. NOERROR 2001:2::1", 1},
		{"nope", "udp", dns.TypeA, "nope. NXDOMAIN -", 4},
	}
	for _, c := range cases {
		*asked = nil
		got, err := digSearch(&dns.Client{Net: c.net}, addr, cc.NameList(c.name), c.qtype)
		if err != nil || got != c.want || len(*asked) != c.asked {
			t.Errorf("%s over %s: %q, %v after %v; want %q after %d queries", c.name, c.net, got, err, *asked, c.want, c.asked)
		}
		for _, a := range *asked {
			if !strings.HasPrefix(a, c.net+" ") {
				t.Errorf("%s: asked %q, want over %s", c.name, a, c.net)
			}
		}
	}
	// A truncated UDP answer is asked again over TCP, as resolvers do.
	*asked = nil
	got, err := digSearch(&dns.Client{Net: "udp"}, addr, []string{"big.example."}, dns.TypeA)
	if n := len(strings.Split(strings.Fields(got + " x x")[2], ",")); err != nil || n != 40 || !slices.Equal(*asked, []string{"udp big.example.", "tcp big.example."}) {
		t.Errorf("big.example.: %d addresses (%q, %v) after %v; want 40 after udp then tcp", n, got, err, *asked)
	}
	// SERVFAIL ends the search: it is not "no such name".
	got, err = digSearch(&dns.Client{Net: "udp"}, addr, []string{"fail.example.", "other.example."}, dns.TypeA)
	if want := "fail.example. SERVFAIL -"; err != nil || got != want {
		t.Errorf("SERVFAIL: %q, %v; want %q", got, err, want)
	}
	// The command reads resolv.conf; no server there is an error, not an answer.
	var out, errOut bytes.Buffer
	if code := digMain([]string{"-resolv-conf", filepath.Join(t.TempDir(), "missing"), "web"}, &out, &errOut); code != 1 {
		t.Errorf("missing resolv.conf: exit %d (%s), want 1", code, errOut.String())
	}
	if code := digMain([]string{"-type", "MX", "web"}, &out, &errOut); code != exitUsage {
		t.Errorf("-type MX: exit %d, want %d", code, exitUsage)
	}
}

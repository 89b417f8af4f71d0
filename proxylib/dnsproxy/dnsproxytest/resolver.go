// Package dnsproxytest is a test resolver: a small authoritative DNS server
// (github.com/miekg/dns) on UDP and TCP of one port, with fixed zones that
// exercise a DNS proxy's forwarding (answers, NXDOMAIN, SERVFAIL, answers
// too large for a datagram), and a count of the queries it received.
package dnsproxytest

import (
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"

	"github.com/miekg/dns"
)

// Names the test resolver knows.
const (
	// External answers A ExternalIP (TTL ExternalTTL) and AAAA ExternalIPv6.
	External    = "external.example."
	ExternalTTL = 60
	// NX is NXDOMAIN with an SOA (negative TTL NegativeTTL).
	NX          = "nx.example."
	NegativeTTL = 30
	// Fail is SERVFAIL.
	Fail = "fail.example."
	// Big has BigCount A records: more than a 512-byte datagram holds.
	Big      = "big.example."
	BigCount = 60
)

var (
	ExternalIP   = netip.MustParseAddr("192.0.2.10")
	ExternalIPv6 = netip.MustParseAddr("2001:db8::10")
)

// Resolver is the running test resolver.
type Resolver struct {
	Addr netip.AddrPort // UDP and TCP

	mu      sync.Mutex
	queries map[string]int // "<proto> <lower name> <type>" -> count
	servers []*dns.Server
}

// Serve runs the resolver on pc and ln (same address: UDP and TCP) until t
// ends.
func Serve(t testing.TB, pc net.PacketConn, ln net.Listener) *Resolver {
	r := &Resolver{Addr: pc.LocalAddr().(*net.UDPAddr).AddrPort(), queries: map[string]int{}}
	for _, srv := range []*dns.Server{
		{PacketConn: pc, Handler: r.handler("udp")},
		{Listener: ln, Handler: r.handler("tcp")},
	} {
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		go srv.ActivateAndServe()
		<-started
		r.servers = append(r.servers, srv)
	}
	t.Cleanup(func() {
		for _, s := range r.servers {
			s.Shutdown()
		}
	})
	return r
}

// ServeLocal runs the resolver on 127.0.0.1 of this process's namespace.
// The UDP port the kernel picks may be taken for TCP by another test's
// connection, so a few ports are tried.
func ServeLocal(t testing.TB) *Resolver {
	var lastErr error
	for range 20 {
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ln, err := net.Listen("tcp", pc.LocalAddr().String())
		if err != nil {
			pc.Close()
			lastErr = err
			continue
		}
		return Serve(t, pc, ln)
	}
	t.Fatalf("no port free for both UDP and TCP: %v", lastErr)
	return nil
}

// Queries is how many queries for name (any case) and qtype came over proto
// ("udp", "tcp", or "" for both).
func (r *Resolver) Queries(proto, name string, qtype uint16) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, p := range []string{"udp", "tcp"} {
		if proto == "" || proto == p {
			n += r.queries[fmt.Sprintf("%s %s %d", p, strings.ToLower(name), qtype)]
		}
	}
	return n
}

// Total is the number of queries received.
func (r *Resolver) Total() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, c := range r.queries {
		n += c
	}
	return n
}

func soa() dns.RR {
	return &dns.SOA{Hdr: dns.RR_Header{Name: "example.", Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: NegativeTTL},
		Ns: "ns.example.", Mbox: "admin.example.", Serial: 1, Refresh: 60, Retry: 60, Expire: 600, Minttl: NegativeTTL}
}

func (r *Resolver) handler(proto string) dns.HandlerFunc {
	return func(w dns.ResponseWriter, req *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(req)
		m.Authoritative = true
		if len(req.Question) != 1 {
			m.Rcode = dns.RcodeFormatError
			w.WriteMsg(m)
			return
		}
		q := req.Question[0]
		r.mu.Lock()
		r.queries[fmt.Sprintf("%s %s %d", proto, strings.ToLower(q.Name), q.Qtype)]++
		r.mu.Unlock()
		hdr := dns.RR_Header{Name: q.Name, Rrtype: q.Qtype, Class: dns.ClassINET, Ttl: ExternalTTL}
		switch strings.ToLower(q.Name) {
		case External:
			switch q.Qtype {
			case dns.TypeA:
				m.Answer = append(m.Answer, &dns.A{Hdr: hdr, A: ExternalIP.AsSlice()})
			case dns.TypeAAAA:
				m.Answer = append(m.Answer, &dns.AAAA{Hdr: hdr, AAAA: ExternalIPv6.AsSlice()})
			default:
				m.Ns = append(m.Ns, soa())
			}
		case Big:
			for i := 0; i < BigCount; i++ {
				m.Answer = append(m.Answer, &dns.A{Hdr: hdr, A: net.IPv4(198, 51, 100, byte(i+1))})
			}
		case Fail:
			m.Rcode = dns.RcodeServerFailure
		default:
			m.Rcode = dns.RcodeNameError
			m.Ns = append(m.Ns, soa())
		}
		if proto == "udp" {
			size := dns.MinMsgSize
			if opt := req.IsEdns0(); opt != nil {
				size = max(size, int(opt.UDPSize()))
			}
			m.Truncate(size)
		}
		w.WriteMsg(m)
	}
}

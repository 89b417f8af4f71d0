package dnsproxy

import (
	"context"
	"errors"
	"net"
	"testing"

	"github.com/miekg/dns"
)

// FuzzDNSRequest feeds arbitrary bytes to the request path as the server
// does (unpack, then the handler over UDP or TCP): it must never panic,
// and whatever it answers must carry the query's id, pack, and fit a UDP
// client's buffer. Upstreams are unreachable (each dial fails at once), so
// forwarded queries end in the proxy's own SERVFAIL.
func FuzzDNSRequest(f *testing.F) {
	for _, q := range []struct {
		name  string
		qtype uint16
		edns  uint16
	}{
		{"echo.", dns.TypeA, 0},
		{"echo.default.svc.cluster.local.", dns.TypeAAAA, 1232},
		{"db.data.default.svc.cluster.local.", dns.TypeA, 4096},
		{"headless.default.svc.cluster.local.", dns.TypeA, 0},
		{"external.example.", dns.TypeMX, 0},
		{".", dns.TypeANY, 512},
	} {
		m := new(dns.Msg)
		m.SetQuestion(q.name, q.qtype)
		if q.edns > 0 {
			m.SetEdns0(q.edns, true)
		}
		b, err := m.Pack()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b, true)
		f.Add(b, false)
	}
	f.Add([]byte{0, 1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0}, true) // two questions, none present
	f.Add([]byte{}, true)
	p, err := New(Config{Services: testServices()})
	if err != nil {
		f.Fatal(err)
	}
	refuse := func(context.Context, string, string) (net.Conn, error) {
		return nil, errors.New("no upstream in fuzzing")
	}
	h := p.Handler(Client{Name: "fuzz", Namespace: "default", Upstreams: func() []string { return []string{"192.0.2.53:53"} }, Dial: refuse})
	f.Fuzz(func(t *testing.T, b []byte, udp bool) {
		req := new(dns.Msg)
		if err := req.Unpack(b); err != nil {
			return // the server answers FORMERR or drops it before the handler
		}
		if req.Response {
			return // dns.DefaultMsgAcceptFunc ignores responses
		}
		w := &recorder{udp: udp}
		h.ServeDNS(w, req)
		if w.msg == nil {
			t.Fatal("no answer")
		}
		if w.msg.Id != req.Id || !w.msg.Response {
			t.Fatalf("answer id %d response=%t, query id %d", w.msg.Id, w.msg.Response, req.Id)
		}
		if udp {
			size := dns.MinMsgSize
			if opt := req.IsEdns0(); opt != nil {
				size = max(size, int(opt.UDPSize()))
			}
			if l := w.wire; l > size {
				t.Fatalf("UDP answer of %d bytes, client buffer %d", l, size)
			}
		}
	})
}

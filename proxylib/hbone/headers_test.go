package hbone_test

import (
	"errors"
	"net/netip"
	"testing"

	"github.com/ambientmesh/ambient/proxylib/hbone"
)

func TestParseForwardedFor(t *testing.T) {
	tests := []struct {
		in   string
		want string // "" means rejected
	}{
		{`for="10.0.0.1"`, "10.0.0.1"},
		{`for=10.0.0.1`, "10.0.0.1"},
		{`For="10.0.0.1:4711"`, "10.0.0.1"},
		{`for="[fd00::1]"`, "fd00::1"},
		{`for="[fd00::1]:80"`, "fd00::1"},
		{`proto=https;for="10.0.0.2", for=10.0.0.3`, "10.0.0.2"},
		{`for=unknown`, ""},
		{`for="_hidden"`, ""},
		{`for=example.com`, ""},
		{`for="[fd00::1"`, ""},
		{`for="[10.0.0.1]"`, ""},
		{`for="fd00::1"`, ""},
		{`for="[fe80::1%eth0]"`, ""},
		{`proto=http`, ""},
		{`garbage`, ""},
		{``, ""},
	}
	for _, tt := range tests {
		got, err := hbone.ParseForwardedFor(tt.in)
		if tt.want == "" {
			if !errors.Is(err, hbone.ErrBadForwarded) {
				t.Errorf("ParseForwardedFor(%q) = %v, %v; want ErrBadForwarded", tt.in, got, err)
			}
			continue
		}
		if err != nil || got.String() != tt.want {
			t.Errorf("ParseForwardedFor(%q) = %v, %v; want %s", tt.in, got, err, tt.want)
		}
	}
}

func TestParseBaggage(t *testing.T) {
	tests := []struct {
		in      string
		want    map[string]string
		wantErr bool
	}{
		{"k8s.namespace.name=default,k8s.pod.name=sleep-1", map[string]string{"k8s.namespace.name": "default", "k8s.pod.name": "sleep-1"}, false},
		{" a = b ; prop=1 , c=d%20e", map[string]string{"a": "b", "c": "d e"}, false},
		{"a=1,a=2", map[string]string{"a": "1"}, false},
		{"a=1,,", map[string]string{"a": "1"}, false},
		{"novalue", nil, true},
		{"=v", nil, true},
		{"a b=c", nil, true},
		{"a=%zz", nil, true},
	}
	for _, tt := range tests {
		got, err := hbone.ParseBaggage(tt.in)
		if tt.wantErr {
			if !errors.Is(err, hbone.ErrBadBaggage) {
				t.Errorf("ParseBaggage(%q) = %v, %v; want ErrBadBaggage", tt.in, got, err)
			}
			continue
		}
		if err != nil || len(got) != len(tt.want) {
			t.Errorf("ParseBaggage(%q) = %v, %v; want %v", tt.in, got, err, tt.want)
			continue
		}
		for k, v := range tt.want {
			if got[k] != v {
				t.Errorf("ParseBaggage(%q)[%q] = %q, want %q", tt.in, k, got[k], v)
			}
		}
	}
}

func TestSourceHeaderRoundTrip(t *testing.T) {
	for _, src := range []hbone.Source{
		{Addr: netip.MustParseAddr("10.1.2.3"), Cluster: "Kubernetes", Namespace: "ambient-demo", Pod: "sleep-5f9c", Workload: "sleep", Service: "sleep", ServiceVersion: "v1"},
		{Addr: netip.MustParseAddr("fd00::7"), Namespace: "a, b=c"},
		{Namespace: "only-baggage"},
	} {
		h := hbone.SourceHeader(src)
		got, err := hbone.ParseSource(h)
		if err != nil || got != src {
			t.Errorf("round trip of %+v via %v = %+v, %v", src, h, got, err)
		}
	}
	if h := hbone.SourceHeader(hbone.Source{Addr: netip.MustParseAddr("10.0.0.1")}); h.Get("Forwarded") != `for="10.0.0.1"` {
		t.Errorf("Forwarded = %q", h.Get("Forwarded"))
	}
}

func FuzzParseForwardedFor(f *testing.F) {
	for _, s := range []string{`for="10.0.0.1"`, `for="[fd00::1]:80"`, `proto=http;for=1.2.3.4, for=5.6.7.8`, `for=unknown`} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		addr, err := hbone.ParseForwardedFor(s)
		if err != nil {
			return
		}
		// Whatever is accepted is a plain IP that formats and re-parses to itself.
		if !addr.IsValid() || addr.Zone() != "" {
			t.Fatalf("accepted %q as %v", s, addr)
		}
		again, err := hbone.ParseForwardedFor(hbone.FormatForwarded(addr))
		if err != nil || again != addr.Unmap() {
			t.Fatalf("re-parse of %v: %v, %v", addr, again, err)
		}
	})
}

func FuzzParseBaggage(f *testing.F) {
	for _, s := range []string{"k8s.namespace.name=default,k8s.pod.name=p", "a=b;p=1", "a=%20", ",,", "=", "a=%zz"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		m, err := hbone.ParseBaggage(s)
		if err != nil {
			return
		}
		// Re-encoding what was accepted must decode to the same map.
		var pairs [][2]string
		for k, v := range m {
			pairs = append(pairs, [2]string{k, v})
		}
		again, err := hbone.ParseBaggage(hbone.FormatBaggage(pairs...))
		if err != nil {
			t.Fatalf("re-parse of %v: %v", m, err)
		}
		for k, v := range m {
			if v != "" && again[k] != v {
				t.Fatalf("key %q: %q != %q", k, again[k], v)
			}
		}
	})
}

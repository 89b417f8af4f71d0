package socks5

import (
	"bytes"
	"errors"
	"net/netip"
	"testing"
)

type rw struct {
	in  *bytes.Reader
	out bytes.Buffer
}

func (r *rw) Read(p []byte) (int, error)  { return r.in.Read(p) }
func (r *rw) Write(p []byte) (int, error) { return r.out.Write(p) }

func TestHandshake(t *testing.T) {
	greeting := []byte{5, 1, 0}
	resolver := func(h string) (netip.Addr, error) {
		if h == "httpbin" {
			return netip.MustParseAddr("10.96.0.10"), nil
		}
		return netip.Addr{}, errors.New("unknown")
	}
	cases := []struct {
		name    string
		in      []byte
		want    string
		code    byte // last reply code expected when failing (0xff: none)
		wantErr bool
	}{
		{"ipv4", append(greeting, 5, 1, 0, 1, 10, 0, 0, 5, 0, 80), "10.0.0.5:80", 0xff, false},
		{"ipv6", append(greeting, append([]byte{5, 1, 0, 4}, append(netip.MustParseAddr("fd00::5").AsSlice(), 0x1f, 0x90)...)...), "[fd00::5]:8080", 0xff, false},
		{"domain resolved", append(greeting, 5, 1, 0, 3, 7, 'h', 't', 't', 'p', 'b', 'i', 'n', 0, 80), "10.96.0.10:80", 0xff, false},
		{"domain unknown", append(greeting, 5, 1, 0, 3, 1, 'x', 0, 80), "", HostUnreachable, true},
		{"bind command", append(greeting, 5, 2, 0, 1, 10, 0, 0, 5, 0, 80), "", CommandNotSupported, true},
		{"bad atyp", append(greeting, 5, 1, 0, 9), "", AddrNotSupported, true},
		{"port zero", append(greeting, 5, 1, 0, 1, 10, 0, 0, 5, 0, 0), "", GeneralFailure, true},
		{"socks4", []byte{4, 1, 0, 80}, "", 0xff, true},
		{"truncated", []byte{5, 1, 0, 5, 1}, "", 0xff, true},
		{"no acceptable method", []byte{5, 1, 2}, "", 0xff, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			conn := &rw{in: bytes.NewReader(c.in)}
			got, err := Handshake(conn, resolver)
			if (err != nil) != c.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, c.wantErr)
			}
			if !c.wantErr && got.String() != c.want {
				t.Fatalf("dst = %s, want %s", got, c.want)
			}
			out := conn.out.Bytes()
			if c.code != 0xff && (len(out) < 4 || out[len(out)-9] != c.code) {
				t.Fatalf("reply = %v, want code %d", out, c.code)
			}
		})
	}
}

func FuzzHandshake(f *testing.F) {
	f.Add([]byte{5, 1, 0, 5, 1, 0, 1, 10, 0, 0, 5, 0, 80})
	f.Fuzz(func(t *testing.T, in []byte) {
		Handshake(&rw{in: bytes.NewReader(in)}, nil)
	})
}

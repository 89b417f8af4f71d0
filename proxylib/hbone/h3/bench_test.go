package h3

import (
	"context"
	"io"
	"testing"

	"github.com/ambientmesh/ambient/proxylib/hbone"
)

// In-process benchmarks over real QUIC on loopback; the cross-process figures
// against raw TCP and TLS come from hack/bench.sh (docs/performance.md).

func benchSetup(b *testing.B, handler hbone.HandlerFunc) (*Dialer, hbone.DialRequest) {
	mesh := newTestMesh(b, trustDomain)
	srv := startServer(b, mesh.source(b, serverID), handler)
	d := newTestDialer(b, mesh.source(b, clientID), nil)
	return d, dialReq(srv)
}

func discardHandler(ctx context.Context, req *hbone.Request, resp hbone.Responder) {
	s, err := resp.Accept()
	if err != nil {
		return
	}
	io.Copy(io.Discard, s)
	s.Write([]byte{1})
	s.CloseWrite()
	s.Close()
}

// BenchmarkThroughput sends b.N chunks of 64 KiB through one tunnel.
func BenchmarkThroughput(b *testing.B) {
	d, req := benchSetup(b, discardHandler)
	s, err := d.Dial(context.Background(), req)
	if err != nil {
		b.Fatal(err)
	}
	chunk := make([]byte, 64<<10)
	b.SetBytes(int64(len(chunk)))
	b.ResetTimer()
	for range b.N {
		if _, err := s.Write(chunk); err != nil {
			b.Fatal(err)
		}
	}
	s.CloseWrite()
	if _, err := io.ReadFull(s, make([]byte, 1)); err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	s.Close()
}

// BenchmarkPingPong1KiB is one 1 KiB round trip through an echo tunnel.
func BenchmarkPingPong1KiB(b *testing.B) {
	d, req := benchSetup(b, echoHandler(nil))
	s, err := d.Dial(context.Background(), req)
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	msg, back := make([]byte, 1024), make([]byte, 1024)
	b.ResetTimer()
	for range b.N {
		if _, err := s.Write(msg); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(s, back); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkPooledOpen opens and closes a tunnel on a warm pooled connection.
func BenchmarkPooledOpen(b *testing.B) {
	d, req := benchSetup(b, func(ctx context.Context, _ *hbone.Request, resp hbone.Responder) {
		if s, err := resp.Accept(); err == nil {
			io.Copy(io.Discard, s)
			s.Close()
		}
	})
	warm, err := d.Dial(context.Background(), req)
	if err != nil {
		b.Fatal(err)
	}
	warm.Close()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			s, err := d.Dial(context.Background(), req)
			if err != nil {
				b.Error(err)
				return
			}
			s.Close()
		}
	})
}

package hbonetest

import (
	"context"
	"fmt"
	"io"
	"net/netip"
	"time"

	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/identity"
)

// Hello is an HBONE handler that accepts every tunnel, writes "hello" and
// ends it cleanly: for tests of which transports and listeners answer.
var Hello = hbone.HandlerFunc(func(_ context.Context, _ *hbone.Request, resp hbone.Responder) {
	st, err := resp.Accept()
	if err != nil {
		return
	}
	io.WriteString(st, "hello")
	st.CloseWrite() // a clean end; Close alone would reset the tunnel
	st.Close()
})

// SayHello opens a tunnel from source through d to a Hello server at
// proxyAddr presenting expected, and checks it says "hello".
func SayHello(d hbone.Dialer, source, expected identity.Identity, proxyAddr netip.AddrPort) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := d.Dial(ctx, hbone.DialRequest{Source: source, Expected: []identity.Identity{expected}, ProxyAddr: proxyAddr,
		Target: netip.MustParseAddrPort("127.0.0.1:9")})
	if err != nil {
		return err
	}
	defer st.Close()
	b, err := io.ReadAll(st)
	if err == nil && string(b) != "hello" {
		err = fmt.Errorf("tunnel answered %q, want hello", b)
	}
	return err
}

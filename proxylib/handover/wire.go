// Package handover moves ztunnel's established connections from an
// upgraded (draining) ztunnel to its replacement without losing, repeating
// or reordering a byte (docs/interfaces.md, "Connection hand-over").
//
// Between two of our proxies a tunnel gets a resumable session: the CONNECT
// offers it (HeaderSession: v1), the server answers with a random 128-bit
// session id. To upgrade, the draining side suspends the session to a clean
// byte boundary (HeaderSuspend, answered by the peer once everything sent
// was delivered), the peer parks its application socket for ParkTTL, the
// draining side passes its own application socket to the new ztunnel over a
// unix socket (SCM_RIGHTS, Handoff), and the new ztunnel re-dials the peer
// with HeaderResume. The peer accepts a resume only for a parked session
// from the same SPIFFE identity, at the same epoch and byte offsets, once.
// Istio peers never answer the offer, so their tunnels keep today's drain.
package handover

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// Header names (HBONE CONNECT request and response headers).
const (
	// HeaderSession: request "v1" (offer); response "v1;id=<32 hex>" (accepted).
	HeaderSession = "X-Ambient-Session"
	// HeaderSuspend: request "v1;id=<hex>;epoch=<n>;sent=<n>"; the 200
	// response carries "v1;id=<hex>;epoch=<n>;sent=<n>" with the peer's count.
	HeaderSuspend = "X-Ambient-Suspend"
	// HeaderResume: request "v1;id=<hex>;epoch=<n>;sent=<n>;recv=<n>".
	HeaderResume = "X-Ambient-Resume"
)

// Version is the only protocol version spoken.
const Version = "v1"

// maxHeader bounds the work done on a hostile header value.
const maxHeader = 256

// ID is a session id: 128 random bits, known only to the two proxies.
type ID [16]byte

// NewID returns a fresh random id.
func NewID() (ID, error) {
	var id ID
	_, err := rand.Read(id[:])
	return id, err
}

func (id ID) String() string { return hex.EncodeToString(id[:]) }

// IsZero reports an unset id (never issued: NewID's chance of it is 2^-128).
func (id ID) IsZero() bool { return id == ID{} }

// ParseID reads 32 lower-case hex digits.
func ParseID(s string) (ID, error) {
	var id ID
	if len(s) != 2*len(id) || strings.ToLower(s) != s {
		return id, fmt.Errorf("%w: session id must be 32 lower-case hex digits", ErrMalformed)
	}
	if _, err := hex.Decode(id[:], []byte(s)); err != nil {
		return id, fmt.Errorf("%w: session id: %v", ErrMalformed, err)
	}
	if id.IsZero() {
		return id, fmt.Errorf("%w: zero session id", ErrMalformed)
	}
	return id, nil
}

// ErrMalformed is any header that does not parse.
var ErrMalformed = errors.New("handover: malformed header")

// Params are a header's fields. Sent and Recv are the sender's byte counts
// over the whole session (sent into the tunnel, received from it); Epoch
// counts the session's completed resumptions.
type Params struct {
	ID         ID
	Epoch      uint64
	Sent, Recv int64
}

// field names, in the order they are written.
const (
	fID    = "id"
	fEpoch = "epoch"
	fSent  = "sent"
	fRecv  = "recv"
)

// FormatAnswer is the server's HeaderSession response value.
func FormatAnswer(id ID) string { return Version + ";" + fID + "=" + id.String() }

// ParseAnswer reads a HeaderSession response value.
func ParseAnswer(v string) (ID, error) {
	p, err := parse(v, fID)
	return p.ID, err
}

// FormatSuspend is HeaderSuspend's value (request and response).
func FormatSuspend(p Params) string {
	return fmt.Sprintf("%s;%s=%s;%s=%d;%s=%d", Version, fID, p.ID, fEpoch, p.Epoch, fSent, p.Sent)
}

// ParseSuspend reads HeaderSuspend's value.
func ParseSuspend(v string) (Params, error) { return parse(v, fID, fEpoch, fSent) }

// FormatResume is HeaderResume's value.
func FormatResume(p Params) string {
	return fmt.Sprintf("%s;%s=%s;%s=%d;%s=%d;%s=%d", Version, fID, p.ID, fEpoch, p.Epoch, fSent, p.Sent, fRecv, p.Recv)
}

// ParseResume reads HeaderResume's value.
func ParseResume(v string) (Params, error) { return parse(v, fID, fEpoch, fSent, fRecv) }

// parse reads "v1;k=v;..." holding exactly the fields want, in that order
// (one spelling per message, so nothing is ambiguous).
func parse(v string, want ...string) (Params, error) {
	var p Params
	bad := func(format string, args ...any) (Params, error) {
		return Params{}, fmt.Errorf("%w: %s", ErrMalformed, fmt.Sprintf(format, args...))
	}
	if len(v) > maxHeader {
		return bad("%d bytes, at most %d", len(v), maxHeader)
	}
	parts := strings.Split(v, ";")
	if parts[0] != Version {
		return bad("version %q, want %q", truncate(parts[0]), Version)
	}
	if len(parts)-1 != len(want) {
		return bad("%d fields, want %d", len(parts)-1, len(want))
	}
	for i, kv := range parts[1:] {
		k, val, ok := strings.Cut(kv, "=")
		if !ok || k != want[i] {
			return bad("field %d is %q, want %s=", i+1, truncate(kv), want[i])
		}
		var err error
		switch k {
		case fID:
			p.ID, err = ParseID(val)
		case fEpoch:
			var n int64
			n, err = parseCount(val)
			p.Epoch = uint64(n)
		case fSent:
			p.Sent, err = parseCount(val)
		case fRecv:
			p.Recv, err = parseCount(val)
		}
		if err != nil {
			return Params{}, err
		}
	}
	return p, nil
}

// parseCount reads a non-negative decimal without sign or leading zeros.
func parseCount(s string) (int64, error) {
	if s == "" || len(s) > 19 || (len(s) > 1 && s[0] == '0') || strings.TrimLeft(s, "0123456789") != "" {
		return 0, fmt.Errorf("%w: count %q", ErrMalformed, truncate(s))
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%w: count %q: %v", ErrMalformed, truncate(s), err)
	}
	return n, nil
}

func truncate(s string) string {
	if len(s) > 40 {
		return s[:40] + "…"
	}
	return s
}

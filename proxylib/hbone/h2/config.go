// Package h2 is the default HBONE transport: HTTP/2 CONNECT over mutual TLS
// 1.3 (ALPN h2) on golang.org/x/net/http2, with SPIFFE peer verification,
// connection pooling, and the limits a hostile peer must not get past.
package h2

import (
	"time"
)

// Tuning sizes buffers and windows for bulk tunnelling. Zero fields take the
// defaults below; both sides use the same struct.
type Tuning struct {
	// ConnWindow and StreamWindow are the receive flow-control windows we
	// advertise. Memory is only used as data actually arrives, so large
	// windows cost nothing on idle tunnels but keep a fast sender from
	// stalling on the round trip of WINDOW_UPDATE.
	ConnWindow   int32
	StreamWindow int32
	// MaxReadFrameSize is the largest DATA frame we accept. Keep it at 16 KiB
	// on the server: x/net's client allocates a request-body scratch buffer
	// per stream of min(peer's max frame size, 512 KiB) and holds it for the
	// stream's life, so a larger value multiplies memory per idle tunnel. The
	// dialer accepts 64 KiB frames (its read buffer is per connection), so a
	// server write of up to 64 KiB travels as one DATA frame: one hand-off in
	// x/net and whole TLS records.
	MaxReadFrameSize uint32
	// CopyBuffer is the size of the pooled buffers used to copy tunnel data.
	CopyBuffer int
}

// Defaults chosen by measurement (see docs/performance.md and the unit
// benchmarks in this package).
const (
	DefaultConnWindow       = 16 << 20
	DefaultStreamWindow     = 4 << 20
	DefaultMaxReadFrameSize = 16 << 10 // server
	DefaultDialerFrameSize  = 64 << 10 // dialer
	DefaultCopyBuffer       = 32 << 10
)

func (t Tuning) withDefaults() Tuning {
	if t.ConnWindow <= 0 {
		t.ConnWindow = DefaultConnWindow
	}
	if t.StreamWindow <= 0 {
		t.StreamWindow = DefaultStreamWindow
	}
	if t.MaxReadFrameSize == 0 {
		t.MaxReadFrameSize = DefaultMaxReadFrameSize
	}
	if t.CopyBuffer <= 0 {
		t.CopyBuffer = DefaultCopyBuffer
	}
	return t
}

// Limits bound what one peer can make the server do. Zero fields take the
// defaults below; negative durations disable that limit.
type Limits struct {
	// HandshakeTimeout bounds the TLS handshake (slowloris on the handshake).
	HandshakeTimeout time.Duration
	// HeaderTimeout bounds the time from handshake to the first complete
	// CONNECT request (headers dripping byte by byte).
	HeaderTimeout time.Duration
	// PingInterval and PingTimeout: when nothing is read for PingInterval the
	// server pings, and a peer that does not answer in PingTimeout (e.g. one
	// stalled in the middle of a frame) is closed.
	PingInterval, PingTimeout time.Duration
	// MaxHeaderListSize is the SETTINGS_MAX_HEADER_LIST_SIZE we enforce
	// (CONTINUATION floods close the connection).
	MaxHeaderListSize uint32
	// MaxConcurrentStreams per connection; more are refused (REFUSED_STREAM).
	MaxConcurrentStreams uint32
	// MaxTunnelsPerIdentity caps open tunnels per peer identity across all
	// connections; more are answered 429.
	MaxTunnelsPerIdentity int
	// ConnIdleTimeout closes a connection with no open streams.
	ConnIdleTimeout time.Duration
	// StreamIdleTimeout resets a tunnel with no bytes in either direction.
	StreamIdleTimeout time.Duration
	// MaxConnectionAge sends a graceful GOAWAY to a connection this old; it is
	// closed MaxConnectionAgeGrace later if streams are still open.
	MaxConnectionAge, MaxConnectionAgeGrace time.Duration
	// MaxEarlyResets is how many tunnels a connection may reset before they
	// were answered, per EarlyResetWindow, before it is sent GOAWAY and
	// closed (HTTP/2 Rapid Reset, CVE-2023-44487).
	MaxEarlyResets   int
	EarlyResetWindow time.Duration
}

// Default limits.
const (
	DefaultHandshakeTimeout      = 10 * time.Second
	DefaultHeaderTimeout         = 10 * time.Second
	DefaultPingInterval          = 30 * time.Second
	DefaultPingTimeout           = 15 * time.Second
	DefaultMaxHeaderListSize     = 64 << 10
	DefaultMaxConcurrentStreams  = 1000
	DefaultMaxTunnelsPerIdentity = 10000
	DefaultConnIdleTimeout       = 10 * time.Minute
	DefaultStreamIdleTimeout     = time.Hour
	DefaultMaxConnectionAgeGrace = time.Minute
	DefaultMaxEarlyResets        = 1000
	DefaultEarlyResetWindow      = 10 * time.Second
)

func (l Limits) withDefaults() Limits {
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		} else if *d < 0 {
			*d = 0
		}
	}
	def(&l.HandshakeTimeout, DefaultHandshakeTimeout)
	def(&l.HeaderTimeout, DefaultHeaderTimeout)
	def(&l.PingInterval, DefaultPingInterval)
	def(&l.PingTimeout, DefaultPingTimeout)
	def(&l.ConnIdleTimeout, DefaultConnIdleTimeout)
	def(&l.StreamIdleTimeout, DefaultStreamIdleTimeout)
	def(&l.MaxConnectionAge, -1) // unlimited unless set
	def(&l.MaxConnectionAgeGrace, DefaultMaxConnectionAgeGrace)
	def(&l.EarlyResetWindow, DefaultEarlyResetWindow)
	if l.MaxEarlyResets == 0 {
		l.MaxEarlyResets = DefaultMaxEarlyResets
	}
	if l.MaxHeaderListSize == 0 {
		l.MaxHeaderListSize = DefaultMaxHeaderListSize
	}
	if l.MaxConcurrentStreams == 0 {
		l.MaxConcurrentStreams = DefaultMaxConcurrentStreams
	}
	if l.MaxTunnelsPerIdentity == 0 {
		l.MaxTunnelsPerIdentity = DefaultMaxTunnelsPerIdentity
	}
	return l
}

package l7

import (
	"crypto/rand"
	"encoding/hex"
	"net/http"
	"strings"
)

// Span is this proxy's span of a request in W3C trace context terms.
type Span struct {
	TraceID string // 32 hex
	SpanID  string // 16 hex, ours
	Parent  string // 16 hex, the caller's span ("" when we started the trace)
	Sampled bool
}

// Traceparent formats the header the upstream gets (our span as parent).
func (s Span) Traceparent() string {
	flags := "00"
	if s.Sampled {
		flags = "01"
	}
	return "00-" + s.TraceID + "-" + s.SpanID + "-" + flags
}

// StartSpan continues the caller's trace from a valid traceparent, or starts
// a new one when generate is set (tracing enabled). ok is false when there
// is no trace to propagate. The request's traceparent is rewritten to our
// span; an invalid one is dropped (and replaced when generating).
func StartSpan(h http.Header, generate bool) (Span, bool) {
	tp := h.Get("Traceparent")
	if trace, parent, flags, ok := parseTraceparent(tp); ok {
		s := Span{TraceID: trace, SpanID: randomHex(8), Parent: parent, Sampled: flags&1 == 1}
		h.Set("Traceparent", s.Traceparent())
		return s, true
	}
	h.Del("Traceparent")
	h.Del("Tracestate") // meaningless without a valid traceparent
	if !generate {
		return Span{}, false
	}
	s := Span{TraceID: randomHex(16), SpanID: randomHex(8), Sampled: true}
	h.Set("Traceparent", s.Traceparent())
	return s, true
}

// parseTraceparent accepts version 00 (and, per spec, higher versions'
// first four fields), rejecting all-zero ids and upper-case hex.
func parseTraceparent(v string) (trace, parent string, flags byte, ok bool) {
	parts := strings.Split(v, "-")
	if len(parts) < 4 || len(parts[0]) != 2 || parts[0] == "ff" || !isLowerHex(parts[0]) {
		return "", "", 0, false
	}
	if parts[0] == "00" && len(parts) != 4 {
		return "", "", 0, false
	}
	trace, parent = parts[1], parts[2]
	if len(trace) != 32 || len(parent) != 16 || len(parts[3]) != 2 ||
		!isLowerHex(trace) || !isLowerHex(parent) || !isLowerHex(parts[3]) ||
		strings.Trim(trace, "0") == "" || strings.Trim(parent, "0") == "" {
		return "", "", 0, false
	}
	f, _ := hex.DecodeString(parts[3])
	return trace, parent, f[0], true
}

func isLowerHex(s string) bool {
	for _, c := range s {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

package grpcwire

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"golang.org/x/net/http2"
)

// Code is a gRPC status code (the numbers of grpc/grpc's statuscodes.md).
// The proxies keep their own copy: grpc-go's codes package drags in its
// runtime internals.
type Code uint32

// The gRPC status codes.
const (
	OK                 Code = 0
	Canceled           Code = 1
	Unknown            Code = 2
	InvalidArgument    Code = 3
	DeadlineExceeded   Code = 4
	NotFound           Code = 5
	AlreadyExists      Code = 6
	PermissionDenied   Code = 7
	ResourceExhausted  Code = 8
	FailedPrecondition Code = 9
	Aborted            Code = 10
	OutOfRange         Code = 11
	Unimplemented      Code = 12
	Internal           Code = 13
	Unavailable        Code = 14
	DataLoss           Code = 15
	Unauthenticated    Code = 16
)

var codeNames = [...]string{
	"OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound", "AlreadyExists",
	"PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted", "OutOfRange",
	"Unimplemented", "Internal", "Unavailable", "DataLoss", "Unauthenticated",
}

func (c Code) String() string {
	if int(c) < len(codeNames) {
		return codeNames[c]
	}
	return "Code(" + strconv.FormatUint(uint64(c), 10) + ")"
}

// Status is an RPC's failure: a non-OK code and the server's message.
type Status struct {
	Code    Code
	Message string
}

func (s *Status) Error() string {
	return fmt.Sprintf("rpc error: code = %s desc = %s", s.Code, s.Message)
}

func errorf(c Code, format string, a ...any) *Status {
	return &Status{Code: c, Message: fmt.Sprintf(format, a...)}
}

// CodeOf is err's status code: OK for nil, Unknown for an error that
// carries none.
func CodeOf(err error) Code {
	if err == nil {
		return OK
	}
	var s *Status
	if errors.As(err, &s) {
		return s.Code
	}
	return Unknown
}

// transportStatus turns an error of the HTTP/2 layer (or the caller's
// context) into a status, as PROTOCOL-HTTP2.md's RST_STREAM table does.
func transportStatus(ctx context.Context, err error) *Status {
	var s *Status
	if errors.As(err, &s) {
		return s
	}
	switch {
	case errors.Is(err, context.DeadlineExceeded), ctx.Err() == context.DeadlineExceeded:
		return errorf(DeadlineExceeded, "%v", err)
	case errors.Is(err, context.Canceled), ctx.Err() == context.Canceled:
		return errorf(Canceled, "%v", err)
	}
	var se http2.StreamError
	if errors.As(err, &se) {
		return errorf(resetCode(se.Code), "stream reset: %v", err)
	}
	return errorf(Unavailable, "%v", err)
}

func resetCode(c http2.ErrCode) Code {
	switch c {
	case http2.ErrCodeRefusedStream:
		return Unavailable
	case http2.ErrCodeCancel:
		return Canceled
	case http2.ErrCodeEnhanceYourCalm:
		return ResourceExhausted
	case http2.ErrCodeInadequateSecurity:
		return PermissionDenied
	}
	return Internal
}

// httpStatusCode maps a non-200 :status of a response that is not gRPC
// (a proxy's answer, say) to a code, per http-grpc-status-mapping.md.
func httpStatusCode(status int) Code {
	switch status {
	case http.StatusBadRequest:
		return Internal
	case http.StatusUnauthorized:
		return Unauthenticated
	case http.StatusForbidden:
		return PermissionDenied
	case http.StatusNotFound:
		return Unimplemented
	case http.StatusTooManyRequests, http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
		return Unavailable
	}
	return Unknown
}

// statusFrom reads grpc-status and grpc-message from h (trailers, or the
// headers of a trailers-only response); nil for OK.
func statusFrom(h http.Header) *Status {
	raw := h.Get("grpc-status")
	if raw == "" {
		return errorf(Internal, "server closed the stream without a grpc-status")
	}
	n, err := strconv.ParseUint(raw, 10, 32)
	if err != nil {
		return errorf(Internal, "malformed grpc-status %q", raw)
	}
	if n == 0 {
		return nil
	}
	return &Status{Code: Code(n), Message: decodeMessage(h.Get("grpc-message"))}
}

// decodeMessage undoes grpc-message's percent-encoding; a malformed escape
// is kept as it is (the spec asks receivers not to fail on it).
func decodeMessage(s string) string {
	if !strings.Contains(s, "%") {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '%' && i+2 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+3], 16, 8); err == nil {
				b.WriteByte(byte(v))
				i += 2
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// encodeTimeout renders d as grpc-timeout: at most eight digits and a unit,
// rounded up so the server never sees a shorter deadline than ours.
func encodeTimeout(d time.Duration) string {
	if d <= 0 {
		return "1n"
	}
	units := []struct {
		d time.Duration
		u string
	}{{time.Nanosecond, "n"}, {time.Microsecond, "u"}, {time.Millisecond, "m"}, {time.Second, "S"}, {time.Minute, "M"}, {time.Hour, "H"}}
	for _, u := range units {
		n := (d + u.d - 1) / u.d
		if n < 1e8 {
			return strconv.FormatInt(int64(n), 10) + u.u
		}
	}
	return "99999999H"
}

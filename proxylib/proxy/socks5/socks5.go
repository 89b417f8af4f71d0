// Package socks5 implements the server side of the SOCKS5 handshake
// (RFC 1928, no authentication, CONNECT only) used by ztunnel's :15080
// listener, so a workload can ask explicitly for a destination.
package socks5

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
)

// Reply codes.
const (
	Succeeded           byte = 0x00
	GeneralFailure      byte = 0x01
	NotAllowed          byte = 0x02
	HostUnreachable     byte = 0x04
	ConnectionRefused   byte = 0x05
	CommandNotSupported byte = 0x07
	AddrNotSupported    byte = 0x08
)

const (
	version      = 5
	noAuth       = 0x00
	noAcceptable = 0xff
	cmdConnect   = 1
	atypIPv4     = 1
	atypDomain   = 3
	atypIPv6     = 4
)

// Error is a handshake failure with the reply code already sent (0 when
// nothing could be sent).
type Error struct {
	Code byte
	Msg  string
}

func (e *Error) Error() string { return "socks5: " + e.Msg }

// Resolver turns a domain name into an address; nil refuses domain names.
type Resolver func(host string) (netip.Addr, error)

// Handshake reads the greeting and CONNECT request from rw and returns the
// requested destination. On failure the matching reply has been written.
// The caller writes the final reply with Reply once the upstream is known.
func Handshake(rw io.ReadWriter, resolve Resolver) (netip.AddrPort, error) {
	var hdr [2]byte
	if _, err := io.ReadFull(rw, hdr[:]); err != nil {
		return netip.AddrPort{}, fmt.Errorf("socks5: greeting: %w", err)
	}
	if hdr[0] != version {
		return netip.AddrPort{}, &Error{Msg: fmt.Sprintf("version %d", hdr[0])}
	}
	methods := make([]byte, hdr[1])
	if _, err := io.ReadFull(rw, methods); err != nil {
		return netip.AddrPort{}, fmt.Errorf("socks5: methods: %w", err)
	}
	if !contains(methods, noAuth) {
		rw.Write([]byte{version, noAcceptable})
		return netip.AddrPort{}, &Error{Msg: "client offers no acceptable auth method"}
	}
	if _, err := rw.Write([]byte{version, noAuth}); err != nil {
		return netip.AddrPort{}, err
	}
	var req [4]byte
	if _, err := io.ReadFull(rw, req[:]); err != nil {
		return netip.AddrPort{}, fmt.Errorf("socks5: request: %w", err)
	}
	if req[0] != version {
		return netip.AddrPort{}, fail(rw, GeneralFailure, fmt.Sprintf("request version %d", req[0]))
	}
	if req[1] != cmdConnect {
		return netip.AddrPort{}, fail(rw, CommandNotSupported, fmt.Sprintf("command %d", req[1]))
	}
	addr, err := readAddr(rw, req[3], resolve)
	if err != nil {
		return netip.AddrPort{}, err
	}
	var port [2]byte
	if _, err := io.ReadFull(rw, port[:]); err != nil {
		return netip.AddrPort{}, fmt.Errorf("socks5: port: %w", err)
	}
	p := binary.BigEndian.Uint16(port[:])
	if p == 0 {
		return netip.AddrPort{}, fail(rw, GeneralFailure, "port 0")
	}
	return netip.AddrPortFrom(addr.Unmap(), p), nil
}

func readAddr(rw io.ReadWriter, atyp byte, resolve Resolver) (netip.Addr, error) {
	switch atyp {
	case atypIPv4, atypIPv6:
		n := 4
		if atyp == atypIPv6 {
			n = 16
		}
		b := make([]byte, n)
		if _, err := io.ReadFull(rw, b); err != nil {
			return netip.Addr{}, fmt.Errorf("socks5: address: %w", err)
		}
		a, _ := netip.AddrFromSlice(b)
		return a, nil
	case atypDomain:
		var l [1]byte
		if _, err := io.ReadFull(rw, l[:]); err != nil {
			return netip.Addr{}, err
		}
		host := make([]byte, l[0])
		if _, err := io.ReadFull(rw, host); err != nil {
			return netip.Addr{}, err
		}
		if resolve == nil {
			return netip.Addr{}, fail(rw, AddrNotSupported, "domain names not supported")
		}
		a, err := resolve(string(host))
		if err != nil {
			return netip.Addr{}, fail(rw, HostUnreachable, fmt.Sprintf("resolve %q: %v", host, err))
		}
		return a, nil
	}
	return netip.Addr{}, fail(rw, AddrNotSupported, fmt.Sprintf("address type %d", atyp))
}

func fail(w io.Writer, code byte, msg string) error {
	Reply(w, code)
	return &Error{Code: code, Msg: msg}
}

// Reply writes the final reply (bound address reported as 0.0.0.0:0).
func Reply(w io.Writer, code byte) error {
	_, err := w.Write([]byte{version, code, 0, atypIPv4, 0, 0, 0, 0, 0, 0})
	return err
}

// IsProtocolError reports whether err is a handshake violation (not an I/O error).
func IsProtocolError(err error) bool {
	var e *Error
	return errors.As(err, &e)
}

func contains(b []byte, v byte) bool {
	for _, x := range b {
		if x == v {
			return true
		}
	}
	return false
}

// Package proxyproto encodes PROXY protocol headers (HAProxy's
// proxy-protocol.txt, versions 1 and 2): the line or block a TCP proxy
// sends before the client's bytes so that the server it connects to sees
// the client's address and the address the client dialed, instead of the
// proxy's.
//
// It only encodes, PROXY command over TCP, without TLVs: that is all a
// proxy relaying TCP connections needs to say. The Append functions write
// into the caller's buffer, so a per-connection header costs no
// allocation once the buffer has grown to MaxLen.
//
//	hdr = proxyproto.Append(hdr[:0], proxyproto.V2, client, dialed)
package proxyproto

import (
	"encoding/binary"
	"net/netip"
	"strconv"
)

// Version is a PROXY protocol version.
type Version uint8

// The versions; the zero Version means none (no header).
const (
	V1 Version = 1 // a text line: "PROXY TCP4 src dst sport dport\r\n"
	V2 Version = 2 // a binary block, cheaper to parse
)

func (v Version) String() string {
	switch v {
	case V1:
		return "v1"
	case V2:
		return "v2"
	}
	return "off"
}

// Header sizes in bytes.
const (
	MaxV1Len = 104     // the longest line AppendV1 writes (TCP6; receivers take up to 107)
	MaxV2Len = 16 + 36 // the longest block AppendV2 writes (TCP over IPv6, no TLVs)
	MaxLen   = MaxV1Len
)

// v2Signature starts every version 2 header (spec 2.2).
var v2Signature = [12]byte{0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A}

// Version 2 command and family bytes (spec 2.2).
const (
	v2Local   = 0x20 // version 2, LOCAL
	v2Proxy   = 0x21 // version 2, PROXY
	v2Unspec  = 0x00 // AF_UNSPEC, UNSPEC
	v2TCPIPv4 = 0x11 // AF_INET, STREAM
	v2TCPIPv6 = 0x21 // AF_INET6, STREAM
)

// Append appends the header of version v for a TCP connection from src to
// dst; for any other v it returns b unchanged.
func Append(b []byte, v Version, src, dst netip.AddrPort) []byte {
	switch v {
	case V1:
		return AppendV1(b, src, dst)
	case V2:
		return AppendV2(b, src, dst)
	}
	return b
}

// addresses puts src and dst in one family, as the spec requires of a
// header: both IPv4 when both are IPv4 (IPv4-mapped IPv6 addresses count
// as IPv4), otherwise both IPv6 with an IPv4 one mapped, as HAProxy does.
// Zones are dropped: they mean nothing to the receiver. ok is false when
// either address is missing.
func addresses(src, dst netip.AddrPort) (s, d netip.Addr, v4, ok bool) {
	s, d = src.Addr().Unmap().WithZone(""), dst.Addr().Unmap().WithZone("")
	if !s.IsValid() || !d.IsValid() {
		return s, d, false, false
	}
	if s.Is4() && d.Is4() {
		return s, d, true, true
	}
	return netip.AddrFrom16(s.As16()), netip.AddrFrom16(d.As16()), false, true
}

// AppendV1 appends the version 1 line for a TCP connection from src to
// dst. Without both addresses it appends "PROXY UNKNOWN\r\n", which tells
// the receiver to use the connection's own addresses.
func AppendV1(b []byte, src, dst netip.AddrPort) []byte {
	s, d, v4, ok := addresses(src, dst)
	if !ok {
		return append(b, "PROXY UNKNOWN\r\n"...)
	}
	if v4 {
		b = append(b, "PROXY TCP4 "...)
		b = s.AppendTo(b)
		b = append(b, ' ')
		b = d.AppendTo(b)
	} else {
		b = append(b, "PROXY TCP6 "...)
		b = appendV1IPv6(b, s)
		b = append(b, ' ')
		b = appendV1IPv6(b, d)
	}
	b = append(b, ' ')
	b = strconv.AppendUint(b, uint64(src.Port()), 10)
	b = append(b, ' ')
	b = strconv.AppendUint(b, uint64(dst.Port()), 10)
	return append(b, '\r', '\n')
}

// appendV1IPv6 writes a as the spec's IPv6 form: groups of hex digits and
// at most one "::". netip writes an IPv4-mapped address with a dotted
// quad ("::ffff:192.0.2.1"), which that form does not allow, so those are
// written as "::ffff:c000:201".
func appendV1IPv6(b []byte, a netip.Addr) []byte {
	if !a.Is4In6() {
		return a.AppendTo(b)
	}
	v4 := a.Unmap().As4()
	b = append(b, "::ffff:"...)
	b = strconv.AppendUint(b, uint64(v4[0])<<8|uint64(v4[1]), 16)
	b = append(b, ':')
	return strconv.AppendUint(b, uint64(v4[2])<<8|uint64(v4[3]), 16)
}

// AppendV2 appends the version 2 block for a TCP connection from src to
// dst: the PROXY command, TCP over IPv4 or IPv6, no TLVs. Without both
// addresses it appends a LOCAL block, which tells the receiver to use the
// connection's own addresses.
func AppendV2(b []byte, src, dst netip.AddrPort) []byte {
	b = append(b, v2Signature[:]...)
	s, d, v4, ok := addresses(src, dst)
	switch {
	case !ok:
		return append(b, v2Local, v2Unspec, 0, 0)
	case v4:
		b = append(b, v2Proxy, v2TCPIPv4, 0, 12)
		sa, da := s.As4(), d.As4()
		b = append(b, sa[:]...)
		b = append(b, da[:]...)
	default:
		b = append(b, v2Proxy, v2TCPIPv6, 0, 36)
		sa, da := s.As16(), d.As16()
		b = append(b, sa[:]...)
		b = append(b, da[:]...)
	}
	b = binary.BigEndian.AppendUint16(b, src.Port())
	return binary.BigEndian.AppendUint16(b, dst.Port())
}

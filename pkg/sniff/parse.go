package sniff

import (
	"errors"
	"fmt"
)

// Handshake and extension code points this package reads (RFC 8446 §4,
// RFC 6066 §3, RFC 7301 §3.1).
const (
	handshakeTypeClientHello = 1
	extensionServerName      = 0
	extensionALPN            = 16
	serverNameTypeHostName   = 0
)

// ErrMalformed is wrapped by every error Parse returns; the wrapping error
// names the field that broke, for logs.
var ErrMalformed = errors.New("sniff: malformed ClientHello")

var (
	errNotClientHello  = fmt.Errorf("%w: handshake message is not a ClientHello", ErrMalformed)
	errBadLength       = fmt.Errorf("%w: handshake length does not match message size", ErrMalformed)
	errBadVersion      = fmt.Errorf("%w: legacy_version is not 3.x", ErrMalformed)
	errShortField      = fmt.Errorf("%w: field overruns message", ErrMalformed)
	errBadSessionID    = fmt.Errorf("%w: session id longer than 32 bytes", ErrMalformed)
	errBadCipherSuites = fmt.Errorf("%w: cipher suite list empty or odd", ErrMalformed)
	errBadCompression  = fmt.Errorf("%w: compression method list empty", ErrMalformed)
	errBadExtensions   = fmt.Errorf("%w: extension block length mismatch", ErrMalformed)
	errDuplicateExt    = fmt.Errorf("%w: server_name or ALPN extension repeated", ErrMalformed)
	errBadServerName   = fmt.Errorf("%w: bad server_name extension", ErrMalformed)
	errBadALPN         = fmt.Errorf("%w: bad ALPN extension", ErrMalformed)
)

// Parse parses one complete ClientHello handshake message: the 4-byte
// handshake header (type and uint24 length) followed by exactly that many
// body bytes, without TLS record headers. It returns the SNI host name ("" if
// absent) and the ALPN protocols (nil if the extension is absent).
//
// Parse is strict: any length that overruns its enclosing field, any trailing
// byte, and a repeated server_name or ALPN extension are errors, because a
// lenient reading could route on a different ALPN list than the backend sees.
func Parse(msg []byte) (serverName string, alpn []string, err error) {
	var p parsed
	if err := p.parse(msg, nil, ""); err != nil {
		return "", nil, err
	}
	return p.serverName, p.alpn, nil
}

// parsed holds the fields we route and log on.
type parsed struct {
	serverName string
	alpn       []string
}

// parse fills p from msg. alpnBuf is reused as the backing array for p.alpn,
// and lastName is returned instead of a fresh string when the SNI is equal to
// it, so a pooled Hello parses repeat visitors without allocating.
func (p *parsed) parse(msg []byte, alpnBuf []string, lastName string) error {
	p.serverName, p.alpn = "", nil
	if len(msg) < 4 {
		return errShortField
	}
	if msg[0] != handshakeTypeClientHello {
		return errNotClientHello
	}
	if int(msg[1])<<16|int(msg[2])<<8|int(msg[3]) != len(msg)-4 {
		return errBadLength
	}
	s := cursor(msg[4:])

	version, ok := s.bytes(2)
	if !ok {
		return errShortField
	}
	if version[0] != 3 {
		return errBadVersion
	}
	if _, ok := s.bytes(32); !ok { // random
		return errShortField
	}
	sessionID, ok := s.prefixed8()
	if !ok {
		return errShortField
	}
	if len(sessionID) > 32 {
		return errBadSessionID
	}
	suites, ok := s.prefixed16()
	if !ok {
		return errShortField
	}
	if len(suites) == 0 || len(suites)%2 != 0 {
		return errBadCipherSuites
	}
	compression, ok := s.prefixed8()
	if !ok {
		return errShortField
	}
	if len(compression) == 0 {
		return errBadCompression
	}
	if len(s) == 0 {
		return nil // extensions are optional before TLS 1.3
	}
	exts, ok := s.prefixed16()
	if !ok || len(s) != 0 {
		return errBadExtensions
	}

	var sawName, sawALPN bool
	for len(exts) > 0 {
		typ, ok := exts.uint16()
		if !ok {
			return errBadExtensions
		}
		data, ok := exts.prefixed16()
		if !ok {
			return errBadExtensions
		}
		switch typ {
		case extensionServerName:
			if sawName {
				return errDuplicateExt
			}
			sawName = true
			name, err := parseServerName(data)
			if err != nil {
				return err
			}
			if string(name) == lastName {
				p.serverName = lastName
			} else {
				p.serverName = string(name)
			}
		case extensionALPN:
			if sawALPN {
				return errDuplicateExt
			}
			sawALPN = true
			var err error
			if p.alpn, err = parseALPN(data, alpnBuf[:0]); err != nil {
				p.alpn = nil
				return err
			}
		}
	}
	return nil
}

// parseServerName returns the host_name entry of a server_name extension
// (RFC 6066 §3), nil if the list holds only other name types. Like
// crypto/tls it rejects empty names, two host names and a trailing dot.
func parseServerName(data cursor) ([]byte, error) {
	list, ok := data.prefixed16()
	if !ok || len(data) != 0 || len(list) == 0 {
		return nil, errBadServerName
	}
	var host []byte
	for len(list) > 0 {
		typ, ok := list.uint8()
		if !ok {
			return nil, errBadServerName
		}
		name, ok := list.prefixed16()
		if !ok || len(name) == 0 {
			return nil, errBadServerName
		}
		if typ != serverNameTypeHostName {
			continue
		}
		if host != nil {
			return nil, errBadServerName
		}
		if name[len(name)-1] == '.' {
			return nil, errBadServerName
		}
		host = name
	}
	return host, nil
}

// parseALPN appends the protocol names of an ALPN extension (RFC 7301
// §3.1) to dst. The list and every name must be non-empty.
func parseALPN(data cursor, dst []string) ([]string, error) {
	list, ok := data.prefixed16()
	if !ok || len(data) != 0 || len(list) == 0 {
		return nil, errBadALPN
	}
	for len(list) > 0 {
		proto, ok := list.prefixed8()
		if !ok || len(proto) == 0 {
			return nil, errBadALPN
		}
		dst = append(dst, internProtocol(proto))
	}
	return dst, nil
}

// internProtocol returns a constant string for the protocols browsers and
// ACME validators send, so the common case allocates nothing.
func internProtocol(b []byte) string {
	switch string(b) {
	case "h2":
		return "h2"
	case "http/1.1":
		return "http/1.1"
	case ACMEProtocol:
		return ACMEProtocol
	case "http/1.0":
		return "http/1.0"
	case "h3":
		return "h3"
	}
	return string(b)
}

// cursor is a read position in a byte string; each method consumes what it
// returns and reports false, consuming nothing, if the input is too short.
type cursor []byte

func (c *cursor) bytes(n int) (cursor, bool) {
	if n < 0 || len(*c) < n {
		return nil, false
	}
	b := (*c)[:n:n]
	*c = (*c)[n:]
	return b, true
}

func (c *cursor) uint8() (byte, bool) {
	b, ok := c.bytes(1)
	if !ok {
		return 0, false
	}
	return b[0], true
}

func (c *cursor) uint16() (uint16, bool) {
	b, ok := c.bytes(2)
	if !ok {
		return 0, false
	}
	return uint16(b[0])<<8 | uint16(b[1]), true
}

func (c *cursor) prefixed8() (cursor, bool) {
	save := *c
	n, ok := c.uint8()
	if !ok {
		return nil, false
	}
	b, ok := c.bytes(int(n))
	if !ok {
		*c = save
	}
	return b, ok
}

func (c *cursor) prefixed16() (cursor, bool) {
	save := *c
	n, ok := c.uint16()
	if !ok {
		return nil, false
	}
	b, ok := c.bytes(int(n))
	if !ok {
		*c = save
	}
	return b, ok
}

// Package alpncert answers ACME TLS-ALPN-01 challenges (RFC 8737) from a
// directory of challenge certificates in dehydrated's layout:
// <name>.crt.pem and <name>.key.pem, where <name> is the identifier, a
// DNS name or, for IP identifiers (RFC 8738), the address as text. The
// same directory feeds lighttpd's ssl.acme-tls-1, and WriteChallenge
// fills it for clients that hand a hook the key authorization instead of
// a certificate (uacme).
//
// It has no sockets of its own: Responder.Answer takes a connection
// whose ClientHello was already read, and replays those bytes into
// crypto/tls.
package alpncert

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// maxNameLen is the longest DNS name (RFC 1035); an ip6.arpa name, the
// longest reverse name, is 72 bytes.
const maxNameLen = 253

// FileBase maps the server name a validator sent (SNI) to the base of
// its certificate files in the directory. A DNS name maps to itself,
// lower-cased; a reverse-DNS name (4.3.2.1.in-addr.arpa, the nibble
// form under ip6.arpa) to the address it names, as dehydrated and uacme
// name an IP identifier. Anything else is refused before it can reach
// the file system: empty, too long, or with a byte outside [a-z0-9-_.]
// (so no "/"), or an empty label (so no "..").
func FileBase(serverName string) (string, error) {
	name, err := checkDNSName(serverName)
	if err != nil {
		return "", err
	}
	if a, ok, err := reverseName(name); ok {
		if err != nil {
			return "", err
		}
		return a.String(), nil
	}
	return name, nil
}

// IdentFileBase maps an ACME identifier value, a DNS name or an IP
// address, to the base of its certificate files, as FileBase maps the
// server name a validator sends for it.
func IdentFileBase(ident string) (string, error) {
	if a, err := netip.ParseAddr(ident); err == nil {
		if a.Zone() != "" {
			return "", fmt.Errorf("identifier %q: an address with a zone is not an ACME identifier", ident)
		}
		return a.Unmap().String(), nil
	}
	name, err := checkDNSName(ident)
	if err != nil {
		return "", err
	}
	if _, ok, _ := reverseName(name); ok {
		return "", fmt.Errorf("identifier %q: a reverse-DNS name is not an ACME identifier (give the address)", ident)
	}
	return name, nil
}

var errEmptyName = errors.New("empty name")

// checkDNSName returns name lower-cased if it is a plausible DNS name.
func checkDNSName(name string) (string, error) {
	switch {
	case name == "":
		return "", errEmptyName
	case len(name) > maxNameLen:
		return "", fmt.Errorf("name of %d bytes: longer than %d", len(name), maxNameLen)
	}
	label := 0
	for i := 0; i < len(name); i++ {
		b := name[i]
		switch {
		case b == '.':
			if label == 0 {
				return "", fmt.Errorf("name %q: empty label", name)
			}
			label = 0
			continue
		case 'a' <= b && b <= 'z', 'A' <= b && b <= 'Z', '0' <= b && b <= '9', b == '-', b == '_':
		default:
			return "", fmt.Errorf("name %q: byte %q not allowed in a host name", name, b)
		}
		if label++; label > 63 {
			return "", fmt.Errorf("name %q: label longer than 63 bytes", name)
		}
	}
	if label == 0 {
		return "", fmt.Errorf("name %q: empty label", name)
	}
	return strings.ToLower(name), nil
}

// reverseName parses a lower-case in-addr.arpa or ip6.arpa name. ok says
// whether name is under one of them; err whether it is malformed there.
func reverseName(name string) (a netip.Addr, ok bool, err error) {
	if rest, found := strings.CutSuffix(name, ".in-addr.arpa"); found {
		labels := strings.Split(rest, ".")
		if len(labels) != 4 {
			return a, true, fmt.Errorf("reverse name %q: want 4 labels before in-addr.arpa", name)
		}
		var b [4]byte
		for i, l := range labels {
			n, err := strconv.ParseUint(l, 10, 8)
			if err != nil || (len(l) > 1 && l[0] == '0') {
				return a, true, fmt.Errorf("reverse name %q: label %q is not an octet", name, l)
			}
			b[3-i] = byte(n)
		}
		return netip.AddrFrom4(b), true, nil
	}
	if rest, found := strings.CutSuffix(name, ".ip6.arpa"); found {
		labels := strings.Split(rest, ".")
		if len(labels) != 32 {
			return a, true, fmt.Errorf("reverse name %q: want 32 nibbles before ip6.arpa", name)
		}
		var b [16]byte
		for i, l := range labels {
			n, err := strconv.ParseUint(l, 16, 4)
			if err != nil || len(l) != 1 {
				return a, true, fmt.Errorf("reverse name %q: label %q is not a hex nibble", name, l)
			}
			pos := 31 - i // labels run from the last nibble to the first
			b[pos/2] |= byte(n) << (4 * (1 - pos%2))
		}
		return netip.AddrFrom16(b), true, nil
	}
	return a, false, nil
}

// ReverseName is the server name a validator sends for an IP identifier
// (RFC 8738, section 6).
func ReverseName(a netip.Addr) string {
	a = a.Unmap()
	var sb strings.Builder
	if a.Is4() {
		b := a.As4()
		for i := 3; i >= 0; i-- {
			sb.WriteString(strconv.Itoa(int(b[i])))
			sb.WriteByte('.')
		}
		sb.WriteString("in-addr.arpa")
		return sb.String()
	}
	b := a.As16()
	const hex = "0123456789abcdef"
	for i := 15; i >= 0; i-- {
		sb.WriteByte(hex[b[i]&0xf])
		sb.WriteByte('.')
		sb.WriteByte(hex[b[i]>>4])
		sb.WriteByte('.')
	}
	sb.WriteString("ip6.arpa")
	return sb.String()
}

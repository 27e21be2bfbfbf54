package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/internal/hellotest"
)

// clientHello returns the record bytes of a real crypto/tls ClientHello
// offering the given ALPN protocols, so proxies parse what browsers and ACME
// servers send rather than a hand-made minimal hello.
func clientHello(serverName string, alpn []string) ([]byte, error) {
	return hellotest.For(serverName, alpn)
}

// maxHelloBytes bounds how much a reader accepts as a ClientHello.
const maxHelloBytes = 64 << 10

// readHello reads whole TLS handshake records from r until they hold one
// complete handshake message, and returns the raw record bytes (to forward
// unchanged) and the handshake message (to parse). It reads exactly the
// records and never past them, so bytes the client sent after its hello stay
// in the socket for the relay.
func readHello(r io.Reader) (raw, msg []byte, err error) {
	var hdr [5]byte
	for {
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return raw, nil, fmt.Errorf("reading record header: %w", err)
		}
		if hdr[0] != 22 {
			return raw, nil, fmt.Errorf("record type %d is not handshake", hdr[0])
		}
		n := int(binary.BigEndian.Uint16(hdr[3:5]))
		if n == 0 || len(raw)+5+n > maxHelloBytes {
			return raw, nil, fmt.Errorf("bad record length %d", n)
		}
		start := len(raw)
		raw = append(raw, hdr[:]...)
		raw = append(raw, make([]byte, n)...)
		if _, err := io.ReadFull(r, raw[start+5:]); err != nil {
			return raw, nil, fmt.Errorf("reading record body: %w", err)
		}
		msg = append(msg, raw[start+5:]...)
		if len(msg) >= 4 {
			want := 4 + (int(msg[1])<<16 | int(msg[2])<<8 | int(msg[3]))
			if want > maxHelloBytes {
				return raw, nil, fmt.Errorf("handshake length %d too large", want)
			}
			if len(msg) >= want {
				return raw, msg[:want], nil
			}
		}
	}
}

// helloALPN returns the ALPN protocols a ClientHello handshake message
// offers (nil when it has no ALPN extension).
func helloALPN(msg []byte) ([]string, error) {
	errShort := errors.New("ClientHello truncated")
	if len(msg) < 4 || msg[0] != 1 {
		return nil, errors.New("not a ClientHello")
	}
	b := msg[4:]
	skip := func(n int) bool {
		if n > len(b) {
			return false
		}
		b = b[n:]
		return true
	}
	vec := func(lenBytes int) ([]byte, bool) {
		if len(b) < lenBytes {
			return nil, false
		}
		n := 0
		for i := 0; i < lenBytes; i++ {
			n = n<<8 | int(b[i])
		}
		b = b[lenBytes:]
		if n > len(b) {
			return nil, false
		}
		v := b[:n]
		b = b[n:]
		return v, true
	}
	if !skip(2 + 32) { // legacy_version, random
		return nil, errShort
	}
	if _, ok := vec(1); !ok { // session id
		return nil, errShort
	}
	if _, ok := vec(2); !ok { // cipher suites
		return nil, errShort
	}
	if _, ok := vec(1); !ok { // compression methods
		return nil, errShort
	}
	if len(b) == 0 {
		return nil, nil // no extensions
	}
	exts, ok := vec(2)
	if !ok {
		return nil, errShort
	}
	b = exts
	for len(b) > 0 {
		if len(b) < 2 {
			return nil, errShort
		}
		typ := binary.BigEndian.Uint16(b)
		b = b[2:]
		data, ok := vec(2)
		if !ok {
			return nil, errShort
		}
		if typ != 16 {
			continue
		}
		b = data
		list, ok := vec(2)
		if !ok {
			return nil, errShort
		}
		var protos []string
		b = list
		for len(b) > 0 {
			p, ok := vec(1)
			if !ok || len(p) == 0 {
				return nil, errors.New("bad ALPN extension")
			}
			protos = append(protos, string(p))
		}
		return protos, nil
	}
	return nil, nil
}

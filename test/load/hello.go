package main

import (
	"errors"
	"fmt"
	"io"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/internal/hellotest"
)

// clientHello returns the record bytes of a real crypto/tls ClientHello
// (with Go's default post-quantum key share, ~1.5 KB), so the proxy parses
// what real clients send.
func clientHello(serverName string, alpn []string) []byte {
	b, err := hellotest.For(serverName, alpn)
	if err != nil {
		panic(err)
	}
	return b
}

const (
	recordHandshake = 22
	maxHelloBytes   = 64 << 10
)

// readHello reads whole TLS records from r until they carry one complete
// handshake message, and never reads past them: what follows the hello is
// the client's command byte.
func readHello(r io.Reader) (int, error) {
	var hdr [5]byte
	var hs []byte
	total := 0
	for {
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return total, fmt.Errorf("record header: %w", err)
		}
		if hdr[0] != recordHandshake {
			return total, fmt.Errorf("record type %d, want handshake", hdr[0])
		}
		n := int(hdr[3])<<8 | int(hdr[4])
		if total += 5 + n; total > maxHelloBytes {
			return total, errors.New("hello too large")
		}
		body := make([]byte, n)
		if _, err := io.ReadFull(r, body); err != nil {
			return total, fmt.Errorf("record body: %w", err)
		}
		hs = append(hs, body...)
		if len(hs) >= 4 && len(hs) >= 4+(int(hs[1])<<16|int(hs[2])<<8|int(hs[3])) {
			return total, nil
		}
	}
}

package main

import (
	"fmt"
	"net"
	"os"
	"time"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/alpncert"
	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/relay"
)

// How a connection answered by the built-in responder ended, in its log
// line's end= (err= says why a handshake failed).
const (
	endAnswered         = "challenge answered"
	endHandshakeFailed  = "handshake failed"
	endHandshakeTimeout = "handshake timeout"
)

// answerBuiltin is the engine's Takeover: with -alpn-certs, Route hands
// it the connections that offer acme-tls/1, and the TLS handshake with
// the challenge certificate runs here, off the event loop, bounded by
// -hello-timeout. The engine counts the connection until Finish, so stop
// drains it like a relayed one.
func (p *proxy) answerBuiltin(c *relay.Conn, client net.Conn, hello []byte) {
	go func() {
		res := p.builtin.Answer(client, hello, time.Now().Add(p.handshake))
		c.Up, c.Down, c.Note = res.Up, res.Down, res.Cert
		end := endAnswered
		switch {
		case res.TimedOut:
			end = endHandshakeTimeout
		case res.Err != nil:
			end = endHandshakeFailed
		}
		c.Finish(end, res.Err)
	}()
}

// builtinResponder is the -alpn-certs responder, nil without the flag.
// The directory is made (0700) if missing: the ACME client may create
// its first certificate only after the proxy is up.
func builtinResponder(cfg config) (*alpncert.Responder, error) {
	if cfg.alpnCerts == "" {
		return nil, nil
	}
	if err := os.MkdirAll(cfg.alpnCerts, 0o700); err != nil {
		return nil, fmt.Errorf("-alpn-certs: %w", err)
	}
	return alpncert.NewResponder(cfg.alpnCerts), nil
}

// alpnName says who answers acme-tls/1, for the log.
func alpnName(cfg config) string {
	if cfg.alpnCerts != "" {
		return "built-in:" + cfg.alpnCerts
	}
	return cfg.alpn
}

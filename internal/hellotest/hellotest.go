// Package hellotest captures real TLS ClientHellos for tests and the load
// tools: crypto/tls writes them (post-quantum key share included), so the
// proxy is exercised with what real clients send, not a hand-made minimum.
package hellotest

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"time"
)

// Capture returns the TLS record bytes of the ClientHello crypto/tls sends
// with cfg (InsecureSkipVerify is irrelevant: no server ever answers).
func Capture(cfg *tls.Config) ([]byte, error) {
	c := &captureConn{}
	if err := tls.Client(c, cfg).Handshake(); !errors.Is(err, errCaptured) || len(c.out) == 0 {
		return nil, fmt.Errorf("capturing ClientHello: %v", err)
	}
	return c.out, nil
}

// For is Capture for a server name and ALPN list.
func For(serverName string, alpn []string) ([]byte, error) {
	return Capture(&tls.Config{ServerName: serverName, NextProtos: alpn})
}

var errCaptured = errors.New("hello captured")

// captureConn records what crypto/tls writes and fails the first read, so
// the handshake ends right after the ClientHello.
type captureConn struct {
	net.Conn
	out []byte
}

func (c *captureConn) Write(p []byte) (int, error)      { c.out = append(c.out, p...); return len(p), nil }
func (c *captureConn) Read([]byte) (int, error)         { return 0, errCaptured }
func (c *captureConn) Close() error                     { return nil }
func (c *captureConn) SetDeadline(time.Time) error      { return nil }
func (c *captureConn) SetReadDeadline(time.Time) error  { return nil }
func (c *captureConn) SetWriteDeadline(time.Time) error { return nil }

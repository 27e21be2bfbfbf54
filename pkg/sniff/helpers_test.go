package sniff

import (
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"slices"
	"testing"
	"time"
)

// helloCase is a ClientHello as crypto/tls writes it, with what it says.
type helloCase struct {
	name       string
	serverName string
	alpn       []string
	classic    bool // X25519 only, no post-quantum key share
	raw        []byte
}

// cryptoTLSHellos returns ClientHellos written by crypto/tls for the
// combinations a router has to tell apart.
func cryptoTLSHellos(tb testing.TB) []helloCase {
	tb.Helper()
	alpns := []struct {
		name  string
		proto []string
	}{
		{"no-alpn", nil},
		{"h2-http1", []string{"h2", "http/1.1"}},
		{"acme", []string{ACMEProtocol}},
		{"h2-acme-http1", []string{"h2", ACMEProtocol, "http/1.1"}},
		{"unusual", []string{"spdy/3", "x-custom-proto"}},
	}
	var cases []helloCase
	for _, a := range alpns {
		for _, sni := range []string{"", "www.example.org"} {
			for _, classic := range []bool{false, true} {
				c := helloCase{serverName: sni, alpn: a.proto, classic: classic}
				c.name = a.name
				if sni == "" {
					c.name += "/no-sni"
				} else {
					c.name += "/sni"
				}
				if classic {
					c.name += "/classic"
				} else {
					c.name += "/pq"
				}
				cfg := &tls.Config{ServerName: sni, NextProtos: a.proto, InsecureSkipVerify: sni == ""}
				if classic {
					cfg.CurvePreferences = []tls.CurveID{tls.X25519}
				}
				c.raw = captureClientHello(tb, cfg)
				cases = append(cases, c)
			}
		}
	}
	return cases
}

// captureClientHello runs a crypto/tls client against a conn that records
// what it writes and answers nothing, and returns the bytes of its first
// flight: the ClientHello records.
func captureClientHello(tb testing.TB, cfg *tls.Config) []byte {
	tb.Helper()
	conn := &recordingConn{}
	err := tls.Client(conn, cfg).Handshake()
	if err == nil {
		tb.Fatal("handshake against a silent peer succeeded")
	}
	if conn.written.Len() == 0 {
		tb.Fatalf("crypto/tls wrote no ClientHello: %v", err)
	}
	return conn.written.Bytes()
}

// recordingConn is a net.Conn whose peer never says anything.
type recordingConn struct{ written bytes.Buffer }

func (c *recordingConn) Read([]byte) (int, error)         { return 0, io.EOF }
func (c *recordingConn) Write(p []byte) (int, error)      { return c.written.Write(p) }
func (c *recordingConn) Close() error                     { return nil }
func (c *recordingConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (c *recordingConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (c *recordingConn) SetDeadline(time.Time) error      { return nil }
func (c *recordingConn) SetReadDeadline(time.Time) error  { return nil }
func (c *recordingConn) SetWriteDeadline(time.Time) error { return nil }

// handshakeBytes concatenates the bodies of the TLS records in stream.
func handshakeBytes(tb testing.TB, stream []byte) []byte {
	tb.Helper()
	var msg []byte
	for len(stream) > 0 {
		if len(stream) < recordHeaderLen || stream[0] != recordTypeHandshake {
			tb.Fatalf("not a handshake record stream: % x", stream[:min(len(stream), 8)])
		}
		n := int(stream[3])<<8 | int(stream[4])
		msg = append(msg, stream[recordHeaderLen:recordHeaderLen+n]...)
		stream = stream[recordHeaderLen+n:]
	}
	return msg
}

// frame splits a handshake byte string into records of at most size
// bytes, as a client is allowed to (RFC 8446 §5.1).
func frame(msg []byte, size int) []byte {
	var out []byte
	for chunk := range slices.Chunk(msg, size) {
		out = append(out, recordTypeHandshake, 3, 1, byte(len(chunk)>>8), byte(len(chunk)))
		out = append(out, chunk...)
	}
	return out
}

// segmentReader returns at most a few bytes per Read, like a slow client
// whose hello arrives in many small TCP segments.
type segmentReader struct {
	r   io.Reader
	rng *rand.Rand
	max int
}

func (s *segmentReader) Read(p []byte) (int, error) {
	n := 1 + s.rng.IntN(s.max)
	return s.r.Read(p[:min(n, len(p))])
}

// firstByteOnlyReader hands out one byte, then fails the test on any
// further Read: it stands for a client that waits for the server to speak.
type firstByteOnlyReader struct {
	t     *testing.T
	b     byte
	reads int
}

func (r *firstByteOnlyReader) Read(p []byte) (int, error) {
	r.reads++
	if r.reads > 1 {
		r.t.Errorf("Read called %d times; the first byte should have decided", r.reads)
		return 0, errors.New("client is waiting for the server")
	}
	if len(p) != 1 {
		r.t.Errorf("first Read asked for %d bytes, want exactly 1", len(p))
	}
	p[0] = r.b
	return 1, nil
}

// checkHello asserts h is a Complete parse of c with Raw == want.
func checkHello(t *testing.T, h *Hello, err error, c helloCase, want []byte) {
	t.Helper()
	if err != nil {
		t.Fatalf("Read error: %v", err)
	}
	if h.Kind != Complete {
		t.Fatalf("Kind = %v (%s), want complete", h.Kind, h.Reason)
	}
	if !bytes.Equal(h.Raw, want) {
		t.Fatalf("Raw differs from the input: got %d bytes, want %d", len(h.Raw), len(want))
	}
	if h.ServerName != c.serverName {
		t.Errorf("ServerName = %q, want %q", h.ServerName, c.serverName)
	}
	if !slices.Equal(h.ALPN, c.alpn) {
		t.Errorf("ALPN = %q, want %q", h.ALPN, c.alpn)
	}
	if got, want := h.OffersACME(), slices.Contains(c.alpn, ACMEProtocol); got != want {
		t.Errorf("OffersACME() = %v, want %v", got, want)
	}
}

package sniff

import (
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"slices"
	"testing"
	"testing/iotest"
	"time"
)

// FuzzRead checks the properties a router relies on for any input:
// a result always comes back, Raw is exactly a prefix of the stream, the
// outcome does not depend on how the stream is segmented, and whenever
// crypto/tls also accepts the ClientHello, both see the same SNI and ALPN.
func FuzzRead(f *testing.F) {
	for _, c := range cryptoTLSHellos(f) {
		f.Add(c.raw)
		f.Add(frame(handshakeBytes(f, c.raw), 100))
	}
	f.Add([]byte("GET / HTTP/1.1\r\n"))
	f.Add(buildHello(helloSpec{extra: [][]byte{alpnExt("h2"), alpnExt(ACMEProtocol)}}))
	f.Fuzz(func(t *testing.T, data []byte) {
		checkReadInvariants(t, data)
	})
}

func checkReadInvariants(t *testing.T, data []byte) {
	h, err := Read(bytes.NewReader(data))
	if h == nil {
		t.Fatal("nil Hello")
	}
	defer h.Release()
	if !bytes.HasPrefix(data, h.Raw) {
		t.Fatalf("Raw (%d bytes) is not a prefix of the input", len(h.Raw))
	}
	if len(h.Raw) > MaxHelloSize {
		t.Fatalf("consumed %d bytes, over MaxHelloSize", len(h.Raw))
	}
	if (err != nil) != (h.Kind == Truncated) {
		t.Fatalf("Kind %v with error %v: only a truncated read carries an error", h.Kind, err)
	}
	if h.Kind != Complete && (h.ServerName != "" || h.ALPN != nil) {
		t.Fatalf("Kind %v yet SNI %q ALPN %q", h.Kind, h.ServerName, h.ALPN)
	}
	if h.Kind != Complete && h.Reason == "" {
		t.Fatalf("Kind %v without a reason", h.Kind)
	}

	// Segmentation must not matter: one byte per read gives the same.
	h1, err1 := Read(iotest.OneByteReader(bytes.NewReader(data)))
	defer h1.Release()
	if h1.Kind != h.Kind || !bytes.Equal(h1.Raw, h.Raw) || h1.ServerName != h.ServerName ||
		!slices.Equal(h1.ALPN, h.ALPN) || (err1 == nil) != (err == nil) {
		t.Fatalf("one-byte reads: Kind %v, %d bytes, SNI %q, ALPN %q, err %v; whole: Kind %v, %d bytes, SNI %q, ALPN %q, err %v",
			h1.Kind, len(h1.Raw), h1.ServerName, h1.ALPN, err1, h.Kind, len(h.Raw), h.ServerName, h.ALPN, err)
	}

	checkScanAgrees(t, data, h, err)

	if h.Kind != Complete {
		return
	}
	// Reading back exactly Raw must reproduce the same facts.
	h2, err2 := Read(bytes.NewReader(h.Raw))
	defer h2.Release()
	if err2 != nil || h2.Kind != Complete || len(h2.Raw) != len(h.Raw) || h2.ServerName != h.ServerName || !slices.Equal(h2.ALPN, h.ALPN) {
		t.Fatalf("re-reading Raw gave Kind %v (%s), err %v", h2.Kind, h2.Reason, err2)
	}

	if info, ok := cryptoTLSAccepts(h.Raw); ok {
		alpn := nilIfEmpty(info.SupportedProtos)
		if info.ServerName != h.ServerName || !slices.Equal(alpn, h.ALPN) {
			t.Fatalf("crypto/tls sees SNI %q ALPN %q, we see %q %q", info.ServerName, alpn, h.ServerName, h.ALPN)
		}
	}
}

// checkScanAgrees feeds data to Scan the way an event loop would, in
// reads of varying size that may run past the hello, and wants Read's
// verdict: same Kind and facts, decided by the time Read's bytes are in.
func checkScanAgrees(t *testing.T, data []byte, want *Hello, readErr error) {
	t.Helper()
	for _, chunk := range []int{1, 7, 4096, len(data) + 1} {
		h := New()
		final := false
		for off := 0; off < len(data) && !final; {
			n := min(chunk, len(data)-off)
			h.Raw = append(h.Raw, data[off:off+n]...)
			off += n
			final = h.Scan()
			if !final && off >= len(want.Raw) && readErr == nil {
				t.Fatalf("chunk %d: Scan still undecided after %d bytes; Read decided %v after %d", chunk, off, want.Kind, len(want.Raw))
			}
		}
		if final != (readErr == nil) {
			t.Fatalf("chunk %d: Scan final=%v, Read err=%v", chunk, final, readErr)
		}
		if h.Kind != want.Kind || h.ServerName != want.ServerName || !slices.Equal(h.ALPN, want.ALPN) {
			t.Fatalf("chunk %d: Scan gives Kind %v SNI %q ALPN %q; Read gives %v %q %q",
				chunk, h.Kind, h.ServerName, h.ALPN, want.Kind, want.ServerName, want.ALPN)
		}
		h.Release()
	}
}

func nilIfEmpty(s []string) []string {
	if len(s) == 0 {
		return nil
	}
	return s
}

var errSeenHello = errors.New("seen ClientHello")

// cryptoTLSAccepts runs a crypto/tls server on stream and reports the
// ClientHello it parsed, if it got that far.
func cryptoTLSAccepts(stream []byte) (*tls.ClientHelloInfo, bool) {
	var seen *tls.ClientHelloInfo
	cfg := &tls.Config{GetConfigForClient: func(chi *tls.ClientHelloInfo) (*tls.Config, error) {
		seen = chi
		return nil, errSeenHello
	}}
	_ = tls.Server(&replayConn{r: bytes.NewReader(stream)}, cfg).Handshake()
	return seen, seen != nil
}

// replayConn plays back a client's bytes and discards the server's.
type replayConn struct{ r io.Reader }

func (c *replayConn) Read(p []byte) (int, error)       { return c.r.Read(p) }
func (c *replayConn) Write(p []byte) (int, error)      { return len(p), nil }
func (c *replayConn) Close() error                     { return nil }
func (c *replayConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (c *replayConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (c *replayConn) SetDeadline(time.Time) error      { return nil }
func (c *replayConn) SetReadDeadline(time.Time) error  { return nil }
func (c *replayConn) SetWriteDeadline(time.Time) error { return nil }

// Every crypto/tls hello must agree with crypto/tls's own server, and so
// must every single-byte corruption of one that either side still accepts.
func TestReadCorruptedHellos(t *testing.T) {
	hellos := []helloCase{}
	for _, c := range cryptoTLSHellos(t) {
		if c.classic && c.serverName != "" { // a representative subset keeps this quick
			hellos = append(hellos, c)
		}
	}
	for _, c := range hellos {
		info, ok := cryptoTLSAccepts(c.raw)
		if !ok || info.ServerName != c.serverName || !slices.Equal(nilIfEmpty(info.SupportedProtos), c.alpn) {
			t.Fatalf("%s: crypto/tls server did not accept its own client's hello", c.name)
		}
		for _, stream := range [][]byte{c.raw, frame(handshakeBytes(t, c.raw), 150)} {
			for i := range stream {
				for _, v := range []byte{0, 0xff, stream[i] ^ 1, stream[i] + 1} {
					if v == stream[i] {
						continue
					}
					mutated := bytes.Clone(stream)
					mutated[i] = v
					checkReadInvariants(t, mutated)
				}
			}
		}
	}
}

// Length fields are where a lenient parser goes wrong. Shrinking the record
// or changing the handshake or extension-block length must stop a Complete
// result; growing the record only pulls following bytes into the record
// that completes the hello, which Read consumes whole.
func TestReadCorruptedLengths(t *testing.T) {
	hello := captureClientHello(t, &tls.Config{ServerName: "example.org", NextProtos: []string{ACMEProtocol}, CurvePreferences: []tls.CurveID{tls.X25519}})
	// Record length at 3-4, handshake length at 6-8; the extension block
	// length follows session id, cipher suites and compression methods.
	sid := 5 + 4 + 2 + 32
	suites := sid + 1 + int(hello[sid])
	comp := suites + 2 + (int(hello[suites])<<8 | int(hello[suites+1]))
	extLen := comp + 1 + int(hello[comp])
	if extLen+2+(int(hello[extLen])<<8|int(hello[extLen+1])) != len(hello) {
		t.Fatal("test bug: extension block offset")
	}
	trailer := bytes.Repeat([]byte{22, 3, 3, 0, 8}, 100) // later bytes must not rescue it
	for _, at := range []int{3, 4, 6, 7, 8, extLen, extLen + 1} {
		for _, delta := range []int{-1, 1, -0x11, 0x80} {
			mutated := append(bytes.Clone(hello), trailer...)
			mutated[at] = byte(int(mutated[at]) + delta)
			h, err := Read(bytes.NewReader(mutated))
			if !bytes.HasPrefix(mutated, h.Raw) || (err != nil) != (h.Kind == Truncated) {
				t.Errorf("length byte %d changed by %d: Kind %v err %v, %d bytes", at, delta, h.Kind, err, len(h.Raw))
			}
			recordLen := int(mutated[3])<<8 | int(mutated[4])
			if at <= 4 && recordLen > len(hello)-5 && recordLen <= maxRecordBody {
				if h.Kind != Complete || len(h.Raw) != 5+recordLen || !h.OffersACME() {
					t.Errorf("record grown to %d bytes: Kind %v (%s), %d bytes consumed; want complete, the whole record", recordLen, h.Kind, h.Reason, len(h.Raw))
				}
			} else if h.Kind == Complete {
				t.Errorf("length byte %d changed by %d: still complete (SNI %q ALPN %q)", at, delta, h.ServerName, h.ALPN)
			}
			h.Release()
		}
	}
}

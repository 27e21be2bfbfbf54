package sniff

import (
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"testing"
	"testing/iotest"
)

func TestReadCryptoTLSHellos(t *testing.T) {
	readers := []struct {
		name string
		wrap func(io.Reader, int) io.Reader
	}{
		{"whole", func(r io.Reader, _ int) io.Reader { return r }},
		{"one-byte-reads", func(r io.Reader, _ int) io.Reader { return iotest.OneByteReader(r) }},
		{"random-segments", func(r io.Reader, seed int) io.Reader {
			return &segmentReader{r: r, rng: rand.New(rand.NewPCG(uint64(seed), 7)), max: 40}
		}},
	}
	for i, c := range cryptoTLSHellos(t) {
		msg := handshakeBytes(t, c.raw)
		framings := map[string][]byte{
			"as-written":     c.raw,
			"100-byte-recs":  frame(msg, 100),
			"1-byte-recs":    frame(msg, 1),
			"max-size-recs":  frame(msg, 1<<14),
			"uneven-records": frame(msg, 333),
		}
		for fname, stream := range framings {
			for _, rd := range readers {
				t.Run(c.name+"/"+fname+"/"+rd.name, func(t *testing.T) {
					h, err := Read(rd.wrap(bytes.NewReader(stream), i))
					defer h.Release()
					checkHello(t, h, err, c, stream)
				})
			}
		}
	}
}

// The motivating size: Go's default key shares include
// X25519MLKEM768, whose 1184-byte encapsulation key makes the hello span
// more than a typical first read, yet it must fit our limits.
func TestReadPostQuantumHelloSize(t *testing.T) {
	pq := captureClientHello(t, &tls.Config{ServerName: "example.org"})
	classic := captureClientHello(t, &tls.Config{ServerName: "example.org", CurvePreferences: []tls.CurveID{tls.X25519}})
	if len(pq) < 1400 || len(pq) > 2500 {
		t.Errorf("default crypto/tls ClientHello is %d bytes; expected 1.4–2.5 KB with an ML-KEM key share", len(pq))
	}
	if len(classic) > 1024 {
		t.Errorf("classic X25519-only ClientHello is %d bytes; expected under 1 KB", len(classic))
	}
	for _, stream := range [][]byte{pq, classic} {
		h, err := Read(iotest.OneByteReader(bytes.NewReader(stream)))
		if err != nil || h.Kind != Complete || !bytes.Equal(h.Raw, stream) {
			t.Errorf("%d-byte hello: Kind %v (%s), err %v, %d bytes consumed", len(stream), h.Kind, h.Reason, err, len(h.Raw))
		}
		h.Release()
	}
	t.Logf("ClientHello sizes: post-quantum %d bytes, classic %d bytes", len(pq), len(classic))
}

// Whatever follows the ClientHello (0-RTT data, a second flight) belongs
// to the backend: Read must leave it in the reader.
func TestReadStopsAtEndOfHelloRecord(t *testing.T) {
	hello := captureClientHello(t, &tls.Config{ServerName: "example.org", NextProtos: []string{ACMEProtocol}})
	msg := handshakeBytes(t, hello)
	earlyData := []byte{23, 3, 3, 0, 4, 'a', 'b', 'c', 'd'}

	// A record may carry bytes past the end of the ClientHello; the whole
	// record is consumed, nothing after it.
	withTrailing := append(bytes.Clone(msg), 0xde, 0xad)
	lastRecordLonger := frame(withTrailing, 500)

	for name, stream := range map[string][]byte{
		"single-record":          hello,
		"multi-record":           frame(msg, 100),
		"hello-ends-mid-record":  lastRecordLonger,
		"hello-ends-at-boundary": frame(msg, len(msg)/2),
	} {
		t.Run(name, func(t *testing.T) {
			r := bytes.NewReader(append(bytes.Clone(stream), earlyData...))
			h, err := Read(iotest.OneByteReader(r))
			if err != nil || h.Kind != Complete {
				t.Fatalf("Kind %v (%s), err %v", h.Kind, h.Reason, err)
			}
			if !bytes.Equal(h.Raw, stream) {
				t.Errorf("consumed %d bytes, want exactly the %d bytes of the hello records", len(h.Raw), len(stream))
			}
			rest, _ := io.ReadAll(r)
			if !bytes.Equal(rest, earlyData) {
				t.Errorf("bytes left in the reader = % x, want the untouched early data % x", rest, earlyData)
			}
			if !h.OffersACME() || h.ServerName != "example.org" {
				t.Errorf("ALPN %q, SNI %q", h.ALPN, h.ServerName)
			}
			h.Release()
		})
	}
}

func TestReadNotTLSDecidesOnFirstByte(t *testing.T) {
	for _, first := range []byte{'G', 'P', 'S', 0x80, 0x15, 0x17, 0} {
		r := &firstByteOnlyReader{t: t, b: first}
		h, err := Read(r)
		if err != nil {
			t.Errorf("first byte %#x: error %v", first, err)
		}
		if h.Kind != NotTLS || !bytes.Equal(h.Raw, []byte{first}) {
			t.Errorf("first byte %#x: Kind %v, Raw % x; want not TLS with that one byte", first, h.Kind, h.Raw)
		}
		if h.OffersACME() {
			t.Errorf("first byte %#x: OffersACME on a non-TLS stream", first)
		}
		h.Release()
	}
}

// A record header that cannot start a TLS handshake ends the sniff right
// there, before waiting for any body bytes.
func TestReadStopsAtBadRecordHeader(t *testing.T) {
	hello := captureClientHello(t, &tls.Config{ServerName: "example.org"})
	msg := handshakeBytes(t, hello)
	firstRecord := frame(msg[:50], 50)
	cases := []struct {
		name   string
		stream []byte
		want   Kind
		used   int
	}{
		{"version-major-2", []byte{22, 2, 0, 0, 10}, NotTLS, 5},
		{"version-major-0x16", []byte{22, 0x16, 3, 0, 10}, NotTLS, 5},
		{"zero-length", []byte{22, 3, 1, 0, 0}, NotTLS, 5},
		{"length-over-limit", []byte{22, 3, 1, 0x41, 0x01}, NotTLS, 5},
		{"second-record-is-alert", append(bytes.Clone(firstRecord), 21, 3, 1, 0, 2), Malformed, len(firstRecord) + 5},
		{"second-record-zero-length", append(bytes.Clone(firstRecord), 22, 3, 1, 0, 0), Malformed, len(firstRecord) + 5},
		{"second-record-bad-version", append(bytes.Clone(firstRecord), 22, 4, 1, 0, 9), Malformed, len(firstRecord) + 5},
		{"not-a-client-hello", frame([]byte{2, 0, 0, 3, 1, 2, 3}, 100), Malformed, 12},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			// Anything after the header would block a real connection;
			// here it would fail the reader.
			r := io.MultiReader(bytes.NewReader(c.stream), iotest.ErrReader(errors.New("read past the decisive header")))
			h, err := Read(r)
			if err != nil {
				t.Fatalf("error %v; Read should have stopped before asking for more", err)
			}
			if h.Kind != c.want || len(h.Raw) != c.used || !bytes.Equal(h.Raw, c.stream[:c.used]) {
				t.Errorf("Kind %v (%s), %d bytes; want %v after %d bytes", h.Kind, h.Reason, len(h.Raw), c.want, c.used)
			}
			h.Release()
		})
	}
}

// Every prefix of a real hello is what a client that hangs up, or a read
// deadline, leaves us with: the bytes must survive and the Kind must say so.
func TestReadTruncatedAtEveryLength(t *testing.T) {
	hello := captureClientHello(t, &tls.Config{ServerName: "example.org", NextProtos: []string{"h2", ACMEProtocol}})
	for name, stream := range map[string][]byte{
		"single-record": hello,
		"multi-record":  frame(handshakeBytes(t, hello), 97),
	} {
		for n := range len(stream) {
			h, err := Read(bytes.NewReader(stream[:n]))
			wantErr := io.ErrUnexpectedEOF
			if n == 0 {
				wantErr = io.EOF
			}
			if !errors.Is(err, wantErr) {
				t.Fatalf("%s prefix %d: error %v, want %v", name, n, err, wantErr)
			}
			if h.Kind != Truncated || !bytes.Equal(h.Raw, stream[:n]) || h.OffersACME() {
				t.Fatalf("%s prefix %d: Kind %v, %d bytes, ACME %v; want truncated with the prefix", name, n, h.Kind, len(h.Raw), h.OffersACME())
			}
			h.Release()
		}
	}
}

// A read deadline is the caller's way to bound a slow client; its error
// must come back as is, with the bytes that did arrive.
func TestReadReturnsReaderErrorWithBytes(t *testing.T) {
	hello := captureClientHello(t, &tls.Config{ServerName: "example.org"})
	r := io.MultiReader(bytes.NewReader(hello[:300]), iotest.ErrReader(os.ErrDeadlineExceeded))
	h, err := Read(r)
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("error %v, want the deadline error", err)
	}
	if h == nil {
		t.Fatal("nil Hello alongside a read error")
	}
	if h.Kind != Truncated || !bytes.Equal(h.Raw, hello[:300]) {
		t.Errorf("Kind %v, %d bytes; want truncated with the 300 bytes that arrived", h.Kind, len(h.Raw))
	}
}

func TestReadTooLarge(t *testing.T) {
	t.Run("claims-1MiB", func(t *testing.T) {
		// One full record whose handshake header claims a 1 MiB message,
		// followed by an endless supply of records.
		body := make([]byte, 1<<14)
		body[0], body[1], body[2], body[3] = 1, 0x10, 0, 0
		first := frame(body, 1<<14)
		r := io.MultiReader(bytes.NewReader(first), &endlessRecords{})
		h, err := Read(r)
		if err != nil || h.Kind != TooLarge {
			t.Fatalf("Kind %v (%s), err %v; want too large", h.Kind, h.Reason, err)
		}
		if !bytes.Equal(h.Raw, first) {
			t.Errorf("consumed %d bytes, want to stop after the first %d-byte record that revealed the length", len(h.Raw), len(first))
		}
		if cap(h.Raw) > 2*len(first) {
			t.Errorf("buffer grew to %d bytes for a %d-byte read", cap(h.Raw), len(first))
		}
	})
	t.Run("record-overhead", func(t *testing.T) {
		// A message under the limit, sent as 1-byte records: the headers
		// alone would take it over, so Read must stop at the limit.
		msg := make([]byte, 20000)
		msg[0], msg[1], msg[2], msg[3] = 1, 0, byte((len(msg)-4)>>8), byte(len(msg)-4)
		stream := frame(msg, 1)
		h, err := Read(bytes.NewReader(stream))
		if err != nil || h.Kind != TooLarge {
			t.Fatalf("Kind %v (%s), err %v; want too large", h.Kind, h.Reason, err)
		}
		if len(h.Raw) > MaxHelloSize || !bytes.Equal(h.Raw, stream[:len(h.Raw)]) {
			t.Errorf("consumed %d bytes, want a prefix of at most %d", len(h.Raw), MaxHelloSize)
		}
	})
	t.Run("just-under-limit", func(t *testing.T) {
		// The largest accepted hello still parses: a padding extension
		// fills it to MaxHelloSize including four record headers.
		spec := helloSpec{serverName: "big.example", alpn: []string{ACMEProtocol}}
		spec.padding = MaxHelloSize - 4*recordHeaderLen - len(buildHello(spec)) - 4
		msg := buildHello(spec)
		stream := frame(msg, 1<<14)
		if len(stream) != MaxHelloSize {
			t.Fatalf("test bug: stream is %d bytes", len(stream))
		}
		h, err := Read(bytes.NewReader(stream))
		if err != nil || h.Kind != Complete || !h.OffersACME() {
			t.Fatalf("Kind %v (%s), err %v; a hello of exactly MaxHelloSize must be read", h.Kind, h.Reason, err)
		}
		h.Release()
		spec.padding++
		over := frame(buildHello(spec), 1<<14)
		h, err = Read(bytes.NewReader(over))
		if err != nil || h.Kind != TooLarge {
			t.Fatalf("one byte over the limit: Kind %v (%s), err %v", h.Kind, h.Reason, err)
		}
	})
}

// endlessRecords is a client that keeps sending 16 KiB handshake records.
type endlessRecords struct{ pos int }

func (e *endlessRecords) Read(p []byte) (int, error) {
	const size = recordHeaderLen + 1<<14
	for i := range p {
		switch e.pos % size {
		case 0:
			p[i] = recordTypeHandshake
		case 1:
			p[i] = 3
		case 3:
			p[i] = 0x40
		default:
			p[i] = 0
		}
		e.pos++
	}
	return len(p), nil
}

// Release hands buffers to the next Read; results must not bleed into it.
func TestReadAfterReleaseIsIndependent(t *testing.T) {
	acme := captureClientHello(t, &tls.Config{ServerName: "a.example", NextProtos: []string{"h2", ACMEProtocol, "http/1.1", "x-long-protocol"}})
	plain := captureClientHello(t, &tls.Config{InsecureSkipVerify: true, CurvePreferences: []tls.CurveID{tls.X25519}})
	for range 3 {
		h, _ := Read(bytes.NewReader(acme))
		if !h.OffersACME() || h.ServerName != "a.example" || len(h.ALPN) != 4 {
			t.Fatalf("acme hello: SNI %q ALPN %q", h.ServerName, h.ALPN)
		}
		h.Release()
		h.Release() // harmless
		h, _ = Read(bytes.NewReader(plain))
		if h.Kind != Complete || h.OffersACME() || h.ServerName != "" || h.ALPN != nil || !bytes.Equal(h.Raw, plain) {
			t.Fatalf("plain hello after an ACME one: Kind %v SNI %q ALPN %q", h.Kind, h.ServerName, h.ALPN)
		}
		h.Release()
	}
}

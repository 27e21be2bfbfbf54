// Package sniff reads a TLS ClientHello off the front of a byte stream and
// reports what a router needs: the ALPN protocols, the SNI host name, and
// every byte it consumed, so those bytes can be replayed to whichever backend
// is chosen and the backend sees the identical stream.
//
// It does no network I/O of its own and no logging: bytes in, facts out.
// Deadlines are the caller's; Read just returns the reader's error.
//
//	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
//	hello, err := sniff.Read(conn)
//	defer hello.Release() // after the last use of hello.Raw
//	if err != nil {
//		return err // hello.Raw still holds what arrived, if you want to forward it
//	}
//	conn.SetReadDeadline(time.Time{})
//	backend := webServer
//	if hello.Kind == sniff.Complete && hello.OffersACME() {
//		backend = acmeResponder
//	}
//	up, err := net.Dial("tcp", backend)
//	...
//	up.Write(hello.Raw) // first the sniffed bytes, then relay both ways
//
// Read consumes whole TLS records only, and stops at the end of the record
// that completes the ClientHello, so nothing after it (early data, the rest
// of a non-TLS request) is taken off the reader.
//
// An event loop that reads whatever a socket has uses New and Scan
// instead: it appends each read to Raw and asks Scan whether the verdict
// is in; Scan resumes where it stopped, so a hello split into many small
// reads costs no rescanning.
package sniff

import (
	"io"
	"slices"
	"sync"
)

const (
	// ACMEProtocol is the ALPN protocol of the ACME TLS-ALPN-01 challenge
	// (RFC 8737 §6.2).
	ACMEProtocol = "acme-tls/1"

	// MaxHelloSize bounds the bytes Read consumes, record headers included.
	// Post-quantum key shares make real hellos 1.5–2 KB, and crypto/tls
	// refuses handshake messages over 64 KiB anyway.
	MaxHelloSize = 64 << 10
)

// TLS record layer (RFC 8446 §5.1).
const (
	recordHeaderLen     = 5
	recordTypeHandshake = 22
	// maxRecordBody is the largest record length we accept: 2^14 plus the
	// 256 bytes of expansion RFC 8446 allows TLSCiphertext.
	maxRecordBody      = 1<<14 + 256
	handshakeHeaderLen = 4
)

// Kind says how far Read got.
type Kind uint8

const (
	// Truncated: the reader failed or hit EOF before the ClientHello was
	// complete. Read's error says why.
	Truncated Kind = iota
	// Complete: a whole, well-formed ClientHello was read and parsed.
	Complete
	// NotTLS: the stream does not start with a TLS handshake record.
	NotTLS
	// Malformed: the records or the ClientHello inside them are invalid.
	Malformed
	// TooLarge: the ClientHello would exceed MaxHelloSize.
	TooLarge
)

func (k Kind) String() string {
	switch k {
	case Truncated:
		return "truncated"
	case Complete:
		return "complete"
	case NotTLS:
		return "not TLS"
	case Malformed:
		return "malformed"
	case TooLarge:
		return "too large"
	}
	return "unknown"
}

// Hello is the result of Read. ServerName and ALPN are set only when Kind is
// Complete.
type Hello struct {
	// Raw is every byte Read consumed, in order. Forward it before anything
	// else read from the same stream.
	Raw []byte
	// Kind says whether a whole ClientHello was read, and if not, why.
	Kind Kind
	// Reason explains a Kind other than Complete, for logs.
	Reason string
	// ServerName is the SNI host name, "" if the client sent none.
	ServerName string
	// ALPN is the client's protocol list in its order, nil if none.
	ALPN []string

	scanState
	alpnBuf  []string // backing array for ALPN, kept across Reads
	msgBuf   []byte   // reassembles a ClientHello that spans records
	lastName string   // previous ServerName, reused to avoid an allocation
	released bool
}

// OffersACME reports whether the client offered the ACME TLS-ALPN-01
// protocol anywhere in its ALPN list.
func (h *Hello) OffersACME() bool {
	return h.Kind == Complete && slices.Contains(h.ALPN, ACMEProtocol)
}

// keepBuffer is the largest buffer Release keeps for reuse, so one huge
// hello does not pin 64 KiB in the pool forever.
const keepBuffer = 8 << 10

var helloPool = sync.Pool{New: func() any { return new(Hello) }}

// Release returns h's buffers for reuse by later Reads. Neither h nor any
// slice taken from it (Raw, ALPN) may be used afterwards. Calling Release
// is optional; calling it twice is harmless.
func (h *Hello) Release() {
	if h == nil || h.released {
		return
	}
	h.released = true
	if cap(h.Raw) > keepBuffer {
		h.Raw = nil
	}
	if cap(h.msgBuf) > keepBuffer {
		h.msgBuf = nil
	}
	clear(h.alpnBuf[:cap(h.alpnBuf)]) // drop the strings it references
	h.ALPN = nil
	helloPool.Put(h)
}

// Read reads from r until a whole ClientHello has been consumed, the stream
// is shown not to be a TLS ClientHello, or r fails. It never reads past the
// end of the TLS record that completes the ClientHello.
//
// The first read asks for exactly one byte: if it is not a TLS handshake
// record type, Read returns NotTLS at once, so a client that waits for the
// server to speak first is not stalled. After that Read asks for exactly
// one record header, then exactly that record's body.
//
// Read always returns a non-nil Hello. The error is non-nil only when r
// failed; Kind is then Truncated and Raw holds the bytes read before the
// failure. A stream that ends before its first byte gives io.EOF, one that
// ends later io.ErrUnexpectedEOF; other errors (a deadline) pass through.
func Read(r io.Reader) (*Hello, error) {
	h := New()
	for need := 1; need > 0; need = h.scan() {
		if err := h.fill(r, need); err != nil {
			return h, err
		}
	}
	return h, nil
}

// New returns an empty Hello, for callers that do their own reads (an
// event loop): append each read's bytes to Raw and call Scan, until Scan
// reports true. Release it when done, as with Read.
func New() *Hello {
	h := helloPool.Get().(*Hello)
	h.Raw = h.Raw[:0]
	h.Kind, h.Reason = Truncated, ""
	h.ServerName, h.ALPN = "", nil
	h.released = false
	h.scanState = scanState{hsLen: -1}
	return h
}

// Scan examines Raw, every byte read from the stream so far, continuing
// where the previous Scan stopped. It reports true once Kind is final
// (Complete, NotTLS, Malformed or TooLarge); until then Kind is Truncated
// and more bytes are needed. Bytes after the record that completes the
// ClientHello are ignored: they belong to the backend with the rest of Raw.
//
// The decision is the same as Read's for the same bytes, however they were
// split across reads; a non-TLS stream is decided on its first byte.
func (h *Hello) Scan() bool {
	if h.Kind != Truncated {
		return true
	}
	if len(h.Raw) == 0 {
		return false
	}
	if h.scan() == 0 {
		return true
	}
	if len(h.Raw) >= MaxHelloSize {
		// Unreachable while scan enforces the limit per record; a bound
		// on what a caller buffers all the same.
		h.stop(TooLarge, "ClientHello records exceed the size limit")
		return true
	}
	return false
}

// scanState is how far scan got through Raw.
type scanState struct {
	next     int // offset in Raw of the next record header
	records  int // complete records scanned
	hsHeader [handshakeHeaderLen]byte
	hsHave   int // handshake bytes in the records scanned
	hsLen    int // handshake message length with header; -1 until known
}

// scan advances over the complete records in Raw. It returns 0 once Kind
// is final, otherwise how many more bytes the next step needs at least
// (exactly the rest of the next record header or body).
func (h *Hello) scan() int {
	s := &h.scanState
	if len(h.Raw) == 0 {
		return 1
	}
	// A non-TLS client may be waiting for the server to speak first, so
	// decide on the first byte alone.
	if h.Raw[0] != recordTypeHandshake {
		h.stop(NotTLS, "first byte is not a TLS handshake record")
		return 0
	}
	for {
		start := s.next
		if s.records > 0 && start+recordHeaderLen >= MaxHelloSize {
			h.stop(TooLarge, "ClientHello records exceed the size limit")
			return 0
		}
		if len(h.Raw) < start+recordHeaderLen {
			return start + recordHeaderLen - len(h.Raw)
		}
		header := h.Raw[start : start+recordHeaderLen]
		bad := Malformed
		if s.records == 0 {
			bad = NotTLS
		}
		if header[0] != recordTypeHandshake {
			h.stop(Malformed, "non-handshake record inside the ClientHello")
			return 0
		}
		if header[1] != 3 {
			h.stop(bad, "record version is not 3.x")
			return 0
		}
		n := int(header[3])<<8 | int(header[4])
		if n == 0 || n > maxRecordBody {
			h.stop(bad, "handshake record length is zero or over 2^14+256")
			return 0
		}
		end := start + recordHeaderLen + n
		if end > MaxHelloSize {
			h.stop(TooLarge, "ClientHello records exceed the size limit")
			return 0
		}
		if len(h.Raw) < end {
			return end - len(h.Raw)
		}
		s.records++
		s.next = end

		body := h.Raw[start+recordHeaderLen : end]
		if s.hsHave < handshakeHeaderLen {
			copy(s.hsHeader[s.hsHave:], body)
		}
		s.hsHave += n
		if s.hsLen < 0 && s.hsHave >= handshakeHeaderLen {
			if s.hsHeader[0] != handshakeTypeClientHello {
				h.stop(Malformed, errNotClientHello.Error())
				return 0
			}
			s.hsLen = handshakeHeaderLen + (int(s.hsHeader[1])<<16 | int(s.hsHeader[2])<<8 | int(s.hsHeader[3]))
			if s.hsLen+s.records*recordHeaderLen > MaxHelloSize {
				h.stop(TooLarge, "ClientHello length exceeds the size limit")
				return 0
			}
		}
		if s.hsLen >= 0 && s.hsHave >= s.hsLen {
			// Bytes after the message in its last record are consumed
			// with it and left to the backend to judge.
			h.parse(h.message(s.records, s.hsLen))
			return 0
		}
	}
}

// fill reads exactly n more bytes onto Raw, keeping whatever arrived
// before an error.
func (h *Hello) fill(r io.Reader, n int) error {
	start := len(h.Raw)
	h.Raw = slices.Grow(h.Raw, n)[:start+n]
	got, err := io.ReadFull(r, h.Raw[start:])
	h.Raw = h.Raw[:start+got]
	if err == io.EOF && len(h.Raw) > 0 {
		err = io.ErrUnexpectedEOF // the stream ended inside the hello
	}
	if err != nil {
		h.stop(Truncated, "stream ended or failed before the ClientHello was complete")
	}
	return err
}

// message returns the first msgLen handshake bytes of the records in Raw,
// copying only when the message spans more than one record.
func (h *Hello) message(records, msgLen int) []byte {
	if records == 1 {
		return h.Raw[recordHeaderLen : recordHeaderLen+msgLen]
	}
	h.msgBuf = h.msgBuf[:0]
	for rest := h.Raw[:h.next]; len(rest) > 0; {
		n := int(rest[3])<<8 | int(rest[4])
		h.msgBuf = append(h.msgBuf, rest[recordHeaderLen:recordHeaderLen+n]...)
		rest = rest[recordHeaderLen+n:]
	}
	return h.msgBuf[:msgLen]
}

func (h *Hello) parse(msg []byte) {
	var p parsed
	if err := p.parse(msg, h.alpnBuf[:0], h.lastName); err != nil {
		h.stop(Malformed, err.Error())
		return
	}
	h.Kind = Complete
	h.ServerName, h.ALPN = p.serverName, p.alpn
	if cap(p.alpn) > cap(h.alpnBuf) {
		h.alpnBuf = p.alpn[:0]
	}
	if p.serverName != "" {
		h.lastName = p.serverName
	}
}

func (h *Hello) stop(k Kind, reason string) {
	h.Kind, h.Reason = k, reason
}

package sniff

import (
	"bytes"
	"errors"
	"slices"
	"testing"
)

// helloSpec describes a ClientHello for buildHello.
type helloSpec struct {
	serverName string
	alpn       []string
	padding    int      // bytes of padding extension (RFC 7685), if > 0
	extra      [][]byte // whole extensions appended as given
}

// buildHello returns a ClientHello handshake message (header included).
func buildHello(s helloSpec) []byte {
	var exts [][]byte
	if s.serverName != "" {
		exts = append(exts, sniExt(s.serverName))
	}
	if s.alpn != nil {
		exts = append(exts, alpnExt(s.alpn...))
	}
	if s.padding > 0 {
		exts = append(exts, ext(21, make([]byte, s.padding)))
	}
	exts = append(exts, s.extra...)
	return handshake(helloFields(bytes.Join(exts, nil)))
}

// helloFields is legacy_version, random, an empty session id, one cipher
// suite, null compression and the extension block.
func helloFields(exts []byte) []byte {
	b := []byte{3, 3}
	b = append(b, make([]byte, 32)...)
	b = append(b, 0)                // session id
	b = append(b, 0, 2, 0x13, 0x01) // TLS_AES_128_GCM_SHA256
	b = append(b, 1, 0)             // null compression
	b = append(b, u16(len(exts))...)
	return append(b, exts...)
}

func handshake(body []byte) []byte {
	return append([]byte{1, byte(len(body) >> 16), byte(len(body) >> 8), byte(len(body))}, body...)
}

func u16(n int) []byte { return []byte{byte(n >> 8), byte(n)} }

func ext(typ int, data []byte) []byte {
	return append(append(u16(typ), u16(len(data))...), data...)
}

func sniEntry(typ byte, name string) []byte {
	return append(append([]byte{typ}, u16(len(name))...), name...)
}

func sniExt(names ...string) []byte {
	var list []byte
	for _, n := range names {
		list = append(list, sniEntry(0, n)...)
	}
	return ext(extensionServerName, append(u16(len(list)), list...))
}

func alpnExt(protos ...string) []byte {
	var list []byte
	for _, p := range protos {
		list = append(append(list, byte(len(p))), p...)
	}
	return ext(extensionALPN, append(u16(len(list)), list...))
}

// rawExt wraps list bytes in an extension, for hand-broken contents.
func rawExt(typ int, data ...byte) []byte { return ext(typ, data) }

func TestParseAcceptsWellFormed(t *testing.T) {
	cases := []struct {
		name     string
		msg      []byte
		wantName string
		wantALPN []string
	}{
		{"no-extension-block", handshake(helloFields(nil)[:len(helloFields(nil))-2]), "", nil},
		{"empty-extension-block", buildHello(helloSpec{}), "", nil},
		{"sni-and-alpn", buildHello(helloSpec{serverName: "example.org", alpn: []string{"h2", ACMEProtocol}}), "example.org", []string{"h2", ACMEProtocol}},
		{"unknown-extensions-skipped", buildHello(helloSpec{alpn: []string{"x"}, extra: [][]byte{ext(0xfe0d, []byte{1, 2, 3}), ext(0xaaaa, nil)}}), "", []string{"x"}},
		{"non-hostname-sni-entry-ignored", buildHello(helloSpec{extra: [][]byte{
			ext(extensionServerName, append(u16(11), append(sniEntry(7, "xx"), sniEntry(0, "a.b")...)...)),
		}}), "a.b", nil},
		{"only-non-hostname-sni", buildHello(helloSpec{extra: [][]byte{
			ext(extensionServerName, append(u16(5), sniEntry(7, "xx")...)),
		}}), "", nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			name, alpn, err := Parse(c.msg)
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			if name != c.wantName || !slices.Equal(alpn, c.wantALPN) {
				t.Errorf("got SNI %q ALPN %q, want %q %q", name, alpn, c.wantName, c.wantALPN)
			}
		})
	}
}

func TestParseRejectsMalformed(t *testing.T) {
	good := buildHello(helloSpec{serverName: "example.org", alpn: []string{"h2"}})
	mutate := func(f func(b []byte) []byte) []byte { return f(bytes.Clone(good)) }
	withExts := func(exts ...[]byte) []byte { return buildHello(helloSpec{extra: exts}) }

	cases := []struct {
		name string
		msg  []byte
		want error
	}{
		{"empty", nil, errShortField},
		{"server-hello", mutate(func(b []byte) []byte { b[0] = 2; return b }), errNotClientHello},
		{"length-too-long", mutate(func(b []byte) []byte { b[3]++; return b }), errBadLength},
		{"length-too-short", mutate(func(b []byte) []byte { return b[:len(b)-1] }), errBadLength},
		{"version-not-3", mutate(func(b []byte) []byte { b[4] = 0x7f; return b }), errBadVersion},
		{"cut-in-random", handshake(helloFields(nil)[:20]), errShortField},
		{"session-id-33", handshake(append(append([]byte{3, 3}, make([]byte, 32)...), append([]byte{33}, make([]byte, 33+4+2+2)...)...)), errBadSessionID},
		{"session-id-overruns", handshake(append(append([]byte{3, 3}, make([]byte, 32)...), 32, 1, 2, 3)), errShortField},
		{"no-cipher-suites", handshake([]byte(string([]byte{3, 3}) + string(make([]byte, 32)) + "\x00\x00\x00\x01\x00")), errBadCipherSuites},
		{"odd-cipher-suites", handshake([]byte(string([]byte{3, 3}) + string(make([]byte, 32)) + "\x00\x00\x03\x13\x01\x00\x01\x00")), errBadCipherSuites},
		{"no-compression", handshake([]byte(string([]byte{3, 3}) + string(make([]byte, 32)) + "\x00\x00\x02\x13\x01\x00")), errBadCompression},
		{"extension-block-one-byte", handshake(append(helloFields(nil)[:len(helloFields(nil))-2], 0)), errBadExtensions},
		{"extension-block-overruns", handshake(append(helloFields(nil)[:len(helloFields(nil))-2], 0, 4, 0, 0)), errBadExtensions},
		{"bytes-after-extension-block", handshake(append(helloFields(nil), 0)), errBadExtensions},
		{"extension-data-overruns", handshake(append(helloFields(nil)[:len(helloFields(nil))-2], 0, 4, 0, 16, 0, 9)), errBadExtensions},
		{"extension-type-cut", handshake(append(helloFields(nil)[:len(helloFields(nil))-2], 0, 1, 0)), errBadExtensions},
		{"duplicate-alpn", withExts(alpnExt("h2"), alpnExt(ACMEProtocol)), errDuplicateExt},
		{"duplicate-sni", withExts(sniExt("a.example"), sniExt("b.example")), errDuplicateExt},
		{"sni-empty-list", withExts(rawExt(0, 0, 0)), errBadServerName},
		{"sni-no-list", withExts(rawExt(0)), errBadServerName},
		{"sni-empty-name", withExts(rawExt(0, 0, 3, 0, 0, 0)), errBadServerName},
		{"sni-name-overruns", withExts(rawExt(0, 0, 4, 0, 0, 9, 'a')), errBadServerName},
		{"sni-two-host-names", withExts(sniExt("a.example", "b.example")), errBadServerName},
		{"sni-trailing-dot", withExts(sniExt("example.org.")), errBadServerName},
		{"sni-bytes-after-list", withExts(rawExt(0, 0, 4, 0, 0, 1, 'a', 0)), errBadServerName},
		{"alpn-empty-list", withExts(rawExt(16, 0, 0)), errBadALPN},
		{"alpn-no-list", withExts(rawExt(16)), errBadALPN},
		{"alpn-empty-protocol", withExts(alpnExt("h2", "")), errBadALPN},
		{"alpn-protocol-overruns", withExts(rawExt(16, 0, 3, 5, 'h', '2')), errBadALPN},
		{"alpn-bytes-after-list", withExts(rawExt(16, 0, 3, 2, 'h', '2', 0)), errBadALPN},
		{"alpn-list-overruns", withExts(rawExt(16, 0, 9, 2, 'h', '2')), errBadALPN},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			name, alpn, err := Parse(c.msg)
			if !errors.Is(err, c.want) || !errors.Is(err, ErrMalformed) {
				t.Fatalf("Parse error %v, want %v", err, c.want)
			}
			if name != "" || alpn != nil {
				t.Errorf("malformed hello still yielded SNI %q ALPN %q", name, alpn)
			}
		})
	}
}

// Two ALPN extensions are the classic smuggling shape: a router reading the
// first and a backend reading the second would disagree. Read must refuse
// to route on it.
func TestReadRefusesDuplicateALPN(t *testing.T) {
	msg := buildHello(helloSpec{extra: [][]byte{alpnExt("h2"), alpnExt(ACMEProtocol)}})
	h, err := Read(bytes.NewReader(frame(msg, 1<<14)))
	if err != nil || h.Kind != Malformed || h.OffersACME() || h.Reason == "" {
		t.Fatalf("Kind %v (%q), ACME %v, err %v; want malformed with a reason", h.Kind, h.Reason, h.OffersACME(), err)
	}
}

func TestParseCryptoTLSHellos(t *testing.T) {
	for _, c := range cryptoTLSHellos(t) {
		name, alpn, err := Parse(handshakeBytes(t, c.raw))
		if err != nil || name != c.serverName || !slices.Equal(alpn, c.alpn) {
			t.Errorf("%s: SNI %q ALPN %q err %v; want %q %q", c.name, name, alpn, err, c.serverName, c.alpn)
		}
	}
}

package proxyproto

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

var (
	client4 = netip.MustParseAddrPort("192.168.0.1:56324")
	server4 = netip.MustParseAddrPort("192.168.0.11:443")
	client6 = netip.MustParseAddrPort("[2001:db8::1]:56324")
	server6 = netip.MustParseAddrPort("[2001:db8::11]:443")
)

// The spec's own example line (section 2.1).
func TestV1SpecExample(t *testing.T) {
	got := string(AppendV1(nil, client4, server4))
	if want := "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"; got != want {
		t.Errorf("AppendV1 = %q, want %q", got, want)
	}
}

// The spec's longest lines: 56 bytes for TCP4, 104 for TCP6.
func TestV1LongestLines(t *testing.T) {
	all4 := netip.MustParseAddrPort("255.255.255.255:65535")
	line := AppendV1(nil, all4, all4)
	if want := "PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n"; string(line) != want || len(line) != 56 {
		t.Errorf("AppendV1 = %q (%d bytes), want %q (56)", line, len(line), want)
	}
	all6 := netip.AddrPortFrom(netip.AddrFrom16([16]byte{0: 0xff, 1: 0xff, 2: 0xff, 3: 0xff, 4: 0xff, 5: 0xff, 6: 0xff, 7: 0xff,
		8: 0xff, 9: 0xff, 10: 0xff, 11: 0xff, 12: 0xff, 13: 0xff, 14: 0xff, 15: 0xff}), 65535)
	line = AppendV1(nil, all6, all6)
	if len(line) != 104 || MaxV1Len != 104 {
		t.Errorf("AppendV1 of all-ones IPv6 is %d bytes (%q), want MaxV1Len = 104", len(line), line)
	}
	if got := AppendV2(nil, all6, all6); len(got) != MaxV2Len {
		t.Errorf("AppendV2 of IPv6 is %d bytes, want MaxV2Len = %d", len(got), MaxV2Len)
	}
}

// Version 2 blocks byte by byte against the layout of section 2.2.
func TestV2Layout(t *testing.T) {
	for _, tc := range []struct {
		name     string
		src, dst netip.AddrPort
		want     string // hex, spaces ignored
	}{
		{"ipv4", client4, server4,
			"0d0a0d0a000d0a515549540a" + " 21 11 000c" + " c0a80001 c0a8000b" + " dc04 01bb"},
		{"ipv6", client6, server6,
			"0d0a0d0a000d0a515549540a" + " 21 21 0024" +
				" 20010db8000000000000000000000001 20010db8000000000000000000000011" + " dc04 01bb"},
		{"unknown", netip.AddrPort{}, server4,
			"0d0a0d0a000d0a515549540a" + " 20 00 0000"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := hex.EncodeToString(AppendV2(nil, tc.src, tc.dst))
			if want := strings.ReplaceAll(tc.want, " ", ""); got != want {
				t.Errorf("AppendV2 =\n %s, want\n %s", got, want)
			}
		})
	}
}

// What a receiver reads back is what was sent: client and dialed address
// with ports, IPv4-mapped addresses as IPv4, a family for both.
func TestRoundTrip(t *testing.T) {
	mapped := netip.AddrPortFrom(netip.MustParseAddr("::ffff:198.18.0.2"), 40000)
	zoned := netip.AddrPortFrom(netip.MustParseAddr("fe80::1%eth0"), 40000)
	for _, tc := range []struct {
		name               string
		src, dst           netip.AddrPort
		wantSrc, wantDst   string
		wantV1Proto        string
		wantV2Fam          byte
		wantV1, wantV2Unks bool
	}{
		{name: "ipv4", src: client4, dst: server4, wantSrc: "192.168.0.1:56324", wantDst: "192.168.0.11:443", wantV1Proto: "TCP4", wantV2Fam: 0x11},
		{name: "ipv6", src: client6, dst: server6, wantSrc: "[2001:db8::1]:56324", wantDst: "[2001:db8::11]:443", wantV1Proto: "TCP6", wantV2Fam: 0x21},
		{name: "mapped client is IPv4", src: mapped, dst: server4, wantSrc: "198.18.0.2:40000", wantDst: "192.168.0.11:443", wantV1Proto: "TCP4", wantV2Fam: 0x11},
		{name: "mixed: IPv4 client, IPv6 destination", src: client4, dst: server6,
			wantSrc: "[::ffff:192.168.0.1]:56324", wantDst: "[2001:db8::11]:443", wantV1Proto: "TCP6", wantV2Fam: 0x21},
		{name: "mixed: IPv6 client, IPv4 destination", src: client6, dst: server4,
			wantSrc: "[2001:db8::1]:56324", wantDst: "[::ffff:192.168.0.11]:443", wantV1Proto: "TCP6", wantV2Fam: 0x21},
		{name: "zone dropped", src: zoned, dst: server6, wantSrc: "[fe80::1]:40000", wantDst: "[2001:db8::11]:443", wantV1Proto: "TCP6", wantV2Fam: 0x21},
		{name: "no client address", dst: server4, wantV1Proto: "UNKNOWN", wantV2Fam: 0x00},
		{name: "no destination", src: client4, wantV1Proto: "UNKNOWN", wantV2Fam: 0x00},
	} {
		t.Run(tc.name, func(t *testing.T) {
			prefix := []byte("earlier bytes")
			line := AppendV1(bytes.Clone(prefix), tc.src, tc.dst)
			if !bytes.HasPrefix(line, prefix) {
				t.Fatalf("AppendV1 did not append: %q", line)
			}
			h1, err := parseV1(line[len(prefix):])
			if err != nil {
				t.Fatalf("v1 %q: %v", line[len(prefix):], err)
			}
			block := AppendV2(bytes.Clone(prefix), tc.src, tc.dst)
			if !bytes.HasPrefix(block, prefix) {
				t.Fatalf("AppendV2 did not append: %x", block)
			}
			h2, err := parseV2(block[len(prefix):])
			if err != nil {
				t.Fatalf("v2 %x: %v", block[len(prefix):], err)
			}
			if h1.proto != tc.wantV1Proto || h2.fam != tc.wantV2Fam {
				t.Errorf("v1 protocol %s, v2 family %#x; want %s, %#x", h1.proto, h2.fam, tc.wantV1Proto, tc.wantV2Fam)
			}
			for _, h := range []header{h1, h2} {
				if got := addrString(h.src); got != tc.wantSrc {
					t.Errorf("%s source %s, want %s", h.version, got, tc.wantSrc)
				}
				if got := addrString(h.dst); got != tc.wantDst {
					t.Errorf("%s destination %s, want %s", h.version, got, tc.wantDst)
				}
			}
		})
	}
}

// Random addresses of every kind survive both encodings.
func TestRoundTripRandom(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	randAddr := func() netip.AddrPort {
		var a [16]byte
		for i := range a {
			a[i] = byte(r.UintN(256))
		}
		// Runs of zeroes exercise "::" placement.
		for i := range a {
			if r.UintN(3) == 0 {
				a[i] = 0
			}
		}
		ip := netip.AddrFrom16(a)
		switch r.UintN(3) {
		case 0:
			ip = netip.AddrFrom4([4]byte(a[:4]))
		case 1:
			ip = netip.AddrFrom16(netip.AddrFrom4([4]byte(a[:4])).As16()) // mapped
		}
		return netip.AddrPortFrom(ip, uint16(r.UintN(65536)))
	}
	var buf []byte
	for range 20000 {
		src, dst := randAddr(), randAddr()
		s, d := src.Addr().Unmap(), dst.Addr().Unmap()
		if !(s.Is4() && d.Is4()) {
			s, d = netip.AddrFrom16(s.As16()), netip.AddrFrom16(d.As16())
		}
		want := [2]netip.AddrPort{netip.AddrPortFrom(s, src.Port()), netip.AddrPortFrom(d, dst.Port())}
		for _, v := range []Version{V1, V2} {
			buf = Append(buf[:0], v, src, dst)
			if len(buf) > MaxLen {
				t.Fatalf("%v header for %v → %v is %d bytes, over MaxLen %d", v, src, dst, len(buf), MaxLen)
			}
			var h header
			var err error
			if v == V1 {
				h, err = parseV1(buf)
			} else {
				h, err = parseV2(buf)
			}
			if err != nil {
				t.Fatalf("%v header for %v → %v: %v\n%q", v, src, dst, err, buf)
			}
			if got := [2]netip.AddrPort{h.src, h.dst}; got != want {
				t.Fatalf("%v header for %v → %v reads back as %v → %v", v, src, dst, got[0], got[1])
			}
		}
	}
}

// Mixed families go as IPv6, the IPv4 address mapped and written in hex
// groups: the spec's IPv6 form has no dotted quad.
func TestV1MixedFamilies(t *testing.T) {
	got := string(AppendV1(nil, client4, server6))
	if want := "PROXY TCP6 ::ffff:c0a8:1 2001:db8::11 56324 443\r\n"; got != want {
		t.Errorf("AppendV1 = %q, want %q", got, want)
	}
}

func TestAppendOff(t *testing.T) {
	if got := Append([]byte("x"), 0, client4, server4); string(got) != "x" {
		t.Errorf("Append with no version = %q, want the buffer unchanged", got)
	}
}

// A header costs no allocation once the buffer has room.
func TestAppendAllocatesNothing(t *testing.T) {
	buf := make([]byte, 0, MaxLen)
	for _, v := range []Version{V1, V2} {
		for _, pair := range [][2]netip.AddrPort{{client4, server4}, {client6, server6}, {client4, server6}} {
			if n := testing.AllocsPerRun(100, func() { buf = Append(buf[:0], v, pair[0], pair[1]) }); n != 0 {
				t.Errorf("%v %v → %v: %v allocations, want 0", v, pair[0], pair[1], n)
			}
		}
	}
}

func BenchmarkAppend(b *testing.B) {
	buf := make([]byte, 0, MaxLen)
	for _, v := range []Version{V1, V2} {
		for _, pair := range []struct {
			name     string
			src, dst netip.AddrPort
		}{{"ipv4", client4, server4}, {"ipv6", client6, server6}} {
			b.Run(v.String()+"/"+pair.name, func(b *testing.B) {
				b.ReportAllocs()
				for b.Loop() {
					buf = Append(buf[:0], v, pair.src, pair.dst)
				}
			})
		}
	}
}

// header is what a receiver takes from a PROXY header.
type header struct {
	version  string
	proto    string // v1: TCP4, TCP6 or UNKNOWN
	fam      byte   // v2: the family and transport byte
	src, dst netip.AddrPort
}

func addrString(a netip.AddrPort) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}

// v1Line is section 2.1's grammar: single spaces, no leading zeroes, CRLF.
var v1Line = regexp.MustCompile(`^PROXY (TCP4|TCP6) ([0-9a-fA-F.:]+) ([0-9a-fA-F.:]+) (0|[1-9][0-9]{0,4}) (0|[1-9][0-9]{0,4})\r\n$`)

// parseV1 is a strict receiver of version 1 (section 2.1): the whole of b
// must be one line.
func parseV1(b []byte) (header, error) {
	h := header{version: "v1"}
	if len(b) > 107 {
		return h, fmt.Errorf("line is %d bytes, over the 107 a receiver reads", len(b))
	}
	if string(b) == "PROXY UNKNOWN\r\n" {
		h.proto = "UNKNOWN"
		return h, nil
	}
	m := v1Line.FindSubmatch(b)
	if m == nil {
		return h, errors.New("not a version 1 line")
	}
	h.proto = string(m[1])
	var addrs [2]netip.Addr
	for i, text := range [][]byte{m[2], m[3]} {
		if h.proto == "TCP4" {
			// Exactly four decimal numbers, no leading zeroes.
			parts := strings.Split(string(text), ".")
			if len(parts) != 4 {
				return h, fmt.Errorf("address %q is not 4 numbers", text)
			}
			for _, p := range parts {
				if len(p) > 1 && p[0] == '0' {
					return h, fmt.Errorf("address %q has a leading zero", text)
				}
			}
		} else if strings.Contains(string(text), ".") {
			return h, fmt.Errorf("IPv6 address %q is not groups of hex digits", text)
		}
		a, err := netip.ParseAddr(string(text))
		if err != nil {
			return h, err
		}
		if a.Is4() != (h.proto == "TCP4") {
			return h, fmt.Errorf("address %q does not match %s", text, h.proto)
		}
		addrs[i] = a
	}
	var ports [2]uint16
	for i, text := range [][]byte{m[4], m[5]} {
		n, err := strconv.ParseUint(string(text), 10, 16)
		if err != nil {
			return h, fmt.Errorf("port %q: %v", text, err)
		}
		ports[i] = uint16(n)
	}
	h.src, h.dst = netip.AddrPortFrom(addrs[0], ports[0]), netip.AddrPortFrom(addrs[1], ports[1])
	return h, nil
}

// parseV2 is a strict receiver of version 2 (section 2.2): the whole of b
// must be one block.
func parseV2(b []byte) (header, error) {
	h := header{version: "v2"}
	if len(b) < 16 || !bytes.Equal(b[:12], v2Signature[:]) {
		return h, errors.New("no version 2 signature")
	}
	if n := int(binary.BigEndian.Uint16(b[14:16])); len(b) != 16+n {
		return h, fmt.Errorf("length field says %d address bytes, block has %d", n, len(b)-16)
	}
	h.fam = b[13]
	switch ver, cmd := b[12]>>4, b[12]&0xf; {
	case ver != 2:
		return h, fmt.Errorf("version %d", ver)
	case cmd == 0: // LOCAL: addresses ignored
		return h, nil
	case cmd != 1:
		return h, fmt.Errorf("command %d", cmd)
	}
	addr := b[16:]
	var size int
	switch h.fam {
	case 0x11:
		size = 4
	case 0x21:
		size = 16
	default:
		return h, fmt.Errorf("family and transport %#x, want TCP over IPv4 or IPv6", h.fam)
	}
	if len(addr) != 2*size+4 {
		return h, fmt.Errorf("%d address bytes for family %#x", len(addr), h.fam)
	}
	src, _ := netip.AddrFromSlice(addr[:size])
	dst, _ := netip.AddrFromSlice(addr[size : 2*size])
	h.src = netip.AddrPortFrom(src, binary.BigEndian.Uint16(addr[2*size:]))
	h.dst = netip.AddrPortFrom(dst, binary.BigEndian.Uint16(addr[2*size+2:]))
	return h, nil
}

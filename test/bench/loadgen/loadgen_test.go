package main

import (
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/internal/acceptloop"
)

func TestClientHelloOffersALPN(t *testing.T) {
	for _, alpn := range [][]string{{"acme-tls/1"}, {"h2", "http/1.1"}} {
		raw, err := clientHello("bench.example", alpn)
		if err != nil {
			t.Fatal(err)
		}
		// Trailing bytes (the command) must stay unread for the relay.
		r := bytes.NewReader(append(slices.Clip(raw), cmdPing))
		gotRaw, msg, err := readHello(r)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(gotRaw, raw) || r.Len() != 1 {
			t.Fatalf("readHello took %d bytes of %d, left %d", len(gotRaw), len(raw), r.Len())
		}
		got, err := helloALPN(msg)
		if err != nil || !slices.Equal(got, alpn) {
			t.Fatalf("helloALPN = %q, %v; want %q", got, err, alpn)
		}
	}
}

// A hello split over two records is what some clients send; the reader
// must join them and a relay must forward both records.
func TestReadHelloAcrossRecords(t *testing.T) {
	raw, err := clientHello("bench.example", []string{"acme-tls/1"})
	if err != nil {
		t.Fatal(err)
	}
	body := raw[5:]
	split := func(b []byte) []byte {
		rec := []byte{22, 3, 1, 0, 0}
		binary.BigEndian.PutUint16(rec[3:], uint16(len(b)))
		return append(rec, b...)
	}
	two := append(split(body[:100]), split(body[100:])...)
	gotRaw, msg, err := readHello(bytes.NewReader(two))
	if err != nil || !bytes.Equal(gotRaw, two) || !bytes.Equal(msg, body) {
		t.Fatalf("readHello over two records: err %v, raw %d/%d bytes", err, len(gotRaw), len(two))
	}
}

func TestReadHelloRejectsBadInput(t *testing.T) {
	huge := []byte{22, 3, 1, 0x40, 0, 1, 0xff, 0xff, 0xff}
	for name, in := range map[string][]byte{
		"not handshake": {23, 3, 3, 0, 1, 0},
		"empty record":  {22, 3, 1, 0, 0},
		"truncated":     {22, 3, 1, 0, 10, 1, 0},
		"huge":          append(huge, make([]byte, 0x4000-4)...),
		"eof":           nil,
	} {
		if _, _, err := readHello(bytes.NewReader(in)); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
	if _, err := helloALPN([]byte{1, 0, 0, 3, 3, 3, 0}); err == nil {
		t.Error("truncated ClientHello body parsed")
	}
}

func TestParseProcFiles(t *testing.T) {
	if _, err := parsePIDs("12,x"); err == nil {
		t.Fatal("bad pid list accepted")
	}
}

func ptr(f float64) *float64 { return &f }

func TestReportMediansRatiosAndNotes(t *testing.T) {
	var rs []Result
	for rep, gbps := range []float64{30, 10, 20} {
		rs = append(rs, Result{Peer: "direct", Rep: rep + 1, Mode: "bulk", Dir: "up", Streams: 1, Gbps: gbps, Bytes: 1e9})
	}
	for rep, gbps := range []float64{5, 15, 10} {
		rs = append(rs,
			Result{Peer: "proxy", Rep: rep + 1, Mode: "bulk", Dir: "up", Streams: 1, Gbps: gbps, Bytes: 2e9, CPUSec: ptr(float64(rep + 1))},
			Result{Peer: "proxy", Rep: rep + 1, Mode: "idle", Want: 10, Open: 10, PSSKiBPerConn: ptr(3.5), FDsPerConn: ptr(2)})
	}
	rs = append(rs, Result{Peer: "proxy", Rep: 4, Mode: "idle", Want: 10, Open: 7, PSSKiBPerConn: ptr(3.5), FDsPerConn: ptr(2), Errors: 3, Error: "too many open files"},
		Result{Peer: "broken", Rep: 1, Mode: "skip", Error: "did not start"})
	out := renderTable(rs)
	for _, want := range []string{
		"| direct | 20.0 (10.0–30.0) |",
		"| proxy | 10.0 (5.0–15.0) ×0.50 |",
		"| 3.5 (3.5–3.5) | 2.00 (2.00–2.00) | 1.00 (0.50–1.50) |", // CPU: 1,2,3 s per 2 GB
		"| broken | — |",
		"proxy rep 4 idle: 7/10 idle connections opened, first: too many open files",
		"broken rep 1: did not start",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
}

func TestReportRatiosToReferencePeer(t *testing.T) {
	rs := []Result{
		{Peer: "direct", Rep: 1, Mode: "cps", CPS: 300, Conns: 1},
		{Peer: "ref", Rep: 1, Mode: "cps", CPS: 100, P99ms: 4, Conns: 1},
		{Peer: "ref", Rep: 2, Mode: "cps", CPS: 200, P99ms: 2, Conns: 1},
		{Peer: "proxy", Rep: 1, Mode: "cps", CPS: 180, P99ms: 3, Conns: 1},
	}
	out := renderRatios(rs, "ref")
	// conn/s 180/150, p50 —, p99 3/3; no row for direct or the reference.
	if !strings.Contains(out, "| proxy | — | — | — | — | 1.20 | — | 1.00 | — | — | — | — |") ||
		strings.Contains(out, "| direct |") || strings.Contains(out, "| ref |") {
		t.Errorf("ratios:\n%s", out)
	}
	if out := renderRatios(rs, "absent"); !strings.Contains(out, "no results") {
		t.Errorf("missing reference: %s", out)
	}
}

// End to end on loopback: the naive relay routes by ALPN, relays an upload
// with half-close, and a download, through the real backend.
func TestNaiveRelayRoutesAndRelays(t *testing.T) {
	listen := func() net.Listener {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		return ln
	}
	web, acme, relay := listen(), listen(), listen()
	go acceptloop.Serve(web, func(c net.Conn) { backendConn(c, tagWeb) })
	go acceptloop.Serve(acme, func(c net.Conn) { backendConn(c, tagACME) })
	go acceptloop.Serve(relay, func(c net.Conn) { naiveRelay(c.(*net.TCPConn), acme.Addr().String(), web.Addr().String()) })
	addr := relay.Addr().String()

	for alpn, tag := range map[string]byte{"acme-tls/1": tagACME, "h2,http/1.1": tagWeb} {
		hello, err := clientHello("x.example", strings.Split(alpn, ","))
		if err != nil {
			t.Fatal(err)
		}
		c, err := ping(addr, hello, cmdPing, tag)
		if err != nil {
			t.Fatalf("%s: %v", alpn, err)
		}
		if err := awaitClose(c); err != nil {
			t.Fatalf("%s: backend close not relayed: %v", alpn, err)
		}
	}
	hello, _ := clientHello("x.example", []string{"h2"})
	c, err := dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if n, err := upload(c, hello, time.Now().Add(50*time.Millisecond)); err != nil || n == 0 {
		t.Fatalf("upload through relay: %d bytes, %v", n, err)
	}
	d, err := dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if n, err := download(d, hello, 50*time.Millisecond); err != nil || n == 0 {
		t.Fatalf("download through relay: %d bytes, %v", n, err)
	}
	var one [1]byte
	if _, err := d.Read(one[:]); err != io.EOF {
		t.Fatalf("after download: %v, want EOF", err)
	}
}

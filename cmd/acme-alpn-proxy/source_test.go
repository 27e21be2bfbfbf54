package main

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/internal/hellotest"
	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/proxyproto"
)

func TestParseArgsSourceFlags(t *testing.T) {
	cfg, _, _, err := parseArgs([]string{"start"}, io.Discard)
	if err != nil || cfg.source != sourceClient || cfg.alpnHeader != 0 {
		t.Fatalf("defaults: source %v, alpn header %v, err %v; want client, off", cfg.source, cfg.alpnHeader, err)
	}
	cfg, _, _, err = parseArgs([]string{"-fallback-source", "proxy-v2", "-alpn-proxy-protocol", "v1", "start"}, io.Discard)
	if err != nil || cfg.source != sourceProxyV2 || cfg.alpnHeader != proxyproto.V1 {
		t.Fatalf("got source %v, alpn header %v, err %v; want proxy-v2, v1", cfg.source, cfg.alpnHeader, err)
	}
	for _, tc := range []struct{ args []string }{
		{[]string{"-fallback-source", "proxy", "start"}},
		{[]string{"-fallback-source", "v1", "start"}},
		{[]string{"-alpn-proxy-protocol", "proxy-v1", "start"}},
		{[]string{"-alpn-proxy-protocol", "on", "start"}},
	} {
		_, _, _, err := parseArgs(tc.args, io.Discard)
		if err == nil || !strings.Contains(err.Error(), tc.args[0]) || !strings.Contains(err.Error(), "want") {
			t.Errorf("parseArgs(%q) = %v, want an error naming the flag and its values", tc.args, err)
		}
	}
}

// headerBackend accepts one connection at a time and sends what it reads
// first (up to the hello's first byte, a TLS handshake record) to got.
func headerBackend(t *testing.T) (addr string, got chan string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	got = make(chan string, 4)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.SetReadDeadline(time.Now().Add(3 * time.Second))
			var b []byte
			buf := make([]byte, 4096)
			for !bytes.Contains(b, []byte{0x16, 0x03}) {
				n, err := c.Read(buf)
				b = append(b, buf[:n]...)
				if err != nil {
					break
				}
			}
			header, _, _ := bytes.Cut(b, []byte{0x16, 0x03})
			got <- string(header)
			c.Close()
		}
	}()
	return ln.Addr().String(), got
}

// Each backend gets the header its flag asks for, naming the client and
// the address it dialed, before the hello; the log says which.
func TestProxySendsHeaders(t *testing.T) {
	for _, tc := range []struct {
		source       fallbackSource
		alpn         proxyproto.Version
		wantWeb      string // format of the header, with client port and listener port
		wantACME     string
		webLog, acme string
	}{
		{sourceHost, 0, "", "", "source=host", ""},
		{sourceProxyV1, proxyproto.V2, "PROXY TCP4 127.0.0.1 127.0.0.1 %d %d\r\n", "v2", "source=proxy-v1", "source=proxy-v2"},
		{sourceProxyV2, proxyproto.V1, "v2", "PROXY TCP4 127.0.0.1 127.0.0.1 %d %d\r\n", "source=proxy-v2", "source=proxy-v1"},
	} {
		t.Run(tc.source.String(), func(t *testing.T) {
			acme, acmeGot := headerBackend(t)
			web, webGot := headerBackend(t)
			logs := &lockedBuffer{}
			_, addr := startTestProxyLog(t, acme, web, 5*time.Second, logs, func(p *proxy) { p.sendHeaders(tc.source, tc.alpn) })
			for _, to := range []struct {
				alpn    []string
				got     chan string
				want    string
				logPart string
			}{
				{[]string{"h2"}, webGot, tc.wantWeb, tc.webLog},
				{[]string{"acme-tls/1"}, acmeGot, tc.wantACME, tc.acme},
			} {
				c, err := net.Dial("tcp", addr)
				if err != nil {
					t.Fatal(err)
				}
				hello, err := hellotest.For("example.org", to.alpn)
				if err != nil {
					t.Fatal(err)
				}
				c.Write(hello)
				client, listener := c.LocalAddr().(*net.TCPAddr), c.RemoteAddr().(*net.TCPAddr)
				want := to.want
				switch want {
				case "v2":
					want = string(proxyproto.AppendV2(nil, client.AddrPort(), listener.AddrPort()))
				case "":
				default:
					want = fmt.Sprintf(want, client.Port, listener.Port)
				}
				select {
				case got := <-to.got:
					if got != want {
						t.Errorf("ALPN %q: backend got %q before the hello, want %q", to.alpn, got, want)
					}
				case <-time.After(5 * time.Second):
					t.Fatalf("ALPN %q: backend got no hello", to.alpn)
				}
				c.Close()
				line := fmt.Sprintf("client=%v", client)
				if to.logPart != "" && !logs.await(line, to.logPart) {
					t.Errorf("no log line with %s and %s:\n%s", line, to.logPart, logs)
				}
				if to.logPart == "" && (!logs.await(line, "route=acme") || strings.Contains(logs.String(), "route=acme backend="+acme+" source=")) {
					t.Errorf("ACME line without a header should name no source:\n%s", logs)
				}
			}
		})
	}
}

func TestParseArgsFallbackSource(t *testing.T) {
	cfg, _, _, err := parseArgs([]string{"start"}, io.Discard)
	if err != nil || cfg.source != sourceClient || cfg.returnMark != 0x1000 || cfg.returnTable != 21443 {
		t.Fatalf("defaults: source %v mark %#x table %d, %v; want client, 0x1000, 21443", cfg.source, cfg.returnMark, cfg.returnTable, err)
	}
	cfg, _, _, err = parseArgs([]string{"-fallback-source", "host", "-return-mark", "0x20", "-return-table", "100", "start"}, io.Discard)
	if err != nil || cfg.source != sourceHost || cfg.returnMark != 0x20 || cfg.returnTable != 100 {
		t.Fatalf("got source %v mark %#x table %d, %v", cfg.source, cfg.returnMark, cfg.returnTable, err)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"-fallback-source", "proxy", "start"}, "want client, host, proxy-v1 or proxy-v2"},
		{[]string{"-return-mark", "0", "start"}, "non-zero"},
		{[]string{"-return-mark", "0x100000000", "start"}, "32-bit"},
		{[]string{"-return-table", "254", "start"}, "253-255"},
		{[]string{"-return-table", "0", "start"}, "want 1-4294967295"},
	} {
		if _, _, _, err := parseArgs(tc.args, io.Discard); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: err %v, want one saying %q", tc.args, err, tc.want)
		}
	}
}

// /proc/net/tcp prints each 32-bit word of an address as a host-order
// number (little endian here).
func TestProcAddr(t *testing.T) {
	for in, want := range map[string]string{
		"0100007F":                         "127.0.0.1",
		"010012C6":                         "198.18.0.1",
		"0000000000000000FFFF00000100007F": "127.0.0.1", // v4-mapped
		"000000FD000000000000000001000000": "fd00::1",
		"00000000000000000000000000000000": "::",
	} {
		a, ok := procAddr(in)
		if !ok || a != netip.MustParseAddr(want) {
			t.Errorf("procAddr(%s) = %v, %v; want %s", in, a, ok, want)
		}
	}
	for _, bad := range []string{"", "0100007", "zz00007F"} {
		if _, ok := procAddr(bad); ok {
			t.Errorf("procAddr(%q) accepted", bad)
		}
	}
}

// The proof dials the web server where a client would: -fallback when set.
func TestProofTargetsFallback(t *testing.T) {
	fb := netip.MustParseAddrPort("198.18.0.1:8443")
	got, err := proofTargets(fb, 443, nil)
	if err != nil || len(got) != 1 || got[0] != fb {
		t.Fatalf("proofTargets = %v, %v; want just %v", got, err, fb)
	}
	if !isLocalAddr(netip.MustParseAddr("127.0.0.1")) || isLocalAddr(netip.MustParseAddr("192.0.2.77")) {
		t.Error("isLocalAddr: loopback must be local, a documentation address not")
	}
}

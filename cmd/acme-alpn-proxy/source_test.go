package main

import (
	"io"
	"net/netip"
	"strings"
	"testing"
)

func TestParseArgsFallbackSource(t *testing.T) {
	cfg, _, _, err := parseArgs([]string{"start"}, io.Discard)
	if err != nil || cfg.source != sourceClient || cfg.returnMark != 0x1000 || cfg.returnTable != 21443 {
		t.Fatalf("defaults: source %q mark %#x table %d, %v; want client, 0x1000, 21443", cfg.source, cfg.returnMark, cfg.returnTable, err)
	}
	cfg, _, _, err = parseArgs([]string{"-fallback-source", "host", "-return-mark", "0x20", "-return-table", "100", "start"}, io.Discard)
	if err != nil || cfg.source != sourceHost || cfg.returnMark != 0x20 || cfg.returnTable != 100 {
		t.Fatalf("got source %q mark %#x table %d, %v", cfg.source, cfg.returnMark, cfg.returnTable, err)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"-fallback-source", "proxy", "start"}, "want client or host"},
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

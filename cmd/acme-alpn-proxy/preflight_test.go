package main

import (
	"errors"
	"net"
	"slices"
	"strings"
	"testing"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/intercept"
)

var (
	v4   = intercept.IPv4
	v6   = intercept.IPv6
	both = []intercept.Family{v4, v6}
)

// webServersOn is a listening probe that finds a web server on the given
// families, and only on port 443.
func webServersOn(fs ...intercept.Family) func(intercept.Family, uint16) (bool, error) {
	return func(f intercept.Family, port uint16) (bool, error) {
		return port == 443 && slices.Contains(fs, f), nil
	}
}

func TestPlanFamiliesInterceptsWhatHasAWebServer(t *testing.T) {
	for _, tc := range []struct {
		name          string
		candidates    []intercept.Family
		probe         func(intercept.Family, uint16) (bool, error)
		want, without []intercept.Family
	}{
		{"both have one", both, webServersOn(v4, v6), both, nil},
		{"IPv4-only web server", both, webServersOn(v4), []intercept.Family{v4}, []intercept.Family{v6}},
		{"IPv6-only web server", both, webServersOn(v6), []intercept.Family{v6}, []intercept.Family{v4}},
		{"IPv6 disabled by env", []intercept.Family{v4}, webServersOn(v4, v6), []intercept.Family{v4}, nil},
		{"no IPv6 in the kernel", both, func(f intercept.Family, port uint16) (bool, error) {
			if f == v6 {
				return false, errNoStack
			}
			return true, nil
		}, []intercept.Family{v4}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := planFamilies(tc.candidates, 443, tc.probe)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(p.intercept, tc.want) || !slices.Equal(p.without, tc.without) {
				t.Fatalf("intercept %v, without %v; want %v, %v", p.intercept, p.without, tc.want, tc.without)
			}
		})
	}
}

func TestPlanFamiliesRefusesWithNoWebServer(t *testing.T) {
	_, err := planFamilies(both, 8443, webServersOn(v4, v6)) // they listen on 443 only
	if err == nil {
		t.Fatal("no web server on either family: start must refuse")
	}
	for _, want := range []string{"IPv4 or IPv6 port 8443", "no web server", "-fallback", "-skip-preflight"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
	if _, err := planFamilies([]intercept.Family{v6}, 443, func(intercept.Family, uint16) (bool, error) { return false, errNoStack }); err == nil {
		t.Error("only candidate absent from the kernel: want a refusal")
	}
	boom := errors.New("/proc/net/tcp: permission denied")
	if _, err := planFamilies(both, 443, func(intercept.Family, uint16) (bool, error) { return false, boom }); err == nil || !strings.Contains(err.Error(), boom.Error()) {
		t.Errorf("probe error: got %v, want it passed on", err)
	}
}

func TestNotInterceptedWarningSaysWhatACASees(t *testing.T) {
	msg, effect, fix := notInterceptedWarning(v6, 443)
	for _, want := range []string{"IPv6 not intercepted", "IPv6 port 443"} {
		if !strings.Contains(msg, want) {
			t.Errorf("message %q lacks %q", msg, want)
		}
	}
	for _, want := range []string{"refused", "CA validating over IPv6 fails", "AAAA", "IPv4, which is intercepted"} {
		if !strings.Contains(effect, want) {
			t.Errorf("effect %q lacks %q", effect, want)
		}
	}
	for _, want := range []string{"[::]:443", "ACME_ALPN_PROXY_DISABLEV6=y"} {
		if !strings.Contains(fix, want) {
			t.Errorf("fix %q lacks %q", fix, want)
		}
	}
	msg, effect, fix = notInterceptedWarning(v4, 8443)
	if !strings.Contains(msg, "IPv4 port 8443") || !strings.Contains(effect, "CA validating over IPv4 fails") || !strings.Contains(fix, "0.0.0.0:8443") {
		t.Errorf("IPv4 warning: %q / %q / %q", msg, effect, fix)
	}
}

func TestListenFamilies(t *testing.T) {
	for _, tc := range []struct {
		listen    string
		disableV6 bool
		want      []intercept.Family
	}{
		{":21443", false, both},
		{":21443", true, []intercept.Family{v4}},
		{"0.0.0.0:21443", false, []intercept.Family{v4}},
		{"[::]:21443", false, []intercept.Family{v6}},
	} {
		if got := listenFamilies(config{listen: tc.listen, disableV6: tc.disableV6}); !slices.Equal(got, tc.want) {
			t.Errorf("listenFamilies(%s, disableV6=%v) = %v, want %v", tc.listen, tc.disableV6, got, tc.want)
		}
	}
}

func TestDescribeFamilies(t *testing.T) {
	for _, tc := range []struct {
		fs   []intercept.Family
		want string
	}{
		{both, "IPv4 and IPv6"},
		{[]intercept.Family{v4}, "IPv4 only (IPv6 not intercepted)"},
		{[]intercept.Family{v6}, "IPv6 only (IPv4 not intercepted)"},
	} {
		if got := describeFamilies(tc.fs); got != tc.want {
			t.Errorf("describeFamilies(%v) = %q, want %q", tc.fs, got, tc.want)
		}
	}
}

// An explicit -fallback keeps the single reachability check, and every
// family then goes to that web server.
func TestPreflightWithFallbackChecksItOnce(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	p, err := preflight(config{fallback: addr, port: 443}, both)
	if err != nil || !slices.Equal(p.intercept, both) || len(p.without) != 0 {
		t.Fatalf("fallback %s accepting: plan %+v, err %v; want both families", addr, p, err)
	}
	ln.Close()
	if _, err := preflight(config{fallback: addr, port: 443}, both); err == nil || !strings.Contains(err.Error(), "-fallback "+addr) {
		t.Fatalf("fallback %s closed: err %v, want a refusal naming it", addr, err)
	}
}

func TestListenAddrOnlyForInterceptedFamilies(t *testing.T) {
	for _, tc := range []struct {
		listen   string
		families []intercept.Family
		want     string
	}{
		{":21443", both, ":21443"},
		{":21443", []intercept.Family{v4}, "0.0.0.0:21443"},
		{":21443", []intercept.Family{v6}, "[::]:21443"},
		{"0.0.0.0:21443", []intercept.Family{v4}, "0.0.0.0:21443"},
		{"127.0.0.1:9443", []intercept.Family{v4}, "127.0.0.1:9443"}, // -no-redirect
	} {
		if got := listenAddr(config{listen: tc.listen}, tc.families); got != tc.want {
			t.Errorf("listenAddr(%s, %v) = %s, want %s", tc.listen, tc.families, got, tc.want)
		}
	}
}

package main

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/intercept"
)

func TestGuardianArgsRoundTrip(t *testing.T) {
	a := guardianArgs{pidfile: "/run/p.pid", backend: "iptables", instance: "00ff", port: 8443, listenPort: 21443, proxyPid: 42, logPath: "-"}
	argv := a.argv()
	if argv[0] != guardianCommand {
		t.Fatalf("argv[0] = %q", argv[0])
	}
	got, err := parseGuardianArgs(argv[1:])
	if err != nil || got != a {
		t.Fatalf("parse(argv()) = %+v, %v; want %+v", got, err, a)
	}
	for _, bad := range [][]string{
		{"-backend", "iptables", "-instance", "1", "-listen-port", "1", "-proxy-pid", "1"},            // no pidfile
		{"-pidfile", "p", "-backend", "pf", "-instance", "1", "-listen-port", "1", "-proxy-pid", "1"}, // backend
		{"-pidfile", "p", "-backend", "nft", "-instance", "1", "-listen-port", "0", "-proxy-pid", "1"},
		{"-pidfile", "p", "-backend", "nft", "-instance", "1", "-listen-port", "1"},
	} {
		if _, err := parseGuardianArgs(bad); err == nil {
			t.Errorf("parseGuardianArgs(%q) accepted it", bad)
		}
	}
}

// Only the proxy's "clean" before its exit means its rules are gone;
// anything else, or nothing, is a death to clean up after.
func TestReadUntilEOF(t *testing.T) {
	for _, tc := range []struct {
		write string
		clean bool
	}{
		{cleanMsg, true},
		{"", false},
		{"cle", false},
		{strings.Repeat("x", 1000), false},
	} {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		go func() { w.Write([]byte(tc.write)); w.Close() }()
		got := readUntilEOF(r)
		r.Close()
		if (got == cleanMsg) != tc.clean || len(got) > 256 {
			t.Errorf("after %d bytes: read %q", len(tc.write), got)
		}
	}
}

func TestInstanceStateRoundTrip(t *testing.T) {
	path := filepath.Join(t.TempDir(), "pid")
	l, err := lockPidfile(path)
	if err != nil {
		t.Fatal(err)
	}
	defer l.release()
	want := instanceState{pid: os.Getpid(), backend: "iptables", mode: "tproxy", guardian: 77, instance: "0a0b"}
	if err := l.write(want); err != nil {
		t.Fatal(err)
	}
	running, got, err := probePidfile(path)
	if !running || err != nil || got != want {
		t.Errorf("probe = %v %+v %v; want running %+v", running, got, err, want)
	}
}

// The guardian leaves a newer instance's lock alone at once, and retries
// only while the file still names its dead proxy.
func TestLockAfter(t *testing.T) {
	path := filepath.Join(t.TempDir(), "pid")
	newer, err := tryLockPidfile(path)
	if err != nil {
		t.Fatal(err)
	}
	newer.write(instanceState{pid: os.Getpid(), backend: "iptables", mode: "tproxy"})
	start := time.Now()
	l, holder, err := lockAfter(path, 999999, time.Second)
	if l != nil || err != nil || holder != os.Getpid() {
		t.Errorf("with a newer holder: lock %v holder %d err %v", l, holder, err)
	}
	if time.Since(start) > 500*time.Millisecond {
		t.Errorf("waited %v for a newer instance's lock", time.Since(start))
	}
	// The file names the dead proxy: retried until the wait ends.
	newer.write(instanceState{pid: 999999})
	start = time.Now()
	if l, _, _ := lockAfter(path, 999999, 100*time.Millisecond); l != nil || time.Since(start) < 100*time.Millisecond {
		t.Errorf("lock %v after %v; want none, after retrying 100ms", l, time.Since(start))
	}
	go func() { time.Sleep(30 * time.Millisecond); newer.release() }()
	l, _, err = lockAfter(path, 999999, 5*time.Second)
	if l == nil || err != nil {
		t.Fatalf("after the holder released: lock %v err %v", l, err)
	}
	l.release()
}

// A start that finds the lock held by a process that is not the live one
// the file names (a guardian cleaning up after a kill -9) waits for it; the
// holder removes the file before unlocking, and the waiter must then lock
// the file at the path, not the removed one.
func TestLockPidfileWaitsForCleanup(t *testing.T) {
	path := filepath.Join(t.TempDir(), "pid")
	cleaner, err := tryLockPidfile(path)
	if err != nil {
		t.Fatal(err)
	}
	cleaner.write(instanceState{pid: 999999, backend: "iptables", mode: "tproxy"}) // the dead instance
	go func() { time.Sleep(100 * time.Millisecond); cleaner.release() }()
	l, err := lockPidfile(path)
	if err != nil {
		t.Fatalf("start after the cleanup: %v", err)
	}
	defer l.release()
	if !sameFile(l.f, path) {
		t.Error("locked a file no longer at the path: a third start would run alongside")
	}
	// A live holder is reported at once.
	l.write(instanceState{pid: os.Getpid(), backend: "nft", mode: "tproxy"})
	start := time.Now()
	_, err = lockPidfile(path)
	var running *errRunning
	if !errors.As(err, &running) || time.Since(start) > time.Second {
		t.Errorf("second start: %v after %v; want errRunning at once", err, time.Since(start))
	}
}

func TestGuardianAliveIgnoresOtherProcesses(t *testing.T) {
	if guardianAlive(os.Getpid()) {
		t.Error("the test process taken for a guardian")
	}
	if guardianAlive(999999) {
		t.Error("a missing PID taken for a guardian")
	}
}

func TestDying(t *testing.T) {
	const alive = "1 (acme alpn) S 1 1 1 0 -1 4194560 0"
	for name, tc := range map[string]struct {
		stat, status string
		want         bool
	}{
		"running":         {alive, "SigPnd:\t0000000000000000\nShdPnd:\t0000000000000000\n", false},
		"zombie":          {"1 (acme alpn) Z 1 1 1 0 -1 4194560 0", "", true},
		"exiting":         {"1 (acme alpn) R 1 1 1 0 -1 4194564 0", "", true},
		"sigkill pending": {alive, "SigPnd:\t0000000000000100\nShdPnd:\t0000000000000000\n", true},
		"sigkill shared":  {alive, "SigPnd:\t0000000000000000\nShdPnd:\t0000000000000100\n", true},
		"sigterm pending": {alive, "SigPnd:\t0000000000004000\n", false},
		"garbage":         {"nonsense", "", true},
	} {
		if got := dying([]byte(tc.stat), []byte(tc.status)); got != tc.want {
			t.Errorf("%s: dying = %v, want %v", name, got, tc.want)
		}
	}
	if !processAlive(os.Getpid()) {
		t.Error("the test process reported dead")
	}
}

func TestParseLifeNews(t *testing.T) {
	for msg, want := range map[string]lifeNews{
		"":                                   {},
		cleanMsg:                             {clean: true},
		"installed tproxy ip ip6\n":          {mode: intercept.TProxy, families: []intercept.Family{intercept.IPv4, intercept.IPv6}},
		"installed redirect ip\n" + cleanMsg: {clean: true, mode: intercept.Redirect, families: []intercept.Family{intercept.IPv4}},
		"installed redir":                    {}, // cut short by the death
		"installed dnat ip\n":                {}, // not a mode
	} {
		got := parseLifeNews(msg)
		if got.clean != want.clean || got.mode != want.mode || !slices.Equal(got.families, want.families) {
			t.Errorf("parseLifeNews(%q) = %+v, want %+v", msg, got, want)
		}
	}
}

package e2e

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The guardian: where the kernel does not remove our rules when the proxy
// dies (iptables, nftables plain tables on kernels < 5.12), a process
// started with the proxy removes them. Its target is 100 ms from the death;
// these tests require 1 s (a shared, noisy machine) and log what they
// measured, in lines starting "guardian reaction", for the README.

// guardianVariants are the variants without kernel-side cleanup: every
// iptables variant, and nftables forced to plain tables.
func forEachGuardianVariant(t *testing.T, keep func(Variant) bool, fn func(t *testing.T, v Variant, plain bool)) {
	t.Helper()
	forEachVariantWhere(t, keep, func(t *testing.T, v Variant) {
		fn(t, v, v.Backend == "nft")
	})
}

// newGuardedProxy is NewProxy; for nftables it forces plain tables with
// the test-only switch, as on a kernel older than 5.12.
func newGuardedProxy(t *testing.T, s *Site, v Variant, plain bool, pidfile string) *Proxy {
	t.Helper()
	p := s.NewProxy(t, v)
	if plain {
		p.environ = append(p.environ, "ACME_ALPN_PROXY_TEST_PLAIN_TABLES=y")
	}
	if pidfile != "" { // share another proxy's pid file
		for i := range p.flags {
			if p.flags[i] == p.PidFile {
				p.flags[i] = pidfile
			}
		}
		p.PidFile = pidfile
	}
	return p
}

var guardianInPidfile = regexp.MustCompile(`guardian=(\d+)`)

// guardianOf returns the PID of p's guardian as the pid file records it.
func guardianOf(t *testing.T, p *Proxy) int {
	t.Helper()
	b, err := os.ReadFile(p.PidFile)
	if err != nil {
		t.Fatal(err)
	}
	m := guardianInPidfile.FindSubmatch(b)
	if m == nil {
		t.Fatalf("pid file records no guardian:\n%s", b)
	}
	pid, _ := strconv.Atoi(string(m[1]))
	return pid
}

// procAlive reports whether pid runs (zombies count as gone).
func procAlive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	i := bytes.LastIndexByte(b, ')')
	return err == nil && i >= 0 && i+2 < len(b) && b[i+2] != 'Z'
}

// statFields returns /proc/PID/stat's fields after the command name.
func statFields(t *testing.T, pid int) []string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	return strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
}

// requireGuardianDetached checks what lets the guardian outlive its proxy:
// its own session and process group, SIGHUP, SIGINT and SIGTERM ignored, a
// low OOM score (when
// this machine lets root lower it: it needs CAP_SYS_RESOURCE).
func requireGuardianDetached(t *testing.T, p *Proxy, g int) {
	t.Helper()
	gs, ps := statFields(t, g), statFields(t, p.Pid())
	// After ')': state ppid pgrp session.
	if gs[2] != strconv.Itoa(g) || gs[3] != strconv.Itoa(g) {
		t.Errorf("guardian %d: process group %s, session %s; want its own", g, gs[2], gs[3])
	}
	if gs[2] == ps[2] || gs[3] == ps[3] {
		t.Errorf("guardian shares the proxy's process group or session (%v/%v vs %v/%v)", gs[2], gs[3], ps[2], ps[3])
	}
	status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", g))
	m := regexp.MustCompile(`SigIgn:\s*([0-9a-f]+)`).FindSubmatch(status)
	ign, _ := strconv.ParseUint(string(m[1]), 16, 64)
	for _, sig := range []syscall.Signal{syscall.SIGHUP, syscall.SIGINT, syscall.SIGTERM} {
		if ign&(1<<(uint(sig)-1)) == 0 {
			t.Errorf("guardian does not ignore %v (SigIgn %s): it must outlive its proxy's signals", sig, m[1])
		}
	}
	// What it costs, for the README (not a pass/fail bound).
	var mem []string
	for _, line := range strings.Split(string(status), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && (k == "VmRSS" || k == "RssAnon" || k == "RssFile" || k == "Threads") {
			mem = append(mem, k+" "+strings.Join(strings.Fields(v), " "))
		}
	}
	t.Logf("guardian memory: %s", strings.Join(mem, ", "))
	adj, _ := os.ReadFile(fmt.Sprintf("/proc/%d/oom_score_adj", g))
	if strings.Contains(p.RunLog(), "cannot lower own oom_score_adj") {
		t.Logf("guardian oom_score_adj %s: this machine denies lowering it (no CAP_SYS_RESOURCE), as the log says", strings.TrimSpace(string(adj)))
	} else if strings.TrimSpace(string(adj)) != "-999" {
		t.Errorf("guardian oom_score_adj = %s, want -999", adj)
	}
}

// firstDirect opens a TCP connection to the web server's port over f
// every 10 ms (a SYN dropped by a dead TPROXY rule is retransmitted only
// after 1 s, so one attempt at a time would measure the retransmission)
// until one is accepted by the web server itself, from the client's
// address and port, and returns when that connection was established,
// bounded by limit. TCP only: TLS handshakes on a loaded machine would
// add their own delay to the measurement.
func firstDirect(s *Site, f Family, limit time.Duration) (time.Time, error) {
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	type result struct {
		at  time.Time
		err error
	}
	results := make(chan result, 512)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	var last error
	for started := 0; ; {
		select {
		case <-tick.C:
			if started < cap(results) {
				started++
				go func() { at, err := directConnect(ctx, s, f); results <- result{at, err} }()
			}
		case r := <-results:
			if r.err == nil {
				return r.at, nil
			}
			last = r.err
		case <-ctx.Done():
			return time.Time{}, fmt.Errorf("no direct connection over %v within %v: last %v", f, limit, last)
		}
	}
}

// directConnect connects to the web server's port over f and returns when
// the connection was established, if the web server accepted it from the
// client's own address and port (not from a proxy).
func directConnect(ctx context.Context, s *Site, f Family) (time.Time, error) {
	c, err := s.Cli.Dial(ctx, s.ServerAddr(f, 443))
	if err != nil {
		return time.Time{}, err
	}
	at := time.Now()
	local := c.LocalAddr().(*net.TCPAddr).AddrPort()
	defer c.Close()
	seen := func() bool {
		for _, p := range s.Web.Peers() {
			if p.Addr().Unmap() == local.Addr().Unmap() && p.Port() == local.Port() {
				return true
			}
		}
		return false
	}
	if !eventually(2*time.Second, seen) {
		return time.Time{}, fmt.Errorf("connected from %v, but the web server did not accept that connection", local)
	}
	return at, nil
}

var guardianWoke = regexp.MustCompile(`time=(\S+) level=WARN msg="proxy died without removing its rules`)

var guardianKnownTook = regexp.MustCompile(`msg="known rules deleted".*took=(\S+)`)

var guardianTook = regexp.MustCompile(`rules removed: new connections go to the web server".*took=(\S+)`)

// requireGuardianCleanedUp waits for what must follow the proxy's death:
// direct connections within 1 s over both families, no rules, status 3,
// the guardian gone after logging what it did. It logs the times.
func requireGuardianCleanedUp(t *testing.T, s *Site, v Variant, p *Proxy, g int, killed time.Time, how string) {
	t.Helper()
	type direct struct {
		at  time.Time
		err error
	}
	results := map[Family]chan direct{}
	for _, f := range families {
		c := make(chan direct, 1)
		results[f] = c
		go func() { at, err := firstDirect(s, f, 5*time.Second); c <- direct{at, err} }()
	}
	var took []string
	for _, f := range families {
		r := <-results[f]
		if r.err != nil {
			t.Errorf("%s: %v", how, r.err)
			continue
		}
		d := r.at.Sub(killed)
		took = append(took, fmt.Sprintf("%v first direct %v", f, d.Round(time.Millisecond)))
		if d > time.Second {
			t.Errorf("%s: first direct connection over %v %v after the kill, want within 1 s", how, f, d.Round(time.Millisecond))
		}
	}
	if !eventually(10*time.Second, func() bool { return !procAlive(g) }) {
		t.Errorf("guardian %d still running 10 s after its proxy died", g)
	}
	// The guardian's output reaches the log once the pipe it shares with
	// the proxy is drained.
	if err := p.WaitExit(10 * time.Second); err != nil {
		t.Error(err)
	}
	if m := guardianWoke.FindStringSubmatch(p.Log()); m != nil {
		if at, err := time.Parse(time.RFC3339Nano, m[1]); err == nil {
			took = append(took, fmt.Sprintf("guardian woke after %v", at.Sub(killed).Round(time.Millisecond)))
		}
	}
	if m := guardianKnownTook.FindStringSubmatch(p.Log()); m != nil {
		took = append(took, "deleted the known rules in "+m[1])
	}
	m := guardianTook.FindStringSubmatch(p.Log())
	if m == nil {
		t.Errorf("guardian logged no removal:\n%s", p.Log())
	} else {
		took = append(took, "removed and checked all in "+m[1])
	}
	t.Logf("guardian reaction %s %s: %s", v.Name(), how, strings.Join(took, ", "))
	requireNoRules(t, s, v)
	if code := p.Status(); code != 3 {
		t.Errorf("status after the guardian's cleanup: exit %d, want 3 (not running, nothing stale)", code)
	}
	requireBypassed(t, s)
}

// kill -9 of the proxy under load: the guardian removes the rules.
func TestGuardianKill9UnderLoad(t *testing.T) {
	forEachGuardianVariant(t, func(Variant) bool { return true }, func(t *testing.T, v Variant, plain bool) {
		s := NewSite(t)
		p := newGuardedProxy(t, s, v, plain, "")
		p.Start()
		g := guardianOf(t, p)
		if r := p.RunT("status"); r.Code != 0 || !strings.Contains(r.Output, fmt.Sprintf("guardian: pid %d, alive", g)) {
			t.Errorf("status does not show the guardian %d alive: %v", g, r)
		}
		requireGuardianDetached(t, p, g)
		load := StartLoad(t, s.Cli, 100, "web",
			LoadTarget{Addr: s.ServerAddr(IPv4, 443), ALPN: []string{"h2"}},
			LoadTarget{Addr: s.ServerAddr(IPv6, 443), ALPN: []string{"h2"}},
		)
		time.Sleep(500 * time.Millisecond)
		killed := time.Now()
		if err := syscall.Kill(p.Pid(), syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		requireGuardianCleanedUp(t, s, v, p, g, killed, "kill -9 PID")
		r := load.Stop()
		t.Logf("load: %d requests, %d failed around the kill, proxied %v, direct %v", r.Requests, r.Failures, r.Proxied, r.Direct)
		if len(r.Proxied) == 0 {
			t.Error("no load went through the proxy before the kill")
		}
	})
}

// kill -9 of the proxy's whole process group (the harness starts it in its
// own): the guardian, in its own group, survives it.
func TestGuardianSurvivesGroupKill(t *testing.T) {
	keep := func(v Variant) bool { return v.Mode == "tproxy" && (v.Backend == "nft" || v.Iptables == "legacy") }
	forEachGuardianVariant(t, keep, func(t *testing.T, v Variant, plain bool) {
		s := NewSite(t)
		p := newGuardedProxy(t, s, v, plain, "")
		p.Start()
		g := guardianOf(t, p)
		killed := time.Now()
		if err := syscall.Kill(-p.Pid(), syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		requireGuardianCleanedUp(t, s, v, p, g, killed, "kill -9 -PGID")
	})
}

// kill -9 followed at once by a new start: the new instance keeps its
// rules and serves. Here the old guardian usually takes the lock first and
// the new start waits for it; held back until the newer instance is
// ready, it must exit without touching the newer rules.
func TestGuardianLeavesNewerInstance(t *testing.T) {
	keep := func(v Variant) bool { return v.Backend == "nft" || v.Iptables == "nft" }
	forEachGuardianVariant(t, keep, func(t *testing.T, v Variant, plain bool) {
		s := NewSite(t)
		old := newGuardedProxy(t, s, v, plain, "")
		old.Start()
		oldGuardian := guardianOf(t, old)
		next := killAndStartNext(t, s, v, plain, old)
		if !eventually(10*time.Second, func() bool { return !procAlive(oldGuardian) }) {
			t.Fatalf("old guardian %d still running", oldGuardian)
		}
		if err := old.WaitExit(10 * time.Second); err != nil {
			t.Fatal(err)
		}
		t.Logf("old guardian: %s", lastLine(old.Log(), "guardian="+strconv.Itoa(oldGuardian)))
		if r := next.RunT("status"); r.Code != 0 {
			t.Errorf("new instance after the old guardian exited: %v", r)
		}
		for _, f := range families {
			a := s.Cli.MustRequest(t, s.ServerAddr(f, 443), []string{ACMEALPN})
			if a.Server != "acme" {
				t.Errorf("%v: acme-tls/1 answered by %q after the old guardian exited; want the new instance's interception", f, a.Server)
			}
		}
		// Now make the newer instance win the race: its predecessor's
		// guardian is held (SIGSTOP) until the newer one is ready. It must
		// find the lock taken and leave the newer rules alone.
		held := guardianOf(t, next)
		if err := syscall.Kill(held, syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		defer syscall.Kill(held, syscall.SIGCONT)
		third := killAndStartNext(t, s, v, plain, next)
		rulesBefore := s.OurRules(t, v)
		syscall.Kill(held, syscall.SIGCONT)
		if !eventually(10*time.Second, func() bool { return !procAlive(held) }) {
			t.Fatalf("held guardian %d still running after SIGCONT", held)
		}
		// Its output reaches the log once the pipe it shares is drained.
		if err := next.WaitExit(10 * time.Second); err != nil {
			t.Fatal(err)
		}
		if line := lastLine(next.Log(), "guardian="+strconv.Itoa(held)); !strings.Contains(line, "a newer instance holds the pid file") {
			t.Errorf("held guardian's last word: %q; want it to leave the newer instance's rules", line)
		}
		if after := s.OurRules(t, v); strings.Join(after, "\n") != strings.Join(rulesBefore, "\n") {
			t.Errorf("the newer instance's rules changed when the old guardian ran:\nbefore:\n%s\nafter:\n%s",
				strings.Join(rulesBefore, "\n"), strings.Join(after, "\n"))
		}
		for _, f := range families {
			if a := s.Cli.MustRequest(t, s.ServerAddr(f, 443), []string{ACMEALPN}); a.Server != "acme" {
				t.Errorf("%v: acme-tls/1 answered by %q after the held guardian ran", f, a.Server)
			}
		}
		third.Stop()
		requireNoRules(t, s, v)
	})
}

// killAndStartNext kills p with SIGKILL and at once starts a new instance
// on the same pid file, waiting until it is ready.
func killAndStartNext(t *testing.T, s *Site, v Variant, plain bool, p *Proxy) *Proxy {
	t.Helper()
	next := newGuardedProxy(t, s, v, plain, p.PidFile)
	if err := syscall.Kill(p.Pid(), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if err := next.Launch(); err != nil {
		t.Fatal(err)
	}
	if err := next.WaitReady(30 * time.Second); err != nil {
		t.Fatal(err)
	}
	return next
}

// lastLine is the last line of log containing substr.
func lastLine(log, substr string) string {
	lines := strings.Split(log, "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if strings.Contains(lines[i], substr) {
			return lines[i]
		}
	}
	return ""
}

// The guardian killed alone: the proxy keeps serving and warns; status
// says so; a clean stop still removes everything.
func TestGuardianKilledAlone(t *testing.T) {
	keep := func(v Variant) bool { return v.Mode == "redirect" && (v.Backend == "nft" || v.Iptables == "nft") }
	forEachGuardianVariant(t, keep, func(t *testing.T, v Variant, plain bool) {
		s := NewSite(t)
		p := newGuardedProxy(t, s, v, plain, "")
		p.Start()
		g := guardianOf(t, p)
		// SIGTERM (say, `systemctl stop` signalling the whole unit) does
		// not end it while its proxy lives.
		syscall.Kill(g, syscall.SIGTERM)
		time.Sleep(200 * time.Millisecond)
		if !procAlive(g) {
			t.Fatal("guardian ended by SIGTERM while its proxy runs")
		}
		if err := syscall.Kill(g, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		if !eventually(5*time.Second, func() bool { return strings.Contains(p.RunLog(), "guardian exited") }) {
			t.Errorf("no warning logged when the guardian died:\n%s", p.RunLog())
		}
		r := p.RunT("status")
		if r.Code != 0 || !strings.Contains(r.Output, fmt.Sprintf("guardian: pid %d, NOT running", g)) {
			t.Errorf("status with the guardian dead: %v; want exit 0 and the guardian reported NOT running", r)
		}
		for _, f := range families {
			if a := s.Cli.MustRequest(t, s.ServerAddr(f, 443), []string{ACMEALPN}); a.Server != "acme" {
				t.Errorf("%v: acme-tls/1 answered by %q with the guardian dead; the proxy must keep serving", f, a.Server)
			}
		}
		p.Stop()
		requireNoRules(t, s, v)
		requireBypassed(t, s)
	})
}

package e2e

// Lifecycle as a hook runner or an operator sees it: start -d, run, status
// exit codes, signals.

import (
	"bufio"
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// lifecycleVariants covers both modes and both backends without running
// the whole matrix: the lifecycle code is shared, the rules it removes
// differ.
func lifecycleVariant(v Variant) bool {
	return v.Backend == "nft" || (v.Iptables == "nft" && v.Mode == "redirect")
}

// detachedProxy prepares a proxy for `start -d` logging to a file (the
// background instance must not hold the test's output pipes open) and
// makes sure it is gone when the test ends: `stop`, then SIGKILL to the
// PID in the pid file if it still runs.
func detachedProxy(t *testing.T, s *Site, v Variant, extra ...string) (*Proxy, string) {
	t.Helper()
	logPath := filepath.Join(t.TempDir(), "proxy.log")
	p := s.NewProxy(t, v, append([]string{"-log", logPath}, extra...)...)
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("background proxy log:\n%s", b)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if r := p.Run(ctx, "stop"); r.Code == 0 {
			return
		}
		if pid := pidFromFile(p.PidFile); pid > 0 {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	})
	return p, logPath
}

// pidFromFile reads the PID the proxy recorded (first line), 0 if none.
func pidFromFile(path string) int {
	f, err := os.Open(path)
	if err != nil {
		return 0
	}
	defer f.Close()
	line, _ := bufio.NewReader(f).ReadString('\n')
	pid, _ := strconv.Atoi(strings.TrimSpace(line))
	return pid
}

// `start -d` returns 0 only once the interception is live: the very next
// acme-tls/1 connection reaches the responder, and status says 0.
func TestStartDetachedReady(t *testing.T) {
	forEachVariantWhere(t, lifecycleVariant, func(t *testing.T, v Variant) {
		s := newTaggedSite(t)
		p, _ := detachedProxy(t, s, v)
		if r := p.RunT("start", "-d"); r.Code != 0 {
			t.Fatalf("start -d: %v", r)
		}
		for _, f := range families {
			if a := s.Cli.MustRequest(t, s.ServerAddr(f, 443), []string{ACMEALPN}); a.Server != "acme" {
				t.Fatalf("%v: right after start -d returned 0, acme-tls/1 was answered by %q", f, a.Server)
			}
		}
		if r := p.RunT("status"); r.Code != 0 {
			t.Errorf("status right after start -d: %v, want exit 0", r)
		}
		if r := p.RunT("stop"); r.Code != 0 {
			t.Fatalf("stop: %v", r)
		}
		if code := p.Status(); code != 3 {
			t.Errorf("status after stop: exit %d, want 3", code)
		}
		requireNoRules(t, s, v)
	})
}

// `start -d` with nothing on port 443 fails with the preflight error and
// leaves nothing behind: no rules, no instance.
func TestStartDetachedFailure(t *testing.T) {
	forEachVariantWhere(t, lifecycleVariant, func(t *testing.T, v Variant) {
		e := NewEnvTagged(t, e3Tag)
		StartACMEServer(t, e.Srv)
		s := &Site{Env: e}
		p, _ := detachedProxy(t, s, v)
		r := p.RunT("start", "-d")
		if r.Code == 0 {
			t.Fatalf("start -d with no web server on 443 succeeded: %v", r)
		}
		if !strings.Contains(r.Output, "preflight") {
			t.Errorf("start -d failed without naming the preflight check: %v", r)
		}
		requireNoRules(t, s, v)
		if code := p.Status(); code != 3 {
			t.Errorf("status after failed start: exit %d, want 3 (nothing running, nothing stale)", code)
		}
	})
}

// `run -- CMD` runs CMD with the interception live, exits with CMD's
// status and leaves no rules.
func TestRunWrapsCommand(t *testing.T) {
	forEachVariantWhere(t, lifecycleVariant, func(t *testing.T, v Variant) {
		s := newTaggedSite(t)
		p := s.NewProxy(t, v)
		dir := t.TempDir()
		started, release := filepath.Join(dir, "started"), filepath.Join(dir, "release")
		// Waits (bounded, 30 s) for the test to be done, then exits 7.
		script := `touch "$1"; i=0; while [ ! -e "$2" ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done; exit 7`
		done := make(chan Result, 1)
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			done <- p.Run(ctx, "run", "--", "sh", "-c", script, "sh", started, release)
		}()
		if !eventually(20*time.Second, func() bool { _, err := os.Stat(started); return err == nil }) {
			os.WriteFile(release, nil, 0o600)
			t.Fatalf("the command did not start within 20 s: %v", <-done)
		}
		for _, f := range families {
			ctx := timeout(t, 10*time.Second)
			a, err := s.Cli.Request(ctx, s.ServerAddr(f, 443), []string{ACMEALPN})
			if err != nil || a.Server != "acme" {
				t.Errorf("%v: while the command runs, acme-tls/1: answered by %q, %v; want acme", f, a.Server, err)
			}
		}
		if code := p.Status(); code != 0 {
			t.Errorf("status while the command runs: exit %d, want 0", code)
		}
		if err := os.WriteFile(release, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		r := <-done
		if r.Err != nil || r.Code != 7 {
			t.Fatalf("run: %v (%v), want the command's exit 7", r, r.Err)
		}
		requireNoRules(t, s, v)
		if code := p.Status(); code != 3 {
			t.Errorf("status after run: exit %d, want 3", code)
		}
		requireBypassed(t, s)
	})
}

// SIGTERM to `run` goes to the command; when it exits, the rules go and
// run exits with the command's status.
func TestRunForwardsSIGTERM(t *testing.T) {
	forEachVariantWhere(t, lifecycleVariant, func(t *testing.T, v Variant) {
		s := newTaggedSite(t)
		p := s.NewProxy(t, v)
		dir := t.TempDir()
		started, got := filepath.Join(dir, "started"), filepath.Join(dir, "got")
		script := `trap 'echo TERM > "$2"; exit 143' TERM; touch "$1"; i=0; while [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done; exit 0`
		cmd := p.command(context.Background(), "run", "--", "sh", "-c", script, "sh", started, got)
		var out syncBuffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		exited := make(chan error, 1)
		go func() { exited <- cmd.Wait() }()
		t.Cleanup(func() {
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-exited
			if t.Failed() {
				t.Logf("run output:\n%s", out.String())
			}
		})
		if !eventually(20*time.Second, func() bool { _, err := os.Stat(started); return err == nil }) {
			t.Fatal("the command did not start within 20 s")
		}
		if a := s.Cli.MustRequest(t, s.ServerAddr(IPv4, 443), []string{ACMEALPN}); a.Server != "acme" {
			t.Fatalf("while the command runs, acme-tls/1 answered by %q", a.Server)
		}
		if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		var err error
		select {
		case err = <-exited:
			exited <- err // for the cleanup
		case <-time.After(30 * time.Second):
			t.Fatal("run still running 30 s after SIGTERM")
		}
		if b, _ := os.ReadFile(got); strings.TrimSpace(string(b)) != "TERM" {
			t.Errorf("the command did not get SIGTERM (it wrote %q)", b)
		}
		if code := cmd.ProcessState.ExitCode(); code != 143 {
			t.Errorf("run exited %d (%v), want the command's status 143", code, err)
		}
		requireNoRules(t, s, v)
		if code := p.Status(); code != 3 {
			t.Errorf("status after run: exit %d, want 3", code)
		}
	})
}

// status: 3 before start, 0 while running (naming backend and mode), 4
// when rules of ours are installed with no proxy running, 3 again once
// stop has removed them. Stale rules come from kill -9 with the iptables
// backend after its guardian was killed too, and for nftables from a plain (non-owner) table like the one
// a kernel without owner tables keeps.
func TestStatusExitCodes(t *testing.T) {
	keep := func(v Variant) bool { return v.Backend == "iptables" || v.Mode == "redirect" }
	forEachVariantWhere(t, keep, func(t *testing.T, v Variant) {
		s := newTaggedSite(t)
		p := s.NewProxy(t, v)
		if code := p.Status(); code != 3 {
			t.Errorf("status before start: exit %d, want 3", code)
		}
		p.Start()
		r := p.RunT("status")
		if r.Code != 0 || !strings.Contains(r.Output, "backend "+v.Backend) || !strings.Contains(r.Output, "mode "+v.Mode) {
			t.Errorf("status while running: %v; want exit 0 naming backend %s and mode %s", r, v.Backend, v.Mode)
		}
		if v.Backend == "nft" {
			p.Stop()
			nftApply(t, s.Srv, `table ip acme-alpn-proxy {
	chain prerouting {
		type nat hook prerouting priority dstnat - 10; policy accept;
		fib daddr type local tcp dport 443 redirect to :21443
	}
}
`)
		} else {
			// Without its guardian a killed instance leaves its rules.
			syscall.Kill(guardianOf(t, p), syscall.SIGKILL)
			if !eventually(5*time.Second, func() bool { return strings.Contains(p.RunLog(), "guardian exited") }) {
				t.Fatalf("guardian kill not noticed:\n%s", p.RunLog())
			}
			p.Kill9()
		}
		if r := p.RunT("status"); r.Code != 4 {
			t.Errorf("status with stale rules: %v, want exit 4", r)
		}
		if r := p.RunT("stop"); r.Code != 0 {
			t.Fatalf("stop with stale rules: %v", r)
		}
		requireNoRules(t, s, v)
		if code := p.Status(); code != 3 {
			t.Errorf("status after stop: exit %d, want 3", code)
		}
		requireBypassed(t, s)
	})
}

// A second SIGINT during the drain cuts in-flight connections and exits at
// once instead of waiting for -drain-timeout. The first one removes the
// interception and keeps in-flight connections working.
func TestSecondSignalForcesExit(t *testing.T) {
	forEachVariantWhere(t, lifecycleVariant, func(t *testing.T, v Variant) {
		s := newTaggedSite(t)
		p := s.NewProxy(t, v, "-drain-timeout", "60s")
		p.Start()
		sess := openProxied(t, s)
		defer sess.Close()
		signalAndRequireBypass(t, s, p, syscall.SIGINT)
		if err := sess.Echo("during the drain"); err != nil {
			t.Fatalf("in-flight connection broke after the first SIGINT: %v", err)
		}
		// Removed for IPv4 is not yet for IPv6 (iptables runs per family).
		if !eventually(10*time.Second, func() bool { return strings.Contains(p.RunLog(), "interception removed") }) {
			t.Fatal("no \"interception removed\" in the log 10 s after SIGINT")
		}
		if code := p.Status(); code == 0 {
			t.Error("status exit 0 while draining with the interception removed")
		}
		select {
		case <-p.Done():
			t.Fatalf("exited after one SIGINT with a connection in flight and -drain-timeout 60s: %v", p.ExitErr())
		case <-time.After(500 * time.Millisecond):
		}

		p.Signal(syscall.SIGINT)
		if err := p.WaitExit(5 * time.Second); err != nil {
			t.Fatalf("second SIGINT did not force the exit: %v", err)
		}
		sess.Conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := sess.r.ReadByte(); err == nil || isTimeout(err) {
			t.Errorf("in-flight connection still open after the forced exit (read: %v)", err)
		}
		if !logHas(p.RunLog(), "second signal") {
			t.Error("no log line about the second signal")
		}
		requireNoRules(t, s, v)
		if code := p.Status(); code != 3 {
			t.Errorf("status after the forced exit: exit %d, want 3", code)
		}
	})
}

// openProxied opens a TLS session through the proxy (IPv4, h2).
func openProxied(t *testing.T, s *Site) *Session {
	t.Helper()
	sess, err := s.Cli.OpenTLS(timeout(t, 10*time.Second), s.ServerAddr(IPv4, 443), []string{"h2"})
	if err != nil {
		t.Fatal(err)
	}
	requireProxied(t, s, IPv4, sess.Answer)
	return sess
}

// signalAndRequireBypass sends sig to the proxy and requires new
// connections, acme-tls/1 ones too, to reach the web server directly
// within 5 s: the interception went first.
func signalAndRequireBypass(t *testing.T, s *Site, p *Proxy, sig syscall.Signal) {
	t.Helper()
	p.Signal(sig)
	var last Answer
	if !eventually(5*time.Second, func() bool {
		last = s.Cli.MustRequest(t, s.ServerAddr(IPv4, 443), []string{ACMEALPN})
		return last.Server == "web" && last.Peer == last.Local
	}) {
		t.Fatalf("5 s after %v new connections still reach the proxy (%s saw %s)", sig, last.Server, last.Peer)
	}
}

// signalVariant: signal handling is the same code for every backend.
func signalVariant(v Variant) bool { return v.Backend == "nft" && v.Mode == "redirect" }

// SIGHUP (the terminal went away) stops the proxy like SIGTERM: the
// interception goes, the in-flight connection finishes, exit 0. Started
// under nohup (SIGHUP ignored), the proxy keeps running.
func TestHangupStopsCleanly(t *testing.T) {
	forEachVariantWhere(t, signalVariant, func(t *testing.T, v Variant) {
		t.Run("terminal", func(t *testing.T) {
			s := newTaggedSite(t)
			p := s.NewProxy(t, v, "-drain-timeout", "60s")
			p.Start()
			sess := openProxied(t, s)
			defer sess.Close()
			signalAndRequireBypass(t, s, p, syscall.SIGHUP)
			if err := sess.Echo("during the drain"); err != nil {
				t.Fatalf("in-flight connection broke after SIGHUP: %v", err)
			}
			sess.Close()
			if err := p.WaitExit(10 * time.Second); err != nil {
				t.Fatalf("not exited 10 s after its last connection closed: %v", err)
			}
			if err := p.ExitErr(); err != nil {
				t.Errorf("exit after SIGHUP: %v, want 0", err)
			}
			if !logHas(p.RunLog(), "msg=stopping", "signal=hangup") {
				t.Error("no msg=stopping line naming the hangup")
			}
			requireNoRules(t, s, v)
		})
		t.Run("nohup", func(t *testing.T) {
			s := newTaggedSite(t)
			p := s.NewProxy(t, v)
			p.Wrapper = []string{"sh", "-c", `trap "" HUP; exec "$@"`, "sh"}
			p.Start()
			p.Signal(syscall.SIGHUP)
			select {
			case <-p.Done():
				t.Fatalf("SIGHUP ended a proxy started with it ignored: %v", p.ExitErr())
			case <-time.After(time.Second):
			}
			if a := s.Cli.MustRequest(t, s.ServerAddr(IPv4, 443), []string{ACMEALPN}); a.Server != "acme" {
				t.Fatalf("after an ignored SIGHUP, acme-tls/1 answered by %q", a.Server)
			}
			p.Stop()
		})
	})
}

// A log reader on stderr that goes away (a pipe to a collector that
// restarts) must not take the proxy down with the next log line: the
// default SIGPIPE on fd 2 would end it mid-connection.
func TestLogReaderGoneKeepsServing(t *testing.T) {
	forEachVariantWhere(t, signalVariant, func(t *testing.T, v Variant) {
		s := newTaggedSite(t)
		p := s.NewProxy(t, v)
		cmd := p.command(context.Background(), "start")
		pr, pw, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stdout, cmd.Stderr = pw, pw
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		pw.Close()
		var waitErr error
		exited := make(chan struct{})
		go func() { waitErr = cmd.Wait(); close(exited) }()
		t.Cleanup(func() {
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-exited
		})
		ready := make(chan bool, 1)
		go func() {
			sc := bufio.NewScanner(pr)
			for sc.Scan() {
				if strings.Contains(sc.Text(), "msg=ready") {
					ready <- true
					return
				}
			}
			ready <- false
		}()
		select {
		case ok := <-ready:
			if !ok {
				<-exited
				t.Fatalf("proxy ended before ready: %v", waitErr)
			}
		case <-time.After(20 * time.Second):
			t.Fatal("proxy not ready after 20 s")
		}
		pr.Close()
		for i := range 3 {
			if a := s.Cli.MustRequest(t, s.ServerAddr(IPv4, 443), []string{ACMEALPN}); a.Server != "acme" {
				t.Fatalf("request %d after the log reader left: answered by %q, want the proxy's acme route", i, a.Server)
			}
		}
		select {
		case <-exited:
			t.Fatalf("proxy ended after its log reader left: %v", waitErr)
		case <-time.After(200 * time.Millisecond):
		}
		if r := p.RunT("stop"); r.Code != 0 {
			t.Fatalf("stop: %v", r)
		}
		select {
		case <-exited:
			if waitErr != nil {
				t.Errorf("exit after stop: %v, want 0", waitErr)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("not exited 10 s after stop")
		}
		requireNoRules(t, s, v)
	})
}

// Ctrl-Z would suspend the proxy with the interception live, and every new
// connection to port 443 would wait in its accept queue: it is refused.
func TestCtrlZDoesNotSuspend(t *testing.T) {
	forEachVariantWhere(t, signalVariant, func(t *testing.T, v Variant) {
		s := newTaggedSite(t)
		p := s.NewProxy(t, v)
		p.Start()
		p.Signal(syscall.SIGTSTP)
		time.Sleep(200 * time.Millisecond)
		ctx := timeout(t, 5*time.Second)
		a, err := s.Cli.Request(ctx, s.ServerAddr(IPv4, 443), []string{ACMEALPN})
		if err != nil {
			t.Fatalf("request after SIGTSTP: %v (a suspended proxy leaves it waiting)", err)
		}
		if a.Server != "acme" {
			t.Fatalf("after SIGTSTP, acme-tls/1 answered by %q", a.Server)
		}
		if !eventually(2*time.Second, func() bool { return logHas(p.RunLog(), "not suspending") }) {
			t.Error("no warning about the refused suspension")
		}
		p.Stop()
	})
}

// A proxy suspended with SIGSTOP (a debugger, kill -STOP) leaves redirected
// connections waiting: status says so, and stop resumes it so that it acts
// on the stop at once instead of timing out with the interception live.
func TestStopResumesSuspendedInstance(t *testing.T) {
	forEachVariantWhere(t, signalVariant, func(t *testing.T, v Variant) {
		s := newTaggedSite(t)
		p := s.NewProxy(t, v, "-drain-timeout", "2s")
		p.Start()
		p.Signal(syscall.SIGSTOP)
		var r Result
		if !eventually(5*time.Second, func() bool { r = p.RunT("status"); return r.Code == 1 }) || !strings.Contains(r.Output, "suspended") {
			t.Errorf("status of a suspended instance: %v; want exit 1 saying it is suspended", r)
		}
		// Unresumed, the instance never acts on SIGTERM: stop gives up
		// after -drain-timeout + 30 s with exit 1.
		if r := p.RunT("stop"); r.Code != 0 {
			t.Fatalf("stop of a suspended instance: %v", r)
		}
		if err := p.WaitExit(2 * time.Second); err != nil {
			t.Fatalf("stop returned 0 but the instance did not exit: %v", err)
		}
		requireNoRules(t, s, v)
		requireBypassed(t, s)
	})
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

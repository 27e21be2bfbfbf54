package main

import (
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestParseArgsFlagsBeforeAndAfterCommand(t *testing.T) {
	cfg, cmd, rest, err := parseArgs([]string{"-port", "8443", "start", "-d", "-listen", ":9443", "-mode", "redirect"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if cmd != "start" || !cfg.daemon || cfg.port != 8443 || cfg.listenPort != 9443 || cfg.mode != "redirect" || len(rest) != 0 {
		t.Fatalf("got cmd=%q cfg=%+v rest=%q", cmd, cfg, rest)
	}
	_, cmd, rest, err = parseArgs([]string{"-alpn", "127.0.0.1:4000", "run", "--", "lego", "-x", "run"}, io.Discard)
	if err != nil || cmd != "run" || strings.Join(rest, " ") != "lego -x run" {
		t.Fatalf("run: cmd=%q rest=%q err=%v", cmd, rest, err)
	}
}

func TestParseArgsRejectsWithCause(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{nil, "missing command"},
		{[]string{"restart"}, "unknown command"},
		{[]string{"-port", "0", "start"}, "-port"},
		{[]string{"-listen", ":443", "start"}, "equals -port"},
		{[]string{"-listen", "21443", "start"}, "-listen"},
		{[]string{"-alpn", ":31443", "start"}, "host is empty"},
		{[]string{"-fallback", "web", "start"}, "-fallback"},
		{[]string{"-backend", "pf", "start"}, "-backend"},
		{[]string{"-mode", "dnat", "start"}, "-mode"},
		{[]string{"-hello-timeout", "0s", "start"}, "-hello-timeout"},
		{[]string{"run"}, "needs a command"},
		{[]string{"stop", "-d"}, "-d goes with start"},
		{[]string{"status", "extra"}, "unexpected arguments"},
	} {
		_, _, _, err := parseArgs(tc.args, io.Discard)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("parseArgs(%q) = %v, want an error mentioning %q", tc.args, err, tc.want)
		}
	}
}

func TestParseArgsRuleSpec(t *testing.T) {
	t.Setenv("ACME_ALPN_PROXY_RULESPEC", "-p tcp --dport 443 -j REDIRECT --to-ports 21443")
	if _, _, _, err := parseArgs([]string{"-backend", "nft", "start"}, io.Discard); err == nil || !strings.Contains(err.Error(), "-backend nft") {
		t.Errorf("RULESPEC with -backend nft: err = %v, want a refusal that says why", err)
	}
	cfg, _, _, err := parseArgs([]string{"start"}, io.Discard)
	if err != nil || cfg.ruleSpec == "" {
		t.Errorf("RULESPEC under auto: cfg=%+v err=%v", cfg, err)
	}
	t.Setenv("ACME_ALPN_PROXY_DISABLEV6", "y")
	if cfg, _, _, _ := parseArgs([]string{"status"}, io.Discard); !cfg.disableV6 {
		t.Error("ACME_ALPN_PROXY_DISABLEV6=y not honoured")
	}
}

func TestPidfileLock(t *testing.T) {
	path := filepath.Join(t.TempDir(), "p.pid")
	if running, _, err := probePidfile(path); running || err != nil {
		t.Fatalf("no file: running=%v err=%v", running, err)
	}
	l, err := lockPidfile(path)
	if err != nil {
		t.Fatal(err)
	}
	// A live PID: a holder that is not the process the file names is
	// waited for (see TestLockPidfileWaitsForCleanup).
	pid := os.Getpid()
	if err := l.write(instanceState{pid: pid, backend: "nft", mode: "tproxy"}); err != nil {
		t.Fatal(err)
	}
	_, err = lockPidfile(path)
	var running *errRunning
	if !errors.As(err, &running) || running.state.pid != pid {
		t.Fatalf("second lock: %v, want errRunning with pid %d", err, pid)
	}
	ok, st, err := probePidfile(path)
	if !ok || err != nil || st.pid != pid || st.backend != "nft" || st.mode != "tproxy" {
		t.Fatalf("probe: running=%v st=%+v err=%v", ok, st, err)
	}
	l.release()
	if ok, _, _ := probePidfile(path); ok {
		t.Fatal("released lock still reads as running")
	}
}

func TestStalePidfileDoesNotBlockStart(t *testing.T) {
	path := filepath.Join(t.TempDir(), "p.pid")
	// A file left by a killed instance: a PID, nobody holding the lock.
	if err := os.WriteFile(path, []byte("1\nbackend=nft mode=tproxy\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if running, _, _ := probePidfile(path); running {
		t.Fatal("stale file reads as running: stop would signal PID 1")
	}
	l, err := lockPidfile(path)
	if err != nil {
		t.Fatalf("stale file blocked the lock: %v", err)
	}
	l.release()
}

func TestScanListeners(t *testing.T) {
	dir := t.TempDir()
	tcp := filepath.Join(dir, "tcp")
	// 127.0.0.1:443 listening, 0.0.0.0:80 established (not a listener).
	os.WriteFile(tcp, []byte(`  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:01BB 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 00000000:0050 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0
`), 0o644)
	tcp6 := filepath.Join(dir, "tcp6")
	os.WriteFile(tcp6, []byte(`  sl  local_address                         remote_address                        st
   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A
   1: 0000000000000000FFFF00000100007F:2710 00000000000000000000000000000000:0000 0A
`), 0o644)
	for _, tc := range []struct {
		file     string
		port     uint16
		wildcard bool
		want     bool
	}{
		{tcp, 443, false, true},
		{tcp, 80, false, false},
		{tcp6, 8080, true, true},
		{tcp6, 10000, false, true},
		{tcp6, 10000, true, false},
	} {
		got, err := scanListeners(tc.file, tc.port, tc.wildcard)
		if err != nil || got != tc.want {
			t.Errorf("scanListeners(%s, %d, wildcard=%v) = %v, %v; want %v", filepath.Base(tc.file), tc.port, tc.wildcard, got, err, tc.want)
		}
	}
}

func TestExitCode(t *testing.T) {
	if exitCode(nil) != 0 {
		t.Error("nil error must be exit 0")
	}
	if exitCode(errors.New("start failed")) != exitFailure {
		t.Error("non-exit error must be exitFailure")
	}
}

func TestSuspendedReadsTheProcessState(t *testing.T) {
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Skipf("no sleep binary: %v", err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	pid := cmd.Process.Pid
	stateIs := func(want bool) bool {
		deadline := time.Now().Add(5 * time.Second)
		for suspended(pid) != want {
			if time.Now().After(deadline) {
				return false
			}
			time.Sleep(10 * time.Millisecond)
		}
		return true
	}
	if !stateIs(false) {
		t.Fatal("a sleeping process reported suspended")
	}
	syscall.Kill(pid, syscall.SIGSTOP)
	if !stateIs(true) {
		t.Fatal("a process stopped by SIGSTOP not reported suspended")
	}
	syscall.Kill(pid, syscall.SIGCONT)
	if !stateIs(false) {
		t.Fatal("a resumed process still reported suspended")
	}
	if suspended(1 << 30) {
		t.Error("a PID that does not exist reported suspended")
	}
}

package main

import (
	"fmt"
	"io"
	"log/slog"
	"os"

	"golang.org/x/sys/unix"
)

// defaultLogPath is the log file when stderr is neither a terminal nor the
// journal (a variable for tests).
var defaultLogPath = "/var/log/acme-alpn-proxy.log"

// openLog returns the logger for a long-running command. Without -log it
// logs to stderr on a terminal or the journal (systemd), and to
// defaultLogPath otherwise; then, when detach is set, it points the
// inherited stdout and stderr at /dev/null so a hook runner that waits for
// them to close (certbot's pre-hook) is not blocked by our lifetime. To
// the journal each line carries its syslog priority.
func openLog(cfg config, stderr io.Writer, detach bool) (*slog.Logger, io.Closer, error) {
	path := resolvedLogPath(cfg)
	if path == "-" {
		if stderrIsJournal() {
			return slog.New(newJournalHandler(stderr, nil)), io.NopCloser(nil), nil
		}
		return slog.New(slog.NewTextHandler(stderr, nil)), io.NopCloser(nil), nil
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o640)
	if err != nil {
		return nil, nil, fmt.Errorf("log file: %w (use -log PATH, or -log - for stderr)", err)
	}
	if detach && cfg.logPath == "" {
		detachStdio()
	}
	return slog.New(slog.NewTextHandler(f, nil)), f, nil
}

// defaultLogTarget is where the log goes without -log: "-" for stderr, or
// defaultLogPath. Only with the file may the inherited stdio be let go.
func defaultLogTarget() string {
	if isTerminal(os.Stderr) || stderrIsJournal() {
		return "-"
	}
	return defaultLogPath
}

// resolvedLogPath is where a long-running command logs: -log, else
// defaultLogTarget's choice.
func resolvedLogPath(cfg config) string {
	if cfg.logPath != "" {
		return cfg.logPath
	}
	return defaultLogTarget()
}

func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// detachStdio replaces fds 1 and 2 with /dev/null (dup, not close, so a
// later open cannot land on them).
func detachStdio() {
	null, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		return
	}
	defer null.Close()
	unix.Dup3(int(null.Fd()), 1, 0)
	unix.Dup3(int(null.Fd()), 2, 0)
}

package main

import (
	"fmt"
	"io"
	"log/slog"
	"os"

	"golang.org/x/sys/unix"
)

const defaultLogPath = "/var/log/acme-alpn-proxy.log"

// openLog returns the logger for a long-running command. Without -log it
// logs to stderr on a terminal, and to defaultLogPath otherwise; then, when
// detach is set, it points the inherited stdout and stderr at /dev/null so a
// hook runner that waits for them to close (certbot's pre-hook) is not
// blocked by our lifetime.
func openLog(cfg config, stderr io.Writer, detach bool) (*slog.Logger, io.Closer, error) {
	path := resolvedLogPath(cfg)
	var w io.Writer = stderr
	var closer io.Closer = io.NopCloser(nil)
	if path != "-" {
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o640)
		if err != nil {
			return nil, nil, fmt.Errorf("log file: %w (use -log PATH, or -log - for stderr)", err)
		}
		w, closer = f, f
		if detach && cfg.logPath == "" {
			detachStdio()
		}
	}
	return slog.New(slog.NewTextHandler(w, nil)), closer, nil
}

// resolvedLogPath is where a long-running command logs: -log, else "-"
// (stderr) on a terminal, else defaultLogPath.
func resolvedLogPath(cfg config) string {
	switch {
	case cfg.logPath != "":
		return cfg.logPath
	case isTerminal(os.Stderr):
		return "-"
	}
	return defaultLogPath
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

package main

import (
	"context"
	"io"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Under systemd, stderr is often a stream to the journal. systemd then
// sets JOURNAL_STREAM to that stream's "device:inode"; it is ours only if
// fd 2 still is that file (a hook runner may have put a pipe there).

// isJournalStream reports whether f is the journal stream that
// JOURNAL_STREAM (the value journalStream) names.
func isJournalStream(f *os.File, journalStream string) bool {
	dev, ino, ok := strings.Cut(journalStream, ":")
	if !ok {
		return false
	}
	wantDev, err1 := strconv.ParseUint(dev, 10, 64)
	wantIno, err2 := strconv.ParseUint(ino, 10, 64)
	if err1 != nil || err2 != nil {
		return false
	}
	fi, err := f.Stat()
	if err != nil {
		return false
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	return ok && uint64(st.Dev) == wantDev && uint64(st.Ino) == wantIno
}

// stderrIsJournal reports whether our stderr is systemd's journal stream.
func stderrIsJournal() bool {
	return isJournalStream(os.Stderr, os.Getenv("JOURNAL_STREAM"))
}

// journalHandler writes each record as one line with its syslog priority
// in front ("<4>level=WARN msg=…", the sd-daemon(3) convention), so the
// journal files it under that priority and `journalctl -p warning` finds
// it. The journal stamps every line itself, so the time is left out.
type journalHandler struct {
	inner slog.Handler // a TextHandler writing to out
	out   *priorityWriter
}

// priorityWriter puts the pending record's prefix in front of the
// TextHandler's single write per record, so prefix and line go out in one
// write. Its mutex spans setting the prefix and the write.
type priorityWriter struct {
	mu     sync.Mutex
	w      io.Writer
	prefix string
	buf    []byte
}

func (p *priorityWriter) Write(b []byte) (int, error) {
	p.buf = append(append(p.buf[:0], p.prefix...), b...)
	if _, err := p.w.Write(p.buf); err != nil {
		return 0, err
	}
	return len(b), nil
}

// newJournalHandler logs records of level and above (nil: info) to w.
func newJournalHandler(w io.Writer, level slog.Leveler) *journalHandler {
	out := &priorityWriter{w: w}
	return &journalHandler{inner: slog.NewTextHandler(out, &slog.HandlerOptions{Level: level}), out: out}
}

// syslogPriority maps a slog level to sd-daemon(3)'s prefixes: error 3,
// warning 4, info 6, debug 7.
func syslogPriority(l slog.Level) string {
	switch {
	case l >= slog.LevelError:
		return "<3>"
	case l >= slog.LevelWarn:
		return "<4>"
	case l >= slog.LevelInfo:
		return "<6>"
	}
	return "<7>"
}

func (h *journalHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return h.inner.Enabled(ctx, l)
}

func (h *journalHandler) Handle(ctx context.Context, r slog.Record) error {
	h.out.mu.Lock()
	defer h.out.mu.Unlock()
	h.out.prefix = syslogPriority(r.Level)
	r.Time = time.Time{} // the text handler then leaves it out
	return h.inner.Handle(ctx, r)
}

func (h *journalHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &journalHandler{inner: h.inner.WithAttrs(as), out: h.out}
}

func (h *journalHandler) WithGroup(name string) slog.Handler {
	return &journalHandler{inner: h.inner.WithGroup(name), out: h.out}
}

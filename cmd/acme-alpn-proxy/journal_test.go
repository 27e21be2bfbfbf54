package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// journalStreamOf is what systemd would put in JOURNAL_STREAM for f.
func journalStreamOf(t *testing.T, f *os.File) string {
	t.Helper()
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	return fmt.Sprintf("%d:%d", st.Dev, st.Ino)
}

func newPipe(t *testing.T) (r, w *os.File) {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close(); w.Close() })
	return r, w
}

func TestIsJournalStream(t *testing.T) {
	_, journal := newPipe(t)
	_, other := newPipe(t)
	env := journalStreamOf(t, journal)
	if !isJournalStream(journal, env) {
		t.Errorf("stream %s not recognised as the journal", env)
	}
	if isJournalStream(other, env) {
		t.Error("another pipe taken for the journal stream")
	}
	dev, _, _ := strings.Cut(env, ":")
	for _, bad := range []string{"", env + "x", dev, dev + ":", ":" + dev, "x:y"} {
		if isJournalStream(journal, bad) {
			t.Errorf("JOURNAL_STREAM=%q matched", bad)
		}
	}
}

func TestJournalHandlerPriorities(t *testing.T) {
	var buf bytes.Buffer
	w := &countingWriter{w: &buf}
	log := slog.New(newJournalHandler(w, slog.LevelDebug))
	log.Debug("probe", "n", 1)
	log.Info("ready", "backend", "nft")
	log.With("family", "IPv6").Warn("IPv6 not intercepted")
	log.WithGroup("conn").Error("removing rules failed", "err", "multi\nline")
	log.Log(context.Background(), slog.LevelInfo+2, "between info and warning")

	lines := strings.Split(strings.TrimSuffix(buf.String(), "\n"), "\n")
	want := []string{
		`<7>level=DEBUG msg=probe n=1`,
		`<6>level=INFO msg=ready backend=nft`,
		`<4>level=WARN msg="IPv6 not intercepted" family=IPv6`,
		`<3>level=ERROR msg="removing rules failed" conn.err="multi\nline"`,
		`<6>level=INFO+2 msg="between info and warning"`,
	}
	if len(lines) != len(want) {
		t.Fatalf("got %d lines, want %d:\n%s", len(lines), len(want), buf.String())
	}
	for i := range want {
		if lines[i] != want[i] {
			t.Errorf("line %d = %q, want %q", i, lines[i], want[i])
		}
	}
	if w.writes != len(want) {
		t.Errorf("%d writes for %d records: prefix and line must go out in one write", w.writes, len(want))
	}
}

type countingWriter struct {
	w      io.Writer
	writes int
}

func (c *countingWriter) Write(b []byte) (int, error) { c.writes++; return c.w.Write(b) }

// journalChildEnv makes the test binary a child that opens the log as
// start does and logs one line per level; its value is the log file path.
const journalChildEnv = "ACME_ALPN_PROXY_TEST_JOURNAL_CHILD"

func TestMain(m *testing.M) {
	if logPath := os.Getenv(journalChildEnv); logPath != "" {
		os.Exit(journalChild(logPath))
	}
	os.Exit(m.Run())
}

func journalChild(logPath string) int {
	defaultLogPath = logPath
	log, closer, err := openLog(config{}, os.Stderr, false)
	if err != nil {
		fmt.Println("openLog:", err)
		return 2
	}
	log.Info("ready", "families", "IPv4")
	log.Warn("IPv6 not intercepted")
	log.Error("start failed")
	closer.Close()
	return 0
}

// runJournalChild runs the child with stderr on a fresh pipe and
// JOURNAL_STREAM naming that pipe, or (match false) another one. It
// returns what came through stderr and what went to the log file.
func runJournalChild(t *testing.T, match bool) (stderr, file string) {
	t.Helper()
	r, w := newPipe(t)
	_, other := newPipe(t)
	stream := journalStreamOf(t, w)
	if !match {
		stream = journalStreamOf(t, other)
	}
	logPath := filepath.Join(t.TempDir(), "proxy.log")
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), journalChildEnv+"="+logPath, "JOURNAL_STREAM="+stream)
	cmd.Stderr = w // the child's fd 2 is this very pipe
	var out bytes.Buffer
	cmd.Stdout = &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w.Close()
	got, _ := io.ReadAll(r)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("child: %v\n%s%s", err, out.String(), got)
	}
	b, _ := os.ReadFile(logPath)
	return string(got), string(b)
}

// Under systemd (stderr is the stream JOURNAL_STREAM names) the log goes
// to stderr with priorities; with stderr elsewhere, to the file as before.
func TestLogToTheJournalStream(t *testing.T) {
	stderr, file := runJournalChild(t, true)
	for _, want := range []string{
		"<6>level=INFO msg=ready families=IPv4\n",
		"<4>level=WARN msg=\"IPv6 not intercepted\"\n",
		"<3>level=ERROR msg=\"start failed\"\n",
	} {
		if !strings.Contains(stderr, want) {
			t.Errorf("journal stream: no line %q in:\n%s", want, stderr)
		}
	}
	if file != "" {
		t.Errorf("logging to the journal also wrote the log file:\n%s", file)
	}

	stderr, file = runJournalChild(t, false)
	if stderr != "" {
		t.Errorf("stderr is not the journal stream, yet got:\n%s", stderr)
	}
	if !strings.Contains(file, "level=WARN msg=\"IPv6 not intercepted\"") || strings.Contains(file, "<4>") || !strings.Contains(file, "time=") {
		t.Errorf("log file should hold plain lines with time, as before:\n%s", file)
	}
}

// The cost of the priority prefix on a connection's log line, against the
// plain text handler used for files.
func BenchmarkConnLine(b *testing.B) {
	line := connLine{route: "acme", end: "client closed", sni: "www.example.org", alpn: "acme-tls/1", up: 418, down: 1904}
	for _, h := range []struct {
		name    string
		handler slog.Handler
	}{
		{"text", slog.NewTextHandler(io.Discard, nil)},
		{"journal", newJournalHandler(io.Discard, nil)},
	} {
		b.Run(h.name, func(b *testing.B) {
			log := slog.New(h.handler)
			b.ReportAllocs()
			for b.Loop() {
				line.write(log)
			}
		})
	}
}

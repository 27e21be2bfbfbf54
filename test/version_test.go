package e2e

// Which build is this: `version` and `-version` print what go build
// stamped into the binary.

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"
)

var revisionLine = regexp.MustCompile(`(?m)^revision  ([0-9a-f]{40})$`)

func runVersion(t *testing.T, bin string, args ...string) string {
	t.Helper()
	out, err := exec.Command(bin, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", bin, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// The binary under test answers both forms alike, with its Go version and
// either the commit it was built from or why it has none (go build stamps
// no VCS information in a linked git worktree or with -buildvcs=false).
func TestVersionOfTheBinaryUnderTest(t *testing.T) {
	requireBinary(t)
	out := runVersion(t, proxyBin, "version")
	if flag := runVersion(t, proxyBin, "-version"); flag != out {
		t.Errorf("-version printed\n%s\nversion printed\n%s", flag, out)
	}
	if !strings.Contains(out, "\ngo        "+runtime.Version()+" ") {
		t.Errorf("no line with the Go version %s:\n%s", runtime.Version(), out)
	}
	if !revisionLine.MatchString(out) && !strings.Contains(out, "revision  unknown (not built by `go build` in a git checkout, or built with -buildvcs=false)") {
		t.Errorf("neither a 40-hex revision nor why there is none:\n%s", out)
	}
}

// Built in a git clone, the binary names the commit, its time, and
// whether the tree had uncommitted changes.
func TestVersionNamesTheCommit(t *testing.T) {
	requireTools(t, "git", "go")
	src, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	// A fresh repository holding the files under test, committed at a
	// known time.
	dir := t.TempDir()
	files, err := exec.Command("git", "-C", src, "ls-files", "-z", "--cached", "--others", "--exclude-standard").Output()
	if err != nil {
		t.Fatalf("git ls-files: %v", err)
	}
	for _, name := range strings.Split(strings.TrimRight(string(files), "\x00"), "\x00") {
		b, err := os.ReadFile(filepath.Join(src, name))
		if os.IsNotExist(err) {
			continue // deleted in the worktree
		}
		if err != nil {
			t.Fatal(err)
		}
		os.MkdirAll(filepath.Join(dir, filepath.Dir(name)), 0o755)
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	git := func(args ...string) string {
		t.Helper()
		cmd := exec.Command("git", append([]string{"-C", dir, "-c", "user.name=e2e", "-c", "user.email=e2e@example.org"}, args...)...)
		cmd.Env = append(os.Environ(), "GIT_AUTHOR_DATE=2026-01-02T03:04:05Z", "GIT_COMMITTER_DATE=2026-01-02T03:04:05Z")
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("git %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return strings.TrimSpace(string(out))
	}
	git("init", "-q")
	git("add", "-A")
	git("commit", "-q", "-m", "under test")
	head := git("rev-parse", "HEAD")
	build := func() string {
		t.Helper()
		bin := filepath.Join(dir, "acme-alpn-proxy")
		cmd := exec.Command("go", "build", "-buildvcs=true", "-o", bin, "./cmd/acme-alpn-proxy")
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("go build: %v\n%s", err, out)
		}
		defer os.Remove(bin) // not part of the tree's state
		return runVersion(t, bin, "version")
	}

	out := build()
	for _, want := range []string{
		"acme-alpn-proxy v0.0.0-20260102030405-" + head[:12] + "\n",
		"revision  " + head + "\n",
		"time      2026-01-02T03:04:05Z\n",
		"modified  false\n",
		"go        " + runtime.Version() + " ",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("clean build: no %q in:\n%s", want, out)
		}
	}

	f, err := os.OpenFile(filepath.Join(dir, "README.md"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("\nan uncommitted change\n")
	f.Close()
	out = build()
	for _, want := range []string{"+dirty\n", "revision  " + head + "\n", "modified  true"} {
		if !strings.Contains(out, want) {
			t.Errorf("build with a change: no %q in:\n%s", want, out)
		}
	}
}

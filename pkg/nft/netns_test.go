package nft

import (
	"crypto/rand"
	"encoding/hex"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// needRoot skips tests that need root and network namespaces when they
// cannot run, except in CI where that is a failure.
func needRoot(t *testing.T) {
	t.Helper()
	reason := ""
	switch {
	case os.Geteuid() != 0:
		reason = "needs root"
	default:
		if _, err := exec.LookPath("ip"); err != nil {
			reason = "needs iproute2 (ip)"
		} else if _, err := exec.LookPath("nft"); err != nil {
			reason = "needs the nft CLI to check what the kernel has"
		}
	}
	if reason == "" {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatal(reason)
	}
	t.Skip(reason)
}

// newNetns creates a named network namespace with loopback up and deletes
// it when the test ends.
func newNetns(t *testing.T) string {
	t.Helper()
	needRoot(t)
	b := make([]byte, 4)
	rand.Read(b)
	ns := "nf-" + hex.EncodeToString(b)
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", ns, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", ns).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", ns, err, out)
		}
	})
	run(t, ns, "ip", "link", "set", "lo", "up")
	return ns
}

// inNetns runs fn on an OS thread switched into ns, so sockets fn creates
// live there. The thread stays locked (and dies with its goroutine) if it
// cannot be switched back.
func inNetns(t *testing.T, ns string, fn func()) {
	t.Helper()
	runtime.LockOSThread()
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatal(err)
	}
	defer orig.Close()
	target, err := os.Open("/var/run/netns/" + ns)
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatal(err)
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		t.Fatalf("setns %s: %v", ns, err)
	}
	defer func() {
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			t.Errorf("restoring network namespace: %v", err)
			return
		}
		runtime.UnlockOSThread()
	}()
	fn()
}

// run runs a command inside ns and returns its output; failure fails the test.
func run(t *testing.T, ns string, args ...string) string {
	t.Helper()
	out, err := runErr(ns, args...)
	if err != nil {
		t.Fatalf("ip netns exec %s %s: %v: %s", ns, strings.Join(args, " "), err, out)
	}
	return out
}

func runErr(ns string, args ...string) (string, error) {
	out, err := exec.Command("ip", append([]string{"netns", "exec", ns}, args...)...).CombinedOutput()
	return string(out), err
}

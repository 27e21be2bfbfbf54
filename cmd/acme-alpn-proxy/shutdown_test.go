package main

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/intercept"
)

// fakeInterceptor records the lifecycle's calls; onRemoveIntercept runs
// inside RemoveIntercept, at the moment the interception goes.
type fakeInterceptor struct {
	calls             []string
	onRemoveIntercept func()
}

func (f *fakeInterceptor) Install(intercept.RuleSet) error {
	f.calls = append(f.calls, "install")
	return nil
}
func (f *fakeInterceptor) RemoveIntercept() error {
	f.calls = append(f.calls, "remove-intercept")
	if f.onRemoveIntercept != nil {
		f.onRemoveIntercept()
	}
	return nil
}
func (f *fakeInterceptor) Remove() error { f.calls = append(f.calls, "remove"); return nil }
func (f *fakeInterceptor) Close() error  { f.calls = append(f.calls, "close"); return nil }

// A connection intercepted just before stop removes the interception
// completes its handshake into the listener's backlog afterwards. It must
// be accepted and served, not reset by a listener closed too early.
func TestShutdownServesHandshakesUnderWay(t *testing.T) {
	web, _ := namedBackend(t, "web")
	lock, err := lockPidfile(filepath.Join(t.TempDir(), "pid"))
	if err != nil {
		t.Fatal(err)
	}
	ls, err := listenAll(context.Background(), "127.0.0.1:0", false, false)
	if err != nil {
		t.Fatal(err)
	}
	logs := &lockedBuffer{}
	p, err := newProxy(slog.New(slog.NewTextHandler(logs, nil)), netip.AddrPort{}, netip.MustParseAddrPort(web),
		443, 1, 5*time.Second, time.Second)
	if err != nil {
		t.Fatal(err)
	}

	dialed := make(chan net.Conn, 1)
	fake := &fakeInterceptor{onRemoveIntercept: func() {
		// The handshake completes into the kernel's backlog; the proxy's
		// accept loop gets to it only a little later.
		c, err := net.Dial("tcp", ls.addrs[0])
		if err != nil {
			t.Errorf("dial during RemoveIntercept: %v", err)
		}
		dialed <- c
		time.AfterFunc(50*time.Millisecond, func() { p.serve(ls) })
	}}
	in := &instance{cfg: config{drainTimeout: 10 * time.Second}, log: p.log, lock: lock, ls: ls, p: p, ic: fake}
	t.Cleanup(in.teardown) // after a failure; a second teardown is harmless
	stopped := make(chan struct{})
	go func() { in.shutdown(make(chan os.Signal)); close(stopped) }()

	late := <-dialed
	if late == nil {
		t.FailNow()
	}
	late.Write([]byte("GET / HTTP/1.0\r\n\r\n"))
	late.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 3)
	if n, err := late.Read(buf); err != nil || string(buf[:n]) != "web" {
		t.Fatalf("connection from the backlog got %q, %v: want the web server, not a reset", buf[:n], err)
	}
	late.Close()
	select {
	case <-stopped:
	case <-time.After(15 * time.Second):
		t.Fatal("shutdown did not finish")
	}
	want := []string{"remove-intercept", "remove", "close"}
	if len(fake.calls) != 3 || fake.calls[0] != want[0] || fake.calls[1] != want[1] || fake.calls[2] != want[2] {
		t.Errorf("calls = %v, want %v: interception first, the rest after the drain", fake.calls, want)
	}
}

package main

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/internal/hellotest"
)

// lockedBuffer collects log output from many goroutines.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// await waits up to 5 s for a log line containing every one of parts:
// connection lines reach the log a little after the connection ends.
func (l *lockedBuffer) await(parts ...string) bool {
	deadline := time.Now().Add(5 * time.Second)
	for {
		for _, line := range strings.Split(l.String(), "\n") {
			if containsAll(line, parts) {
				return true
			}
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func containsAll(s string, parts []string) bool {
	for _, p := range parts {
		if !strings.Contains(s, p) {
			return false
		}
	}
	return true
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// namedBackend accepts connections, records the first bytes each sends and
// answers with its name.
func namedBackend(t *testing.T, name string) (addr string, got chan []byte) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	got = make(chan []byte, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.Write([]byte(name))
				buf := make([]byte, 64<<10)
				c.SetReadDeadline(time.Now().Add(2 * time.Second))
				n, _ := io.ReadAtLeast(c, buf, 1)
				got <- buf[:n]
			}()
		}
	}()
	return ln.Addr().String(), got
}

func startTestProxy(t *testing.T, alpn, fallback string, helloTimeout time.Duration) (*proxy, string, *lockedBuffer) {
	t.Helper()
	logs := &lockedBuffer{}
	p, addr := startTestProxyLog(t, alpn, fallback, helloTimeout, logs)
	return p, addr, logs
}

// startTestProxyLog starts a proxy on a loopback listener; setup, if any,
// runs before it serves.
func startTestProxyLog(t *testing.T, alpn, fallback string, helloTimeout time.Duration, logTo io.Writer, setup ...func(*proxy)) (*proxy, string) {
	t.Helper()
	return startTestProxyWith(t, alpn, fallback, helloTimeout, logTo, func(p *proxy) {
		for _, f := range setup {
			f(p)
		}
	})
}

// startTestProxyWith is startTestProxyLog with setup run before serving.
func startTestProxyWith(t *testing.T, alpn, fallback string, helloTimeout time.Duration, logTo io.Writer, setup func(*proxy)) (*proxy, string) {
	t.Helper()
	ls, err := listenAll(context.Background(), "127.0.0.1:0", false, false)
	if err != nil {
		t.Fatal(err)
	}
	addr := netip.MustParseAddrPort(ls.addrs[0])
	p, err := newProxy(slog.New(slog.NewTextHandler(logTo, nil)), netip.MustParseAddrPort(alpn), netip.MustParseAddrPort(fallback),
		443, addr.Port(), helloTimeout, time.Second)
	if err != nil {
		ls.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.stopAccepting(ls)
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		p.drain(ctx)
	})
	setup(p)
	if err := p.serve(ls); err != nil {
		t.Fatal(err)
	}
	return p, addr.String()
}

// firstBytes dials the proxy, sends a ClientHello offering alpn, and
// returns the backend's greeting.
func firstBytes(t *testing.T, proxyAddr string, alpn []string) string {
	t.Helper()
	c, err := net.DialTimeout("tcp", proxyAddr, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// crypto/tls's hello, written here rather than by a handshake, which
	// would race this function for the backend's reply.
	hello, err := hellotest.For("example.org", alpn)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write(hello); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	buf := make([]byte, 16)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatalf("reading backend greeting: %v", err)
	}
	return string(buf[:n])
}

func TestProxyRoutesByALPN(t *testing.T) {
	acme, acmeGot := namedBackend(t, "acme")
	web, webGot := namedBackend(t, "web")
	_, addr, logs := startTestProxy(t, acme, web, 5*time.Second)

	for _, tc := range []struct {
		alpn []string
		want string
	}{
		{[]string{"acme-tls/1"}, "acme"},
		{[]string{"h2", "acme-tls/1", "http/1.1"}, "acme"},
		{[]string{"h2", "http/1.1"}, "web"},
		{nil, "web"},
	} {
		if got := firstBytes(t, addr, tc.alpn); got != tc.want {
			t.Errorf("ALPN %q went to %q, want %q", tc.alpn, got, tc.want)
		}
		ch := webGot
		if tc.want == "acme" {
			ch = acmeGot
		}
		select {
		case b := <-ch:
			if len(b) < 5 || b[0] != 0x16 {
				t.Errorf("backend %s did not get the ClientHello first: % x", tc.want, b[:min(len(b), 8)])
			}
		case <-time.After(3 * time.Second):
			t.Errorf("backend %s got no bytes", tc.want)
		}
	}
	if !logs.await(`route=acme`, `sni=example.org`) {
		t.Errorf("log lacks route/sni fields:\n%s", logs)
	}
}

func TestProxyForwardsNonTLSAtOnce(t *testing.T) {
	web, webGot := namedBackend(t, "web")
	_, addr, _ := startTestProxy(t, "127.0.0.1:1", web, 10*time.Second)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("GET / HTTP/1.0\r\n\r\n"))
	c.SetReadDeadline(time.Now().Add(2 * time.Second)) // far below -hello-timeout
	buf := make([]byte, 8)
	n, err := c.Read(buf)
	if err != nil || string(buf[:n]) != "web" {
		t.Fatalf("non-TLS client got %q, %v; want the web server at once", buf[:n], err)
	}
	if b := <-webGot; !strings.HasPrefix(string(b), "G") {
		t.Fatalf("web server got %q, want the request bytes intact", b)
	}
}

func TestProxyClosesStalledClientAtHelloTimeout(t *testing.T) {
	web, _ := namedBackend(t, "web")
	_, addr, logs := startTestProxy(t, "127.0.0.1:1", web, 300*time.Millisecond)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte{0x16, 0x03, 0x01}) // a record header, then silence
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatal("stalled client got data")
	} else if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatal("stalled client was not closed by the proxy")
	}
	if !logs.await(`end="hello timeout"`) {
		t.Errorf("log does not say hello timeout:\n%s", logs)
	}
}

func TestProxySurvivesDeadBackend(t *testing.T) {
	// Port 1 on loopback refuses connections.
	p, addr, logs := startTestProxy(t, "127.0.0.1:1", "127.0.0.1:1", time.Second)
	for range 3 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatalf("listener stopped serving after a failed dial: %v", err)
		}
		c.Write([]byte("x"))
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil {
			t.Fatal("client of a dead backend got data")
		}
		c.Close()
	}
	deadline := time.Now().Add(2 * time.Second)
	for p.inFlight() > 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := p.inFlight(); n != 0 {
		t.Errorf("%d connections still tracked after their backend refused", n)
	}
	if !logs.await(`end="dial failed"`) {
		t.Errorf("log does not say dial failed:\n%s", logs)
	}
}

func TestDrainCutsOffAtDeadline(t *testing.T) {
	web, _ := namedBackend(t, "web")
	p, addr, _ := startTestProxy(t, "127.0.0.1:1", web, time.Second)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("x"))
	c.Read(make([]byte, 3)) // connected through to the web backend
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if cut := p.drain(ctx); cut != 1 {
		t.Fatalf("drain cut %d connections, want the 1 still open", cut)
	}
}

// gatedWriter is a log whose writes block until open is closed, like a
// terminal paused with Ctrl-S.
type gatedWriter struct {
	open chan struct{}
	lockedBuffer
}

func (g *gatedWriter) Write(p []byte) (int, error) {
	<-g.open
	return g.lockedBuffer.Write(p)
}

// A log that blocks must not stall connections: their lines wait, and are
// all written once the log moves again.
func TestBlockedLogDoesNotStallConnections(t *testing.T) {
	web, _ := namedBackend(t, "web")
	logs := &gatedWriter{open: make(chan struct{})}
	_, addr := startTestProxyLog(t, "127.0.0.1:1", web, 5*time.Second, logs)
	var once sync.Once
	unblock := func() { once.Do(func() { close(logs.open) }) }
	t.Cleanup(unblock) // before the proxy's cleanup, which writes the log

	const n = 12 // namedBackend's connections end only while its channel has room
	for i := range n {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte("GET / HTTP/1.0\r\n\r\n"))
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		buf := make([]byte, 3)
		if _, err := io.ReadFull(c, buf); err != nil {
			c.Close()
			t.Fatalf("connection %d, with the log blocked: %v", i, err)
		}
		c.Close()
		time.Sleep(5 * time.Millisecond) // let the line be queued and the log block
	}
	unblock()
	deadline := time.Now().Add(5 * time.Second)
	for strings.Count(logs.String(), "msg=conn") < n && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got := strings.Count(logs.String(), "msg=conn"); got != n {
		t.Errorf("%d connection lines once the log moved, want %d", got, n)
	}
}

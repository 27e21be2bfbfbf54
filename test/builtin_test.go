package e2e

import (
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/internal/hellotest"
)

// Bad input offering acme-tls/1 to the built-in responder (-alpn-certs)
// ends within -hello-timeout, over IPv4 and IPv6: a truncated hello, an
// oversized one (it goes to the web server, which drops it), garbage
// after a whole hello, and a handshake that stalls after the hello. Each
// gets one log line; afterwards the proxy holds no more sockets than
// before, and stop finds nothing in flight. A real handshake before and
// after shows the responder serving the hook's certificate.
func TestBuiltinBadInputBounded(t *testing.T) {
	const name = "web.acme-alpn-proxy.test"
	s := NewSite(t)
	dir := t.TempDir()
	p := s.NewProxy(t, variants[0], "-hello-timeout", "2s", "-alpn-certs", dir)
	p.Start()
	if r := p.RunT("hook", "begin", "tls-alpn-01", name, "token", "token.thumbprint"); r.Code != 0 {
		t.Fatalf("hook begin: %v", r)
	}
	challenge := func(f Family) {
		t.Helper()
		conn, err := s.Cli.Dial(timeout(t, 5*time.Second), s.ServerAddr(f, 443))
		if err != nil {
			t.Fatal(err)
		}
		tc := tls.Client(conn, &tls.Config{ServerName: name, NextProtos: []string{ACMEALPN}, InsecureSkipVerify: true})
		defer tc.Close()
		tc.SetDeadline(time.Now().Add(10 * time.Second))
		if err := tc.Handshake(); err != nil {
			t.Fatalf("%v: acme-tls/1 handshake: %v", f, err)
		}
		if cs := tc.ConnectionState(); cs.NegotiatedProtocol != ACMEALPN || cs.PeerCertificates[0].DNSNames[0] != name {
			t.Fatalf("%v: negotiated %q, certificate for %v", f, cs.NegotiatedProtocol, cs.PeerCertificates[0].DNSNames)
		}
	}
	challenge(IPv4)
	sockets := procSockets(t, p.Pid())

	hello, err := hellotest.For(name, []string{ACMEALPN})
	if err != nil {
		t.Fatal(err)
	}
	// The handshake header's 24-bit length, claiming a 1 MiB ClientHello.
	oversized := bytes.Clone(hello)
	oversized[6], oversized[7], oversized[8] = 0x10, 0, 0
	cases := []struct {
		name, end string
		send      []byte
		waits     bool // until -hello-timeout
	}{
		{"truncated", `end="hello timeout"`, hello[:len(hello)/2], true},
		{"oversized", `hello="too large"`, oversized, false},
		{"garbage", `end="handshake failed"`, append(bytes.Clone(hello), 0x16, 3, 3, 0, 4, 'j', 'u', 'n', 'k'), false},
		{"stalled", `end="handshake timeout"`, hello, true},
	}
	conns := 1
	for _, f := range families {
		for _, c := range cases {
			t.Run(f.String()+"/"+c.name, func(t *testing.T) {
				conn, err := s.Cli.Dial(timeout(t, 5*time.Second), s.ServerAddr(f, 443))
				if err != nil {
					t.Fatal(err)
				}
				defer conn.Close()
				conns++
				begin := time.Now()
				if _, err := conn.Write(c.send); err != nil {
					t.Fatal(err)
				}
				conn.SetReadDeadline(time.Now().Add(15 * time.Second))
				buf := make([]byte, 4096)
				for err == nil {
					_, err = conn.Read(buf)
				}
				took := time.Since(begin)
				var ne net.Error
				switch {
				case errors.As(err, &ne) && ne.Timeout():
					t.Fatalf("still open after %v with -hello-timeout 2s", took.Round(time.Millisecond))
				case took > 10*time.Second:
					t.Fatalf("closed only after %v with -hello-timeout 2s", took.Round(time.Millisecond))
				case c.waits && took < time.Second:
					t.Fatalf("closed after %v, before -hello-timeout 2s: %v", took.Round(time.Millisecond), err)
				}
				t.Logf("closed after %v: %v", took.Round(time.Millisecond), err)
			})
		}
	}
	challenge(IPv6)
	conns++
	deadline := time.Now().Add(10 * time.Second)
	for procSockets(t, p.Pid()) > sockets && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if n := procSockets(t, p.Pid()); n > sockets {
		t.Errorf("the proxy holds %d sockets, %d before the bad connections", n, sockets)
	}
	p.Stop()
	log := p.Log()
	if n := strings.Count(log, "msg=conn"); n != conns {
		t.Errorf("%d connection lines for %d connections", n, conns)
	}
	for _, c := range cases {
		if n := strings.Count(log, c.end); n != len(families) {
			t.Errorf("%s: %d log lines with %s, want %d", c.name, n, c.end, len(families))
		}
	}
	if n := strings.Count(log, `end="challenge answered"`); n != 2 {
		t.Errorf("%d answered challenges logged, want 2", n)
	}
	if !strings.Contains(log, "in_flight_at_stop=0") {
		t.Errorf("connections in flight at stop")
	}
}

// procSockets counts the open sockets of process pid (not its pipes: the
// relay keeps splice pipes pooled after the web server's connection).
func procSockets(t *testing.T, pid int) int {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range ents {
		if l, err := os.Readlink(dir + "/" + e.Name()); err == nil && strings.HasPrefix(l, "socket:") {
			n++
		}
	}
	return n
}

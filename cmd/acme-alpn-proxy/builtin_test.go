package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/internal/hellotest"
	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/alpncert"
)

// tlsWebServer is a TLS server with its own self-signed certificate that
// completes handshakes (offering h2 and http/1.1) and closes.
func tlsWebServer(t *testing.T) (addr string, der []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), DNSNames: []string{"web.example.org"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err = x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}},
		NextProtos:   []string{"h2", "http/1.1"},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				c.SetDeadline(time.Now().Add(5 * time.Second))
				c.(*tls.Conn).Handshake()
				c.Close()
			}()
		}
	}()
	return ln.Addr().String(), der
}

func startBuiltinProxy(t *testing.T, helloTimeout time.Duration) (p *proxy, addr, dir, webAddr string, webDER []byte, logs *lockedBuffer) {
	t.Helper()
	webAddr, webDER = tlsWebServer(t)
	dir = t.TempDir()
	logs = &lockedBuffer{}
	p, addr = startTestProxyWith(t, "127.0.0.1:1", webAddr, helloTimeout, logs, func(p *proxy) {
		p.builtin = alpncert.NewResponder(dir)
	})
	return p, addr, dir, webAddr, webDER, logs
}

// peerCert does a real TLS handshake through the proxy and returns the
// certificate the client was shown.
func peerCert(t *testing.T, addr, name string, alpn []string) ([]byte, error) {
	t.Helper()
	var der []byte
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, &tls.Config{
		ServerName: name, NextProtos: alpn, InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error { der = cs.PeerCertificates[0].Raw; return nil },
	})
	if err == nil {
		c.Close()
	}
	return der, err
}

// With -alpn-certs a client offering acme-tls/1 gets the challenge
// certificate from the proxy itself, and its log line says so; a client
// that does not offer it reaches the web server and its certificate,
// although a challenge certificate for its name exists.
func TestBuiltinAnswersOnlyACME(t *testing.T) {
	_, addr, dir, _, webDER, logs := startBuiltinProxy(t, 5*time.Second)
	digest := sha256.Sum256([]byte("token.thumbprint"))
	certPath, err := alpncert.WriteChallenge(dir, "web.example.org", digest)
	if err != nil {
		t.Fatal(err)
	}
	for _, alpn := range [][]string{nil, {"h2", "http/1.1"}} {
		der, err := peerCert(t, addr, "web.example.org", alpn)
		if err != nil || !bytes.Equal(der, webDER) {
			t.Errorf("alpn %q: handshake %v; got the web server's certificate: %v", alpn, err, bytes.Equal(der, webDER))
		}
	}
	der, err := peerCert(t, addr, "web.example.org", []string{alpncert.Protocol})
	if err != nil {
		t.Fatalf("acme-tls/1 handshake: %v", err)
	}
	pair, err := tls.LoadX509KeyPair(certPath, filepath.Join(dir, "web.example.org"+alpncert.KeySuffix))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(der, pair.Certificate[0]) {
		t.Error("acme-tls/1 client did not get the challenge certificate")
	}
	if !logs.await("route=acme", "backend=built-in", "cert=web.example.org.crt.pem", `end="challenge answered"`) {
		t.Errorf("no log line for the answered challenge:\n%s", logs)
	}
	if n := strings.Count(logs.String(), "route=fallback"); n != 2 {
		t.Errorf("%d connections to the web server logged, want 2:\n%s", n, logs)
	}

	// No certificate for the name: an alert, and the log names the file.
	if _, err := peerCert(t, addr, "other.example.org", []string{alpncert.Protocol}); err == nil {
		t.Error("handshake for a name without a certificate succeeded")
	}
	missing := filepath.Join(dir, "other.example.org.crt.pem")
	if !logs.await("route=acme", "backend=built-in", `end="handshake failed"`, missing) {
		t.Errorf("no log line naming %s:\n%s", missing, logs)
	}
}

// Bad input offering acme-tls/1 (a truncated hello, garbage after the
// hello, a handshake that stalls) ends within -hello-timeout, with one
// log line each, and leaves no goroutine or descriptor behind.
func TestBuiltinBadInputBounded(t *testing.T) {
	p, addr, dir, _, _, logs := startBuiltinProxy(t, 300*time.Millisecond)
	if _, err := alpncert.WriteChallenge(dir, "web.example.org", sha256.Sum256(nil)); err != nil {
		t.Fatal(err)
	}
	hello, err := hellotest.For("web.example.org", []string{alpncert.Protocol})
	if err != nil {
		t.Fatal(err)
	}
	fds := countOpenFDs(t)
	goroutines := runtime.NumGoroutine()
	cases := []struct {
		name, end string
		send      []byte
	}{
		{"truncated", `end="hello timeout"`, hello[:len(hello)/2]},
		{"stalled", `end="handshake timeout"`, hello},
		{"garbage", `end="handshake failed"`, append(bytes.Clone(hello), 0x16, 3, 3, 0, 8, 'g', 'a', 'r', 'b', 'a', 'g', 'e', '!')},
	}
	for _, tc := range cases {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		c.Write(tc.send)
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		began := time.Now()
		buf := make([]byte, 4096)
		for err == nil {
			_, err = c.Read(buf)
		}
		c.Close()
		if time.Since(began) > 5*time.Second {
			t.Errorf("%s: the proxy held the connection %v (hello timeout 300ms)", tc.name, time.Since(began))
		}
		if !logs.await("route=", tc.end) {
			t.Errorf("%s: no log line with %s:\n%s", tc.name, tc.end, logs)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for (p.inFlight() > 0 || runtime.NumGoroutine() > goroutines || countOpenFDs(t) > fds) && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if p.inFlight() != 0 || runtime.NumGoroutine() > goroutines || countOpenFDs(t) > fds {
		t.Errorf("after the bad connections: %d in flight, goroutines %d (before %d), descriptors %d (before %d)",
			p.inFlight(), runtime.NumGoroutine(), goroutines, countOpenFDs(t), fds)
	}
	if n := strings.Count(logs.String(), "msg=conn"); n != len(cases) {
		t.Errorf("%d connection lines for %d connections:\n%s", n, len(cases), logs)
	}
}

func countOpenFDs(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

func TestHookExitCodes(t *testing.T) {
	dir := t.TempDir()
	auth := "tok.thumb"
	var stderr bytes.Buffer
	if code := runHook(dir, []string{"begin", "http-01", "web.example.org", "tok", auth}, &stderr); code == 0 {
		t.Error("hook accepted an http-01 challenge")
	}
	if code := runHook(dir, []string{"begin", "tls-alpn-01", "../web", "tok", auth}, &stderr); code == 0 {
		t.Error("hook accepted the identifier ../web")
	}
	// uacme execs its -h PROGRAM with its five arguments only.
	t.Setenv(alpnCertsEnv, dir)
	if code := realMain([]string{"begin", "tls-alpn-01", "web.example.org", "tok", auth}, &stderr, &stderr); code != 0 {
		t.Fatalf("bare hook call: exit %d: %s", code, stderr.String())
	}
	if _, err := os.Stat(filepath.Join(dir, "web.example.org.crt.pem")); err != nil {
		t.Errorf("begin wrote no certificate: %v", err)
	}
	if code := realMain([]string{"-alpn-certs", dir, "hook", "done", "tls-alpn-01", "web.example.org", "tok", auth}, &stderr, &stderr); code != 0 {
		t.Fatalf("hook done: exit %d: %s", code, stderr.String())
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Errorf("done left %v", ents)
	}
}

func TestAlpnCertsFlag(t *testing.T) {
	for _, args := range [][]string{
		{"-alpn-certs", "d", "-alpn", "127.0.0.1:31443", "start"},
		{"-alpn", "127.0.0.1:31443", "start", "-alpn-certs", "d"},
	} {
		_, _, _, err := parseArgs(args, io.Discard)
		if err == nil || !strings.Contains(err.Error(), "exclude each other") {
			t.Errorf("%q: %v, want -alpn-certs and -alpn refused together", args, err)
		}
	}
	cfg, cmd, rest, err := parseArgs([]string{"-alpn-certs", "rel/dir", "hook", "-pidfile", "/x", "begin", "tls-alpn-01", "a.example", "tok", "-leading-dash"}, io.Discard)
	if err != nil || cmd != "hook" || !filepath.IsAbs(cfg.alpnCerts) || len(rest) != 5 || rest[4] != "-leading-dash" {
		t.Errorf("hook parse: cfg.alpnCerts=%q cmd=%q rest=%q err=%v", cfg.alpnCerts, cmd, rest, err)
	}
}

// stop's drain waits for a handshake of the built-in responder in flight,
// which -hello-timeout bounds, rather than cutting it.
func TestBuiltinDrainWaitsForHandshake(t *testing.T) {
	p, addr, dir, _, _, logs := startBuiltinProxy(t, 500*time.Millisecond)
	if _, err := alpncert.WriteChallenge(dir, "web.example.org", sha256.Sum256(nil)); err != nil {
		t.Fatal(err)
	}
	hello, err := hellotest.For("web.example.org", []string{alpncert.Protocol})
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write(hello) // and never the client's Finished
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err != nil { // the server's flight: taken over
		t.Fatalf("no ServerHello: %v", err)
	}
	if n := p.inFlight(); n != 1 {
		t.Fatalf("%d in flight during the handshake, want 1", n)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if cut := p.engine.Drain(ctx); cut != 0 {
		t.Errorf("drain cut %d connections, want it to wait for the handshake's end", cut)
	}
	if !logs.await("backend=built-in", `end="handshake timeout"`) {
		t.Errorf("no log line for the drained handshake:\n%s", logs)
	}
}

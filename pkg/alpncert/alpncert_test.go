package alpncert

import (
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/asn1"
	"encoding/base64"
	"encoding/pem"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/internal/hellotest"
)

const keyAuth = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA.9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"

func TestFileBase(t *testing.T) {
	ok := map[string]string{
		"example.org":                        "example.org",
		"WWW.Example.ORG":                    "www.example.org",
		"xn--bcher-kva.example":              "xn--bcher-kva.example",
		"_acme.a-b.example":                  "_acme.a-b.example",
		"1.2.0.192.in-addr.arpa":             "192.0.2.1",
		"4.3.2.1.IN-ADDR.ARPA":               "1.2.3.4",
		ReverseName(mustAddr("2001:db8::1")): "2001:db8::1",
		ReverseName(mustAddr("fd00::a:b")):   "fd00::a:b",
	}
	for in, want := range ok {
		if got, err := FileBase(in); err != nil || got != want {
			t.Errorf("FileBase(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	refused := []string{
		"", ".", "..", "../etc/passwd", "a/b", "a..b", ".example.org", "example.org.",
		"a\\b", "a b", "a\x00b", "*.example.org", "ex%2fample", strings.Repeat("a", 300),
		strings.Repeat("a", 64) + ".org", strings.Repeat("a.", 127) + "ab", // 255 bytes
		"1.2.3.in-addr.arpa", "256.2.3.4.in-addr.arpa", "01.2.3.4.in-addr.arpa",
		"1.2.ip6.arpa", strings.Repeat("g.", 32) + "ip6.arpa",
	}
	for _, in := range refused {
		if got, err := FileBase(in); err == nil {
			t.Errorf("FileBase(%q) = %q, want it refused", in, got)
		}
	}
}

func TestIdentFileBase(t *testing.T) {
	ok := map[string]string{
		"Example.org": "example.org", "192.0.2.1": "192.0.2.1",
		"2001:0db8:0::1": "2001:db8::1", "::ffff:192.0.2.1": "192.0.2.1",
	}
	for in, want := range ok {
		if got, err := IdentFileBase(in); err != nil || got != want {
			t.Errorf("IdentFileBase(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"", "../x", "a/b", "fe80::1%eth0", "1.2.0.192.in-addr.arpa", strings.Repeat("a", 300)} {
		if _, err := IdentFileBase(in); err == nil {
			t.Errorf("IdentFileBase(%q) accepted", in)
		}
	}
}

func mustAddr(s string) netip.Addr { return netip.MustParseAddr(s) }

func TestKeyAuthDigest(t *testing.T) {
	want := sha256.Sum256([]byte(keyAuth))
	for _, in := range []string{keyAuth, base64.RawURLEncoding.EncodeToString(want[:])} {
		if got, err := KeyAuthDigest(in); err != nil || got != want {
			t.Errorf("KeyAuthDigest(%q) = %x, %v; want %x", in, got, err, want)
		}
	}
	for _, in := range []string{"", "abc", base64.RawURLEncoding.EncodeToString(want[:31])} {
		if _, err := KeyAuthDigest(in); err == nil {
			t.Errorf("KeyAuthDigest(%q) accepted", in)
		}
	}
}

// The certificate WriteChallenge writes has exactly what RFC 8737 asks:
// self-signed, one subjectAltName naming the identifier, the critical
// acmeIdentifier extension with the OCTET STRING of SHA-256(key
// authorization); its key is fresh and readable by the owner only.
func TestWriteChallengeRFC8737(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "alpn")
	digest, _ := KeyAuthDigest(keyAuth)
	var keys [][]byte
	for _, ident := range []string{"web.example.org", "192.0.2.1", "2001:db8::1", "web.example.org"} {
		path, err := WriteChallenge(dir, ident, digest)
		if err != nil {
			t.Fatal(err)
		}
		if filepath.Base(path) != ident+CertSuffix {
			t.Errorf("certificate for %s written as %s", ident, path)
		}
		cert := parseCertFile(t, path)
		sans := len(cert.DNSNames) + len(cert.IPAddresses) + len(cert.EmailAddresses) + len(cert.URIs)
		switch {
		case sans != 1:
			t.Errorf("%s: %d subjectAltNames, want exactly 1", ident, sans)
		case len(cert.DNSNames) == 1 && cert.DNSNames[0] != ident,
			len(cert.IPAddresses) == 1 && cert.IPAddresses[0].String() != ident:
			t.Errorf("%s: SAN %v %v", ident, cert.DNSNames, cert.IPAddresses)
		}
		if err := cert.CheckSignature(cert.SignatureAlgorithm, cert.RawTBSCertificate, cert.Signature); err != nil || !bytes.Equal(cert.RawIssuer, cert.RawSubject) {
			t.Errorf("%s: not self-signed: %v", ident, err)
		}
		var found int
		for _, ext := range cert.Extensions {
			if !ext.Id.Equal(OIDACMEIdentifier) {
				continue
			}
			found++
			var value []byte
			rest, err := asn1.Unmarshal(ext.Value, &value)
			if err != nil || len(rest) != 0 || !bytes.Equal(value, digest[:]) || !ext.Critical {
				t.Errorf("%s: acmeIdentifier critical=%v value=%x (%v), want critical OCTET STRING %x", ident, ext.Critical, ext.Value, err, digest)
			}
		}
		if found != 1 {
			t.Errorf("%s: %d acmeIdentifier extensions, want 1", ident, found)
		}
		keyPath := filepath.Join(dir, ident+KeySuffix)
		fi, err := os.Stat(keyPath)
		if err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: key file %v, mode %v; want 0600", ident, err, fi.Mode())
		}
		pair, err := tls.LoadX509KeyPair(path, keyPath)
		if err != nil {
			t.Fatalf("%s: key does not match the certificate: %v", ident, err)
		}
		keys = append(keys, pair.Leaf.RawSubjectPublicKeyInfo)
	}
	if bytes.Equal(keys[0], keys[3]) {
		t.Error("rewriting a challenge reused the key")
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 6 {
		t.Errorf("%d files in the directory, want 3 pairs and no temporary files", len(ents))
	}
	for _, ident := range []string{"web.example.org", "192.0.2.1", "2001:db8::1", "gone.example.org"} {
		if err := RemoveChallenge(dir, ident); err != nil {
			t.Errorf("RemoveChallenge(%s): %v", ident, err)
		}
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Errorf("files left after RemoveChallenge: %v", ents)
	}
	if _, err := WriteChallenge(dir, "../escape", digest); err == nil {
		t.Error("WriteChallenge accepted ../escape")
	}
}

func parseCertFile(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	blk, rest := pem.Decode(b)
	if blk == nil || blk.Type != "CERTIFICATE" || len(bytes.TrimSpace(rest)) != 0 {
		t.Fatalf("%s: want exactly one CERTIFICATE block", path)
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// answerOnce accepts one connection, reads its first flight as the proxy
// would, and answers it with r; the Result arrives on the channel.
func answerOnce(t *testing.T, r *Responder, timeout time.Duration) (string, <-chan Result) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	res := make(chan Result, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		hello, err := readRecord(c)
		if err != nil {
			c.Close()
			res <- Result{Err: err}
			return
		}
		res <- r.Answer(c, hello, time.Now().Add(timeout))
	}()
	return ln.Addr().String(), res
}

// readRecord reads one TLS record, as the proxy reads a ClientHello.
func readRecord(c net.Conn) ([]byte, error) {
	hdr := make([]byte, 5)
	if _, err := io.ReadFull(c, hdr); err != nil {
		return nil, err
	}
	body := make([]byte, int(hdr[3])<<8|int(hdr[4]))
	_, err := io.ReadFull(c, body)
	return append(hdr, body...), err
}

func dialACME(addr, name string, alpn []string, version uint16) (*x509.Certificate, string, error) {
	var leaf *x509.Certificate
	c, err := tls.Dial("tcp", addr, &tls.Config{
		ServerName: name, NextProtos: alpn, MinVersion: version, MaxVersion: version,
		InsecureSkipVerify: true, // a challenge certificate is self-signed
		VerifyConnection: func(cs tls.ConnectionState) error {
			leaf = cs.PeerCertificates[0]
			return nil
		},
	})
	if err != nil {
		return leaf, "", err
	}
	defer c.Close()
	return leaf, c.ConnectionState().NegotiatedProtocol, nil
}

// A validator gets the challenge certificate for its SNI name over TLS
// 1.2 and 1.3, with acme-tls/1 negotiated, also for a certificate
// written after the responder started, and the rewritten one after a
// rewrite.
func TestResponderServesChallenge(t *testing.T) {
	dir := t.TempDir()
	r := NewResponder(dir)
	for i, version := range []uint16{tls.VersionTLS12, tls.VersionTLS13, tls.VersionTLS13} {
		digest := sha256.Sum256([]byte{byte(i)})
		for _, ident := range []string{"web.example.org", "192.0.2.1", "2001:db8::1"} {
			if _, err := WriteChallenge(dir, ident, digest); err != nil {
				t.Fatal(err)
			}
			name := ident
			if a, err := netip.ParseAddr(ident); err == nil {
				name = ReverseName(a)
			}
			addr, res := answerOnce(t, r, 10*time.Second)
			leaf, proto, err := dialACME(addr, name, []string{Protocol}, version)
			got := <-res
			if err != nil || got.Err != nil {
				t.Fatalf("%s: handshake: client %v, responder %v", ident, err, got.Err)
			}
			if proto != Protocol || got.Cert != ident+CertSuffix {
				t.Errorf("%s: negotiated %q, served %q", ident, proto, got.Cert)
			}
			if !hasDigest(leaf, digest) {
				t.Errorf("%s: the client got a certificate without this round's digest", ident)
			}
			if got.Up == 0 || got.Down == 0 {
				t.Errorf("%s: up=%d down=%d", ident, got.Up, got.Down)
			}
		}
	}
}

func hasDigest(c *x509.Certificate, digest [32]byte) bool {
	if c == nil {
		return false
	}
	want, _ := asn1.Marshal(digest[:])
	for _, ext := range c.Extensions {
		if ext.Id.Equal(OIDACMEIdentifier) {
			return bytes.Equal(ext.Value, want)
		}
	}
	return false
}

// A client that does not offer acme-tls/1 never sees a challenge
// certificate, even when one exists for its name.
func TestResponderNeverServesWithoutACME(t *testing.T) {
	dir := t.TempDir()
	if _, err := WriteChallenge(dir, "web.example.org", sha256.Sum256(nil)); err != nil {
		t.Fatal(err)
	}
	r := NewResponder(dir)
	for _, alpn := range [][]string{nil, {"h2", "http/1.1"}} {
		addr, res := answerOnce(t, r, 10*time.Second)
		leaf, _, err := dialACME(addr, "web.example.org", alpn, 0)
		got := <-res
		if err == nil || leaf != nil || got.Err == nil || got.Cert != "" {
			t.Errorf("alpn %q: client err %v, saw certificate %v; responder err %v, served %q", alpn, err, leaf != nil, got.Err, got.Cert)
		}
	}
}

// No certificate for the name, or a name that must not reach the file
// system: the handshake fails with an alert, and the error names the
// missing file or the refusal.
func TestResponderRefuses(t *testing.T) {
	dir, elsewhere := t.TempDir(), t.TempDir()
	// A symbolic link to a valid pair elsewhere, and a FIFO (which must
	// not block the handshake).
	if _, err := WriteChallenge(elsewhere, "link.example.org", sha256.Sum256(nil)); err != nil {
		t.Fatal(err)
	}
	for _, suffix := range []string{CertSuffix, KeySuffix} {
		if err := os.Symlink(filepath.Join(elsewhere, "link.example.org"+suffix), filepath.Join(dir, "link.example.org"+suffix)); err != nil {
			t.Fatal(err)
		}
	}
	if err := syscall.Mkfifo(filepath.Join(dir, "fifo.example.org"+CertSuffix), 0o600); err != nil {
		t.Fatal(err)
	}
	r := NewResponder(dir)
	for name, want := range map[string]string{
		"missing.example.org":    filepath.Join(dir, "missing.example.org.crt.pem"),
		"link.example.org":       "a symbolic link, refused",
		"fifo.example.org":       "not a regular file",
		"a..b":                   "server name refused",
		strings.Repeat("a", 300): "server name refused",
	} {
		addr, res := answerOnce(t, r, 10*time.Second)
		hello, err := hellotest.For(name, []string{Protocol})
		if err != nil {
			t.Fatal(err)
		}
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		c.Write(hello)
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		reply, _ := io.ReadAll(c)
		c.Close()
		got := <-res
		if got.Err == nil || !strings.Contains(got.Err.Error(), want) {
			t.Errorf("%.20s: responder error %v, want it to say %q", name, got.Err, want)
		}
		if len(reply) < 7 || reply[0] != 21 { // an alert record
			t.Errorf("%.20s: client got %x, want an alert", name, reply)
		}
	}
}

// A handshake that stalls after the hello, or garbage after it, ends by
// the deadline and leaves no goroutine behind.
func TestResponderBounded(t *testing.T) {
	dir := t.TempDir()
	if _, err := WriteChallenge(dir, "web.example.org", sha256.Sum256(nil)); err != nil {
		t.Fatal(err)
	}
	r := NewResponder(dir)
	before := runtime.NumGoroutine()
	hello, err := hellotest.For("web.example.org", []string{Protocol})
	if err != nil {
		t.Fatal(err)
	}
	for name, after := range map[string][]byte{
		"stall":   nil,
		"garbage": append([]byte{0x16, 3, 3, 0, 8}, "garbage!"...), // a handshake record of nonsense
	} {
		addr, res := answerOnce(t, r, 300*time.Millisecond)
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		c.Write(hello)
		c.Write(after)
		began := time.Now()
		var got Result
		select {
		case got = <-res:
		case <-time.After(10 * time.Second):
			t.Fatalf("%s: Answer still running 10s after a 300ms deadline", name)
		}
		c.Close()
		if got.Err == nil {
			t.Errorf("%s: handshake succeeded", name)
		}
		if got.TimedOut != (name == "stall") {
			t.Errorf("%s: err %v, timed out %v", name, got.Err, got.TimedOut)
		}
		t.Logf("%s: ended after %v: %v", name, time.Since(began).Round(time.Millisecond), got.Err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > before {
		t.Errorf("%d goroutines, %d before", n, before)
	}
}

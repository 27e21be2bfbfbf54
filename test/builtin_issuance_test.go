package e2e

// Issuance through the built-in responder (issue 14): no ACME client
// answers TLS-ALPN-01 itself. dehydrated writes challenge certificates
// into a directory (-alpn-certs); uacme hands key authorizations to
// `acme-alpn-proxy hook`, which writes them there; the proxy answers
// pebble's acme-tls/1 connections from that directory, with crypto/tls,
// while nginx keeps serving the HTTPS load.

import (
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestIssuanceBuiltin(t *testing.T) {
	t.Run("dehydrated", func(t *testing.T) { issDehydrated(t, variants[0], false) })
	t.Run("dehydrated-ipv6", func(t *testing.T) { issDehydrated(t, variants[1], true) })
	t.Run("uacme-hook", func(t *testing.T) { issUacmeHook(t, variants[0], false, false) })
	t.Run("uacme-hook-ip", func(t *testing.T) { issUacmeHook(t, variants[1], false, true) })
	t.Run("uacme-hook-ipv6-ip", func(t *testing.T) { issUacmeHook(t, variants[0], true, true) })
}

// dehydratedConfig writes the config file dehydrated reads with --config.
func (s *issSite) dehydratedConfig(alpnDir string) string {
	base := filepath.Join(s.dir, "dehydrated")
	if err := os.MkdirAll(base, 0o700); err != nil {
		s.t.Fatal(err)
	}
	conf := fmt.Sprintf("CA=%q\nCHALLENGETYPE=\"tls-alpn-01\"\nBASEDIR=%q\nALPNCERTDIR=%q\nCONTACT_EMAIL=%q\n",
		s.DirectoryURL(), base, alpnDir, issEmail)
	path := filepath.Join(s.dir, "dehydrated.conf")
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		s.t.Fatal(err)
	}
	return path
}

// issDehydrated: `acme-alpn-proxy -alpn-certs DIR run -- dehydrated -c -t
// tls-alpn-01 --alpn DIR ...`, the README's dehydrated example. curl
// (dehydrated's HTTP client) trusts pebble's root through CURL_CA_BUNDLE.
func issDehydrated(t *testing.T, v Variant, v6 bool) {
	issRequire(t, "pebble", "pebble-challtestsrv", "nginx", "dehydrated", "curl", "openssl", "env")
	s := newIssSite(t, v6)
	load := s.startLoad(issLoadWorkers, issLoadPause)
	load.waitGood(20)

	alpnDir := filepath.Join(s.dir, "alpn-certs")
	conf := s.dehydratedConfig(alpnDir)
	dehydrated := []string{"env", "CURL_CA_BUNDLE=" + s.rootCA, issLookPath("dehydrated"), "--config", conf}
	// Not MustExec: making the 4096-bit RSA account key can take long on a
	// busy machine.
	reg := s.start(s.Srv, "dehydrated --register", slices.Concat(dehydrated, []string{"--register", "--accept-terms"})...)
	if err := reg.wait(issDeadline); err != nil {
		t.Fatalf("dehydrated --register: %v\n%s", err, reg.out.String())
	}

	out, took := issRunWrapped(t, s.NewProxy(t, v, "-alpn-certs", alpnDir), slices.Concat(dehydrated,
		[]string{"-c", "-d", issDomain, "-t", "tls-alpn-01", "--alpn", alpnDir}))
	load.waitGood(20)
	load.halt()

	leaf := s.checkIssued(filepath.Join(s.dir, "dehydrated", "certs", issDomain, "cert.pem"))
	s.checkAfter(v, out, load)
	issCheckBuiltin(t, out, issDomain)
	t.Logf("%s issued to %v via %s by dehydrated + built-in responder in %v (run start to exit); web load: %v",
		leaf.Issuer.CommonName, leaf.DNSNames, s.webIP, took.Round(time.Millisecond), load)
}

// issUacmeHook: uacme with `-h acme-alpn-proxy` (uacme execs its hook
// with the five arguments only; `run` tells it the directory) and no
// ualpn. ip issues for the web host's address (RFC 8738) instead of its
// name.
func issUacmeHook(t *testing.T, v Variant, v6, ip bool) {
	issRequire(t, "pebble", "pebble-challtestsrv", "nginx", "uacme", "sh", "mount")
	s := newIssSite(t, v6)
	load := s.startLoad(issLoadWorkers, issLoadPause)
	load.waitGood(20)

	ident := issDomain
	if ip {
		ident = s.webIP.String()
	}
	alpnDir := filepath.Join(s.dir, "alpn-certs")
	trusting := []string{"sh", "-c", `mount --bind "$0" /etc/ssl/certs/ca-certificates.crt && exec "$@"`, s.rootCA}
	conf := filepath.Join(s.dir, "uacme")
	uacme := slices.Concat(trusting, []string{issLookPath("uacme"), "-v", "-c", conf, "-a", s.DirectoryURL()})
	s.Srv.MustExec(t, uacme[0], slices.Concat(uacme[1:], []string{"-y", "new", issEmail})...)

	out, took := issRunWrapped(t, s.NewProxy(t, v, "-alpn-certs", alpnDir),
		slices.Concat(uacme, []string{"-h", proxyBin, "issue", ident}))
	load.waitGood(20)
	load.halt()

	certPath := filepath.Join(conf, ident, "cert.pem")
	var leaf *x509.Certificate
	if ip {
		leaf = s.checkIssuedIP(certPath, s.webIP)
	} else {
		leaf = s.checkIssued(certPath)
	}
	s.checkAfter(v, out, load)
	issCheckBuiltin(t, out, ident)
	if ents, err := os.ReadDir(alpnDir); err != nil || len(ents) != 0 {
		t.Errorf("challenge directory after issuance: %v %v, want it emptied by the hook's done", ents, err)
	}
	t.Logf("%s issued to %v %v via %s by uacme + hook + built-in responder in %v (run start to exit); web load: %v",
		leaf.Issuer.CommonName, leaf.DNSNames, leaf.IPAddresses, s.webIP, took.Round(time.Millisecond), load)
}

// issCheckBuiltin asserts that the proxy itself answered pebble: a log
// line for a built-in handshake that served ident's certificate.
func issCheckBuiltin(t *testing.T, proxyLog, ident string) {
	t.Helper()
	want := "cert=" + ident + ".crt.pem"
	for _, line := range strings.Split(proxyLog, "\n") {
		if strings.Contains(line, "route=acme") && strings.Contains(line, "backend=built-in") &&
			strings.Contains(line, want) && strings.Contains(line, `end="challenge answered"`) {
			return
		}
	}
	t.Errorf("no log line of the built-in responder answering with %s", want)
}

// checkIssuedIP asserts that certPath holds a certificate for exactly
// the address ip, signed by this pebble's intermediate.
func (s *issSite) checkIssuedIP(certPath string, ip netip.Addr) *x509.Certificate {
	t := s.t
	t.Helper()
	b, err := os.ReadFile(certPath)
	if err != nil {
		t.Fatalf("no certificate: %v", err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		t.Fatalf("%s: no PEM block", certPath)
	}
	leaf, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if len(leaf.DNSNames) != 0 || len(leaf.IPAddresses) != 1 || !leaf.IPAddresses[0].Equal(ip.AsSlice()) {
		t.Errorf("certificate names %v %v, want only the address %s", leaf.DNSNames, leaf.IPAddresses, ip)
	}
	if err := leaf.CheckSignatureFrom(s.intermediate()); err != nil {
		t.Errorf("certificate not signed by pebble's intermediate: %v", err)
	}
	return leaf
}

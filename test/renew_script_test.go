package e2e

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestPackagedRenewal runs the packages' renewal script
// (packaging/renew.sh, the ExecStart of acme-alpn-proxy-renew.service) as
// the service would with /etc/default/acme-alpn-proxy-renew filled in,
// against pebble and nginx under HTTPS load: the first run obtains the
// certificate (lego run, through the proxy) and runs HOOK; the second finds
// it and only checks it (lego renew: not due, no order, no HOOK).
func TestPackagedRenewal(t *testing.T) {
	issRequire(t, "pebble", "pebble-challtestsrv", "nginx", "lego", "env")
	script, err := filepath.Abs("../packaging/renew.sh")
	if err != nil {
		t.Fatal(err)
	}
	v := variants[0]
	s := newIssSite(t, false)
	load := s.startLoad(issLoadWorkers, issLoadPause)
	load.waitGood(20)

	// HOOK is split at blanks by lego and run without a shell: a script
	// that records the domain lego hands it.
	hooked := filepath.Join(s.dir, "hooked")
	hook := filepath.Join(s.dir, "hook.sh")
	if err := os.WriteFile(hook, []byte("#!/bin/sh\necho \"$LEGO_CERT_DOMAIN\" >>"+hooked+"\n"), 0o700); err != nil {
		t.Fatal(err)
	}
	legoDir := filepath.Join(s.dir, "lego")
	p := s.NewProxy(t, v)
	settings := []string{
		"DOMAINS=" + issDomain,
		"EMAIL=" + issEmail,
		"HOOK=" + hook,
		"LEGO_PATH=" + legoDir,
		"LEGO_OPTIONS=--server " + s.DirectoryURL(),
		"PROXY_OPTIONS=" + strings.Join(p.flags, " "), // -log -, its pidfile, backend and mode
		// What the package has at /usr/sbin/acme-alpn-proxy, and trust in pebble.
		"ACME_ALPN_PROXY=" + proxyBin,
		"LEGO_CA_CERTIFICATES=" + s.rootCA,
	}
	renew := func(name string) string {
		t.Helper()
		r := s.start(s.Srv, name, append(append([]string{"env"}, settings...), script)...)
		if err := r.wait(issDeadline); err != nil {
			t.Fatalf("%s: %v\n%s", name, err, r.out.String())
		}
		return r.out.String()
	}

	first := renew("renew-first")
	leaf := s.checkIssued(legoCertPath(legoDir))
	cert, err := os.ReadFile(legoCertPath(legoDir))
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(hooked); string(b) != issDomain+"\n" {
		t.Errorf("after the first run HOOK recorded %q, want one line %q", b, issDomain)
	}

	second := renew("renew-second")
	if !strings.Contains(second, "no renewal") {
		t.Errorf("second run: lego did not say the certificate is not due (want lego renew, not run):\n%s", second)
	}
	if now, _ := os.ReadFile(legoCertPath(legoDir)); !bytes.Equal(now, cert) {
		t.Errorf("second run replaced the certificate, which was not due")
	}
	if b, _ := os.ReadFile(hooked); string(b) != issDomain+"\n" {
		t.Errorf("after the second run HOOK recorded %q, want still one line %q", b, issDomain)
	}
	load.waitGood(20)
	load.halt()

	s.checkAfter(v, first, load)
	if !strings.Contains(second, "msg=ready") {
		t.Errorf("second run: the proxy never became ready:\n%s", second)
	}
	t.Logf("%s issued to %v by the packaged renewal script; second run renewed nothing; web load: %v",
		leaf.Issuer.CommonName, leaf.DNSNames, load)
}

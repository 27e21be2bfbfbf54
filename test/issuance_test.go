package e2e

// Issuance tests (issue 4): a real ACME CA (pebble) validates TLS-ALPN-01 on
// port 443 of a web host that keeps serving HTTPS (nginx) the whole time,
// while the ACME client's responder (lego, or ualpn for uacme) listens on
// 127.0.0.1:31443 and acme-alpn-proxy routes the validation to it.
//
// On the harness's Env: the server namespace (Srv) is the web host with
// nginx, the ACME client and the proxy; the client namespace (Cli) is the
// CA with pebble, pebble-challtestsrv as its DNS, and the HTTPS load.

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

const (
	issDomain  = "web.acme-alpn-proxy.test"
	issEmail   = "me@example.org"
	issWebBody = "web ok\n"
	// issDeadline bounds one issuance: pebble validates in well under a
	// second and lego polls every 5 s, so reaching it means a hang.
	issDeadline = 3 * time.Minute
)

// issRequire skips (fails under CI=true) unless root and the programs are
// there. The Debian packages are pebble, nginx, lego (and uacme).
func issRequire(t *testing.T, tools ...string) {
	t.Helper()
	requirePrivileges(t)
	for _, tool := range tools {
		if issLookPath(tool) == "" {
			skipOrFail(t, tool+" not installed (Debian packages: pebble nginx lego uacme)")
		}
	}
}

// issLookPath also looks in sbin, where nginx is and PATH may not reach.
func issLookPath(tool string) string {
	if p, err := exec.LookPath(tool); err == nil {
		return p
	}
	for _, dir := range []string{"/usr/sbin", "/sbin"} {
		if p := filepath.Join(dir, tool); issExecutable(p) {
			return p
		}
	}
	return ""
}

func issExecutable(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0
}

// issSite is one CA + web host.
type issSite struct {
	*Env
	t      *testing.T
	dir    string
	rootCA string // PEM file of the root that signed pebble's API cert
	webDER []byte // nginx's self-signed cert, pinned by the load
	webIP  netip.Addr
}

// newIssSite creates the namespaces and starts pebble with its DNS and
// nginx. The DNS answers every name with the web host's IPv4 address, or,
// with v6, only with its IPv6 address, so that the CA validates over IPv6
// (given both, Go's address sort tries IPv4 before fd00::/8 and IPv6 would
// never be used).
func newIssSite(t *testing.T, v6 bool) *issSite {
	t.Helper()
	s := &issSite{Env: NewEnv(t), t: t, dir: t.TempDir()}
	s.webIP = s.SrvV4
	if v6 {
		s.webIP = s.SrvV6
	}
	s.writeCerts()
	s.startDNS(v6)
	s.startPebble()
	s.startNginx()
	return s
}

func (s *issSite) writePEM(name, typ string, der []byte) string {
	path := filepath.Join(s.dir, name)
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		s.t.Fatal(err)
	}
	return path
}

// issue makes a certificate and writes it with its key as name.pem and
// name.key; parent nil means self-signed.
func (s *issSite) issue(name string, tmpl, parent *x509.Certificate, parentKey *ecdsa.PrivateKey) ([]byte, *ecdsa.PrivateKey) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		s.t.Fatal(err)
	}
	tmpl.NotBefore, tmpl.NotAfter = time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour)
	if parent == nil {
		parent, parentKey = tmpl, key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
	if err != nil {
		s.t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		s.t.Fatal(err)
	}
	s.writePEM(name+".key", "PRIVATE KEY", keyDER)
	s.writePEM(name+".pem", "CERTIFICATE", der)
	return der, key
}

// writeCerts makes a root and the cert of pebble's HTTPS API (the Debian
// package ships none) and nginx's self-signed certificate.
func (s *issSite) writeCerts() {
	rootTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "acme-alpn-proxy test root"},
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	rootDER, rootKey := s.issue("root", rootTmpl, nil, nil)
	root, err := x509.ParseCertificate(rootDER)
	if err != nil {
		s.t.Fatal(err)
	}
	s.rootCA = filepath.Join(s.dir, "root.pem")
	s.issue("pebble", &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "pebble"},
		IPAddresses: []net.IP{s.CliV4.AsSlice(), s.CliV6.AsSlice()},
		KeyUsage:    x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}, root, rootKey)
	s.webDER, _ = s.issue("web", &x509.Certificate{
		SerialNumber: big.NewInt(3), Subject: pkix.Name{CommonName: "web server (self-signed)"},
		DNSNames: []string{issDomain}, IPAddresses: []net.IP{s.SrvV4.AsSlice(), s.SrvV6.AsSlice()},
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}, nil, nil)
}

// issProc is a program the test started in a namespace, in its own process
// group (ip netns exec execs, so the PID is the program's), so that
// anything it leaves behind is ended with it by the group's ID.
type issProc struct {
	name string
	cmd  *exec.Cmd
	out  syncBuffer
	done chan struct{}
	err  error
}

func (s *issSite) start(ns *Netns, name string, argv ...string) *issProc {
	s.t.Helper()
	return startProc(s.t, ns, name, argv...)
}

// startProc starts argv in ns as an issProc; t.Cleanup ends its group.
func startProc(t testing.TB, ns *Netns, name string, argv ...string) *issProc {
	t.Helper()
	p := &issProc{name: name, done: make(chan struct{})}
	p.cmd = exec.Command("ip", append([]string{"netns", "exec", ns.Name}, argv...)...)
	p.cmd.Stdout, p.cmd.Stderr = &p.out, &p.out
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		p.stop()
		if t.Failed() {
			t.Logf("--- %s (pid %d) output ---\n%s", name, p.cmd.Process.Pid, p.out.String())
		}
	})
	return p
}

// stop sends SIGTERM to the group, SIGKILL 5 s later.
func (p *issProc) stop() {
	select {
	case <-p.done:
		return
	default:
	}
	syscall.Kill(-p.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.done
	}
}

// wait returns the exit error, killing the process if it runs past limit.
func (p *issProc) wait(limit time.Duration) error {
	select {
	case <-p.done:
		return p.err
	case <-time.After(limit):
		p.stop()
		return fmt.Errorf("%s still running after %v, killed", p.name, limit)
	}
}

// waitListening polls a TCP connect to addr from ns until it succeeds.
func (s *issSite) waitListening(ns *Netns, addr string, p *issProc) {
	s.t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		c, err := ns.DialContext(ctx, "tcp", addr)
		cancel()
		if err == nil {
			c.Close()
			return
		}
		select {
		case <-p.done:
			s.t.Fatalf("%s exited before listening on %s: %v\n%s", p.name, addr, p.err, p.out.String())
		default:
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("%s not listening on %s: %v\n%s", p.name, addr, err, p.out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

const issDNSAddr = "127.0.0.1:8053"

func (s *issSite) startDNS(v6 bool) {
	a, aaaa := s.SrvV4.String(), ""
	if v6 {
		a, aaaa = "", s.SrvV6.String()
	}
	// Default answers only, no management API calls: every A (or AAAA)
	// query gets the web host; an empty default leaves that type unanswered.
	p := s.start(s.Cli, "pebble-challtestsrv", issLookPath("pebble-challtestsrv"),
		"-defaultIPv4", a, "-defaultIPv6", aaaa, "-dns01", issDNSAddr,
		"-http01", "", "-https01", "", "-tlsalpn01", "", "-management", "127.0.0.1:8055")
	s.waitListening(s.Cli, issDNSAddr, p)
}

func (s *issSite) pebbleAddr(port int) string {
	return net.JoinHostPort(s.CliV4.String(), strconv.Itoa(port))
}

// DirectoryURL is pebble's ACME directory.
func (s *issSite) DirectoryURL() string { return "https://" + s.pebbleAddr(14000) + "/dir" }

func (s *issSite) startPebble() {
	cfg, err := json.Marshal(map[string]any{"pebble": map[string]any{
		"listenAddress":                  s.pebbleAddr(14000),
		"managementListenAddress":        s.pebbleAddr(15000),
		"certificate":                    filepath.Join(s.dir, "pebble.pem"),
		"privateKey":                     filepath.Join(s.dir, "pebble.key"),
		"httpPort":                       80,
		"tlsPort":                        443,
		"ocspResponderURL":               "",
		"externalAccountBindingRequired": false,
	}})
	if err != nil {
		s.t.Fatal(err)
	}
	path := filepath.Join(s.dir, "pebble.json")
	if err := os.WriteFile(path, cfg, 0o600); err != nil {
		s.t.Fatal(err)
	}
	// Real validation (PEBBLE_VA_ALWAYS_VALID empty); no authz reuse, so
	// every order is validated; no random VA sleeps or nonce rejections.
	p := s.start(s.Cli, "pebble", "env", "PEBBLE_VA_ALWAYS_VALID=", "PEBBLE_VA_NOSLEEP=1",
		"PEBBLE_AUTHZREUSE=0", "PEBBLE_WFE_NONCEREJECT=0",
		issLookPath("pebble"), "-config", path, "-dnsserver", issDNSAddr)
	s.waitListening(s.Cli, s.pebbleAddr(14000), p)
	s.waitListening(s.Cli, s.pebbleAddr(15000), p)
}

// startNginx runs nginx with a private prefix and config (never the system
// service) on 443 of every IPv4 and IPv6 address.
func (s *issSite) startNginx() {
	d := filepath.Join(s.dir, "nginx")
	if err := os.MkdirAll(filepath.Join(d, "logs"), 0o755); err != nil {
		s.t.Fatal(err)
	}
	conf := fmt.Sprintf(`daemon off;
master_process on;
worker_processes 1;
pid %[1]s/nginx.pid;
error_log %[1]s/logs/error.log;
events { worker_connections 4096; }
http {
  access_log %[1]s/logs/access.log;
  client_body_temp_path %[1]s/body;
  proxy_temp_path %[1]s/proxy;
  fastcgi_temp_path %[1]s/fastcgi;
  uwsgi_temp_path %[1]s/uwsgi;
  scgi_temp_path %[1]s/scgi;
  server {
    listen 443 ssl http2;
    listen [::]:443 ssl http2;
    ssl_certificate %[2]s/web.pem;
    ssl_certificate_key %[2]s/web.key;
    location / { return 200 %[3]q; }
  }
}
`, d, s.dir, issWebBody)
	path := filepath.Join(d, "nginx.conf")
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		s.t.Fatal(err)
	}
	p := s.start(s.Srv, "nginx", issLookPath("nginx"), "-p", d, "-c", path, "-e", filepath.Join(d, "logs", "error.log"))
	s.waitListening(s.Cli, s.ServerAddr(IPv4, 443).String(), p)
	s.waitListening(s.Cli, s.ServerAddr(IPv6, 443).String(), p)
}

// httpsLoad is a continuous HTTPS load from the CA namespace against
// nginx: every request on a fresh TCP and TLS connection, cycling over IPv4
// and IPv6 and the ALPN offers h2+http/1.1, http/1.1 and none. A request
// is good only if nginx (its pinned certificate) answered 200 with its
// body over the protocol the offer asked for.
//
// The harness's Load speaks the test servers' echo protocol, not HTTP,
// hence this one.
type httpsLoad struct {
	site       *issSite
	ok, failed atomic.Int64
	mu         sync.Mutex
	reasons    []string
	started    time.Time
	stop       chan struct{}
	wg         sync.WaitGroup
}

func (s *issSite) startLoad(workers int, pause time.Duration) *httpsLoad {
	l := &httpsLoad{site: s, stop: make(chan struct{}), started: time.Now()}
	targets := []netip.AddrPort{s.ServerAddr(IPv4, 443), s.ServerAddr(IPv6, 443)}
	offers := [][]string{{"h2", "http/1.1"}, {"http/1.1"}, nil}
	for w := range workers {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			for i := w; ; i++ {
				target, offer := targets[i%len(targets)], offers[(i/len(targets))%len(offers)]
				begin := time.Now()
				if err := s.get(target, offer); err != nil {
					l.failed.Add(1)
					l.mu.Lock()
					if len(l.reasons) < 20 {
						l.reasons = append(l.reasons, fmt.Sprintf("+%v %s alpn=%q: %v",
							begin.Sub(l.started).Round(time.Millisecond), target, offer, err))
					}
					l.mu.Unlock()
				} else {
					l.ok.Add(1)
				}
				select {
				case <-l.stop:
					return
				case <-time.After(pause):
				}
			}
		}()
	}
	s.t.Cleanup(l.halt)
	return l
}

func (l *httpsLoad) halt() {
	select {
	case <-l.stop:
	default:
		close(l.stop)
	}
	l.wg.Wait()
}

func (l *httpsLoad) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := fmt.Sprintf("%d requests ok, %d failed in %v", l.ok.Load(), l.failed.Load(), time.Since(l.started).Round(time.Millisecond))
	if len(l.reasons) > 0 {
		s += "; first failures:\n" + strings.Join(l.reasons, "\n")
	}
	return s
}

// waitGood waits for n more good requests, so that the load provably runs
// before the proxy starts and after it has gone.
func (l *httpsLoad) waitGood(n int64) {
	l.site.t.Helper()
	target := l.ok.Load() + n
	deadline := time.Now().Add(30 * time.Second)
	for l.ok.Load() < target {
		if time.Now().After(deadline) {
			l.site.t.Fatalf("web load made no progress: %v", l)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// get is one GET / on a fresh connection offering alpn (nil: no ALPN).
func (s *issSite) get(target netip.AddrPort, alpn []string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var negotiated string
	tr := &http.Transport{
		ForceAttemptHTTP2: true,
		DialTLSContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			raw, err := s.Cli.Dial(ctx, target)
			if err != nil {
				return nil, err
			}
			c := tls.Client(raw, &tls.Config{
				ServerName: issDomain,
				NextProtos: alpn,
				// nginx's certificate is self-signed: pinned instead.
				InsecureSkipVerify: true,
				VerifyConnection: func(cs tls.ConnectionState) error {
					if len(cs.PeerCertificates) == 0 || !bytes.Equal(cs.PeerCertificates[0].Raw, s.webDER) {
						return errors.New("the peer is not the web server")
					}
					return nil
				},
			})
			if err := c.HandshakeContext(ctx); err != nil {
				raw.Close()
				return nil, err
			}
			negotiated = c.ConnectionState().NegotiatedProtocol
			return c, nil
		},
	}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+issDomain+"/", nil)
	if err != nil {
		return err
	}
	resp, err := tr.RoundTrip(req)
	if err != nil {
		return err
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
	resp.Body.Close()
	if err != nil {
		return fmt.Errorf("reading body: %w", err)
	}
	if resp.StatusCode != http.StatusOK || string(body) != issWebBody {
		return fmt.Errorf("status %d, body %q", resp.StatusCode, body)
	}
	if len(alpn) > 0 && negotiated != alpn[0] {
		return fmt.Errorf("negotiated ALPN %q, want %q", negotiated, alpn[0])
	}
	return nil
}

// intermediate fetches the issuing certificate of this pebble instance
// (pebble makes a new hierarchy at every start).
func (s *issSite) intermediate() *x509.Certificate {
	t := s.t
	t.Helper()
	rootPEM, err := os.ReadFile(s.rootCA)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(rootPEM)
	tr := &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool},
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return s.Cli.DialContext(ctx, network, addr)
		},
	}
	defer tr.CloseIdleConnections()
	client := &http.Client{Timeout: 10 * time.Second, Transport: tr}
	resp, err := client.Get("https://" + s.pebbleAddr(15000) + "/intermediates/0")
	if err != nil {
		t.Fatalf("fetching pebble's intermediate: %v", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		t.Fatalf("pebble's intermediate: no PEM in %q", b)
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// checkIssued asserts that certPath holds a certificate for issDomain
// signed by this pebble's intermediate, valid now.
func (s *issSite) checkIssued(certPath string) *x509.Certificate {
	t := s.t
	t.Helper()
	b, err := os.ReadFile(certPath)
	if err != nil {
		t.Fatalf("no certificate: %v", err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "CERTIFICATE" {
		t.Fatalf("%s: no CERTIFICATE PEM block", certPath)
	}
	leaf, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if len(leaf.DNSNames) != 1 || leaf.DNSNames[0] != issDomain {
		t.Errorf("certificate names %v, want [%s]", leaf.DNSNames, issDomain)
	}
	if cn := leaf.Subject.CommonName; cn != "" && cn != issDomain {
		t.Errorf("certificate CN %q, want %q", cn, issDomain)
	}
	inter := s.intermediate()
	if err := leaf.CheckSignatureFrom(inter); err != nil {
		t.Errorf("certificate issued by %q is not signed by pebble's intermediate %q: %v", leaf.Issuer, inter.Subject, err)
	}
	if now := time.Now(); now.Before(leaf.NotBefore) || now.After(leaf.NotAfter) {
		t.Errorf("certificate not valid now: %v to %v", leaf.NotBefore, leaf.NotAfter)
	}
	return leaf
}

// checkAfter asserts what a user sees once issuance is over: the
// validation went through the proxy, no rule of ours is left, and the web
// load never failed.
func (s *issSite) checkAfter(v Variant, proxyLog string, load *httpsLoad) {
	t := s.t
	t.Helper()
	if !strings.Contains(proxyLog, "msg=ready") {
		t.Errorf("proxy log has no msg=ready line")
	}
	acme := strings.Count(proxyLog, "route=acme")
	if acme == 0 {
		t.Errorf("proxy log shows no connection routed to the ACME responder")
	}
	t.Logf("proxy log: %d connections routed to the ACME responder, %d to the web server",
		acme, strings.Count(proxyLog, "route=fallback"))
	if rules := s.OurRules(t, v); len(rules) > 0 {
		t.Errorf("rules left after the proxy stopped:\n%s", strings.Join(rules, "\n"))
	}
	if load.failed.Load() != 0 {
		t.Errorf("web requests failed during issuance: %v", load)
	}
}

func (s *issSite) legoArgs(dir string) []string {
	return []string{"env", "LEGO_CA_CERTIFICATES=" + s.rootCA, issLookPath("lego"),
		"--server", s.DirectoryURL(), "--tls", "--tls.port", ACMEAddr.String(),
		"--domains", issDomain, "--email", issEmail, "--accept-tos", "--path", dir, "run"}
}

func legoCertPath(dir string) string {
	return filepath.Join(dir, "certificates", issDomain+".crt")
}

// issLoad* set the web load: about 40 requests/s, each on a new connection.
const (
	issLoadWorkers = 2
	issLoadPause   = 50 * time.Millisecond
)

func TestIssuance(t *testing.T) {
	// run-wrapper: `acme-alpn-proxy run -- lego ... run`, in every variant.
	t.Run("run-wrapper", func(t *testing.T) {
		forEachVariant(t, func(t *testing.T, v Variant) {
			issRunWrapper(t, v, false, nil)
		})
	})
	t.Run("run-wrapper-ipv6", func(t *testing.T) {
		issRunWrapper(t, variants[0], true, nil)
	})
	t.Run("hooks", func(t *testing.T) {
		issHooks(t, variants[0])
	})
	t.Run("uacme-ualpn", func(t *testing.T) {
		issUacme(t, variants[0])
	})
}

// issRunWrapper issues with lego through `run` under HTTPS load; prepare,
// if not nil, sets up the web host first (a host firewall).
func issRunWrapper(t *testing.T, v Variant, v6 bool, prepare func(s *issSite)) {
	issRequire(t, "pebble", "pebble-challtestsrv", "nginx", "lego", "env")
	s := newIssSite(t, v6)
	if prepare != nil {
		prepare(s)
	}
	load := s.startLoad(issLoadWorkers, issLoadPause)
	load.waitGood(20)

	legoDir := filepath.Join(s.dir, "lego")
	out, took := issRunWrapped(t, s.NewProxy(t, v), s.legoArgs(legoDir))
	load.waitGood(20)
	load.halt()

	leaf := s.checkIssued(legoCertPath(legoDir))
	s.checkAfter(v, out, load)
	t.Logf("%s issued to %v via %s in %v (run start to exit); web load: %v",
		leaf.Issuer.CommonName, leaf.DNSNames, s.webIP, took.Round(time.Millisecond), load)
}

// issRunWrapped runs `acme-alpn-proxy run -- argv...` to completion and
// returns its output (the proxy logs to stderr) and how long it took.
func issRunWrapped(t *testing.T, p *Proxy, argv []string) (string, time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), issDeadline)
	defer cancel()
	cmd := p.command(ctx, append([]string{"run", "--"}, argv...)...)
	// On timeout end the whole group: the proxy and the client it started.
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	began := time.Now()
	err := cmd.Run()
	took := time.Since(began)
	if err != nil {
		t.Fatalf("acme-alpn-proxy run -- %s: %v (after %v)\n%s", strings.Join(argv, " "), err, took.Round(time.Millisecond), out.String())
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("--- acme-alpn-proxy run output ---\n%s", out.String())
		}
	})
	return out.String(), took
}

// issUacme: uacme with ualpn as the responder on 127.0.0.1:31443, run
// through `acme-alpn-proxy run`. uacme uses libcurl-gnutls, which has no
// CA option: pebble's root is bind-mounted over the system bundle inside
// the mount namespace that `ip netns exec` makes for the command.
func issUacme(t *testing.T, v Variant) {
	issRequire(t, "pebble", "pebble-challtestsrv", "nginx", "uacme", "ualpn", "sh", "mount")
	s := newIssSite(t, false)
	load := s.startLoad(issLoadWorkers, issLoadPause)
	load.waitGood(20)

	sock := filepath.Join(s.dir, "ualpn.sock")
	// -c is required in server mode; the proxy never sends it anything
	// but acme-tls/1 connections. -P 0: no PROXY header.
	ualpn := s.start(s.Srv, "ualpn", issLookPath("ualpn"), "-v", "-b", "127.0.0.1@31443",
		"-c", "127.0.0.1@443", "-P", "0", "-p", filepath.Join(s.dir, "ualpn.pid"), "-s", sock)
	s.waitListening(s.Srv, ACMEAddr.String(), ualpn)

	// Like /usr/share/uacme/ualpn.sh, but with our own control socket.
	hook := filepath.Join(s.dir, "ualpn-hook.sh")
	script := `#!/bin/sh
[ "$2" = tls-alpn-01 ] || exit 1
case "$1" in
begin) out=$(echo "auth $3 $5" | ualpn -s ` + sock + `) ;;
done|failed) out=$(echo "unauth $3" | ualpn -s ` + sock + `) ;;
*) exit 1 ;;
esac
[ "$out" = OK ]
`
	if err := os.WriteFile(hook, []byte(script), 0o700); err != nil {
		t.Fatal(err)
	}
	trusting := []string{"sh", "-c", `mount --bind "$0" /etc/ssl/certs/ca-certificates.crt && exec "$@"`, s.rootCA}
	conf := filepath.Join(s.dir, "uacme")
	uacme := slices.Concat(trusting, []string{issLookPath("uacme"), "-v", "-c", conf, "-a", s.DirectoryURL()})
	s.Srv.MustExec(t, uacme[0], slices.Concat(uacme[1:], []string{"-y", "new", issEmail})...)

	out, took := issRunWrapped(t, s.NewProxy(t, v), slices.Concat(uacme, []string{"-h", hook, "issue", issDomain}))
	load.waitGood(20)
	load.halt()

	leaf := s.checkIssued(filepath.Join(conf, issDomain, "cert.pem"))
	s.checkAfter(v, out, load)
	t.Logf("%s issued to %v in %v (run start to exit); web load: %v",
		leaf.Issuer.CommonName, leaf.DNSNames, took.Round(time.Millisecond), load)
}

func issHooks(t *testing.T, v Variant) {
	issRequire(t, "pebble", "pebble-challtestsrv", "nginx", "lego", "env")
	s := newIssSite(t, false)
	load := s.startLoad(issLoadWorkers, issLoadPause)
	load.waitGood(20)

	logPath := filepath.Join(s.dir, "proxy.log")
	p := s.NewProxy(t, v, "-log", logPath) // the daemon logs to a file
	t.Cleanup(func() { issStopDaemon(t, p, logPath) })

	began := time.Now()
	if r := p.RunT("start", "-d"); r.Code != 0 {
		t.Fatalf("start -d: %v", r)
	}
	ready := time.Since(began)
	if code := p.Status(); code != 0 {
		t.Errorf("status after start -d returned: exit %d, want 0", code)
	}

	legoDir := filepath.Join(s.dir, "lego")
	lego := s.start(s.Srv, "lego", s.legoArgs(legoDir)...)
	if err := lego.wait(issDeadline); err != nil {
		t.Fatalf("lego: %v\n%s", err, lego.out.String())
	}
	issued := time.Since(began)

	if r := p.RunT("stop"); r.Code != 0 {
		t.Fatalf("stop: %v", r)
	}
	stopped := time.Since(began)
	if code := p.Status(); code != 3 {
		t.Errorf("status after stop: exit %d, want 3 (not running)", code)
	}
	load.waitGood(20)
	load.halt()

	leaf := s.checkIssued(legoCertPath(legoDir))
	proxyLog, err := os.ReadFile(logPath)
	if err != nil {
		t.Fatalf("proxy log: %v", err)
	}
	s.checkAfter(v, string(proxyLog), load)
	t.Logf("%s issued to %v: ready after %v, lego done after %v, stopped after %v; web load: %v",
		leaf.Issuer.CommonName, leaf.DNSNames, ready.Round(time.Millisecond),
		issued.Round(time.Millisecond), stopped.Round(time.Millisecond), load)
}

// issStopDaemon ends a proxy that `start -d` left running when the test
// failed: with the CLI's stop, then by the PID in its pidfile. It logs the
// proxy's log file on failure.
func issStopDaemon(t *testing.T, p *Proxy, logPath string) {
	if t.Failed() {
		if b, err := os.ReadFile(logPath); err == nil {
			t.Logf("--- proxy log %s ---\n%s", logPath, b)
		}
	}
	b, err := os.ReadFile(p.PidFile)
	if err != nil {
		return
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 || !issIsProxy(pid) {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if r := p.Run(ctx, "stop"); r.Code != 0 {
		t.Logf("cleanup: %v", r)
	}
	if issIsProxy(pid) {
		syscall.Kill(pid, syscall.SIGKILL)
	}
}

// issIsProxy reports whether pid is a running instance of the binary under
// test, so that a stale pidfile never gets another process killed.
func issIsProxy(pid int) bool {
	exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
	return err == nil && exe == proxyBin
}

package e2e

// Issuance tests: a real ACME CA (pebble) validates TLS-ALPN-01 on port 443
// of a web host that keeps serving HTTPS (nginx) the whole time, while the
// ACME client's responder (lego, or uacme with ualpn) listens on
// 127.0.0.1:31443 and acme-alpn-proxy routes the validation to it.
//
// Topology, one pair of namespaces per subtest:
//
//	CA ns  (198.18.0.1, fd00:18::1): pebble, pebble-challtestsrv as DNS, load generator
//	web ns (198.18.0.2, fd00:18::2): nginx on 443, ACME client, acme-alpn-proxy

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

const (
	issTestDomain = "web.acme-alpn-proxy.test"
	issCAv4       = "198.18.0.1"
	issWebV4      = "198.18.0.2"
	issCAv6       = "fd00:18::1"
	issWebV6      = "fd00:18::2"
	issResponder  = "127.0.0.1:31443" // acme-alpn-proxy's default -alpn
	issWebBody    = "web ok\n"
	// issDeadline bounds one issuance: pebble answers in seconds, lego polls
	// every 5 s; anything near this means a hang.
	issDeadline = 3 * time.Minute
)

// issTools are the programs the issuance tests drive. nginx lives in sbin,
// which is not always in PATH.
var issTools = []string{"ip", "nft", "pebble", "pebble-challtestsrv", "nginx", "lego"}

// issRequire skips (or fails under CI=true) when the tests cannot run here.
func issRequire(t *testing.T, extra ...string) map[string]string {
	t.Helper()
	fail := t.Skipf
	if os.Getenv("CI") == "true" {
		fail = t.Fatalf
	}
	if os.Geteuid() != 0 {
		fail("issuance tests need root (network namespaces)")
	}
	paths := map[string]string{}
	for _, name := range append(append([]string{}, issTools...), extra...) {
		p, err := exec.LookPath(name)
		if err != nil {
			for _, dir := range []string{"/usr/sbin", "/sbin"} {
				if _, serr := os.Stat(filepath.Join(dir, name)); serr == nil {
					p, err = filepath.Join(dir, name), nil
					break
				}
			}
		}
		if err != nil {
			fail("%s not installed (Debian packages: pebble nginx lego uacme): %v", name, err)
		}
		paths[name] = p
	}
	return paths
}

// issProxyBinary builds the binary under test into dir.
func issProxyBinary(t *testing.T, dir string) string {
	t.Helper()
	path := filepath.Join(dir, "acme-alpn-proxy")
	cmd := exec.Command("go", "build", "-o", path, "./cmd/acme-alpn-proxy")
	cmd.Dir = ".."
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build ./cmd/acme-alpn-proxy: %v\n%s", err, out)
	}
	return path
}

// issEnv is one CA + web host setup.
type issEnv struct {
	t      *testing.T
	tools  map[string]string
	dir    string
	caNS   string
	webNS  string
	caPEM  string // root that signed pebble's HTTPS listener cert
	webPEM []byte // nginx's self-signed cert, pinned by the load generator
	v6     bool   // DNS answers only AAAA: the CA validates over IPv6
}

func issRandSuffix(t *testing.T) string {
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

func issRun(t *testing.T, name string, args ...string) {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// newIssEnv creates the namespaces, certificates and configs, and starts
// pebble, its DNS and nginx. Everything is torn down by t.Cleanup.
func newIssEnv(t *testing.T, tools map[string]string, v6 bool) *issEnv {
	t.Helper()
	s := issRandSuffix(t)
	e := &issEnv{t: t, tools: tools, dir: t.TempDir(), caNS: "is-ca-" + s, webNS: "is-web-" + s, v6: v6}
	for _, ns := range []string{e.caNS, e.webNS} {
		issRun(t, "ip", "netns", "add", ns)
		t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
		issRun(t, "ip", "-n", ns, "link", "set", "lo", "up")
	}
	cIf, wIf := "is-c"+s, "is-w"+s
	issRun(t, "ip", "link", "add", cIf, "netns", e.caNS, "type", "veth", "peer", "name", wIf, "netns", e.webNS)
	issRun(t, "ip", "-n", e.caNS, "addr", "add", issCAv4+"/24", "dev", cIf)
	issRun(t, "ip", "-n", e.caNS, "addr", "add", issCAv6+"/64", "dev", cIf, "nodad")
	issRun(t, "ip", "-n", e.webNS, "addr", "add", issWebV4+"/24", "dev", wIf)
	issRun(t, "ip", "-n", e.webNS, "addr", "add", issWebV6+"/64", "dev", wIf, "nodad")
	issRun(t, "ip", "-n", e.caNS, "link", "set", cIf, "up")
	issRun(t, "ip", "-n", e.webNS, "link", "set", wIf, "up")

	e.writeCerts()
	e.startDNS()
	e.startPebble()
	e.startNginx()
	return e
}

func issWritePEM(t *testing.T, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

func issKey(t *testing.T, path string) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	issWritePEM(t, path, "PRIVATE KEY", der)
	return k
}

// writeCerts makes the trust root for pebble's HTTPS API (the pebble package
// ships none) and nginx's self-signed certificate.
func (e *issEnv) writeCerts() {
	t := e.t
	now := time.Now()
	rootKey := issKey(t, filepath.Join(e.dir, "root.key"))
	root := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "acme-alpn-proxy test root"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	rootDER, err := x509.CreateCertificate(rand.Reader, root, root, &rootKey.PublicKey, rootKey)
	if err != nil {
		t.Fatal(err)
	}
	e.caPEM = filepath.Join(e.dir, "root.pem")
	issWritePEM(t, e.caPEM, "CERTIFICATE", rootDER)
	root, _ = x509.ParseCertificate(rootDER)

	pebbleKey := issKey(t, filepath.Join(e.dir, "pebble.key"))
	leaf := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "pebble"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		IPAddresses: []net.IP{net.ParseIP(issCAv4), net.ParseIP(issCAv6)},
		KeyUsage:    x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, leaf, root, &pebbleKey.PublicKey, rootKey)
	if err != nil {
		t.Fatal(err)
	}
	issWritePEM(t, filepath.Join(e.dir, "pebble.pem"), "CERTIFICATE", leafDER)

	webKey := issKey(t, filepath.Join(e.dir, "web.key"))
	web := &x509.Certificate{
		SerialNumber: big.NewInt(3), Subject: pkix.Name{CommonName: "web server (self-signed)"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		DNSNames:    []string{issTestDomain},
		IPAddresses: []net.IP{net.ParseIP(issWebV4), net.ParseIP(issWebV6)},
		KeyUsage:    x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	webDER, err := x509.CreateCertificate(rand.Reader, web, web, &webKey.PublicKey, webKey)
	if err != nil {
		t.Fatal(err)
	}
	issWritePEM(t, filepath.Join(e.dir, "web.pem"), "CERTIFICATE", webDER)
	e.webPEM = webDER
}

// issProc is a process the test started, ended by its PID on cleanup.
type issProc struct {
	cmd  *exec.Cmd
	name string
	out  *issLogBuf
	done chan struct{}
	err  error
}

// issLogBuf collects a process's output for failure reports.
type issLogBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *issLogBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *issLogBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// start runs argv inside ns (ip netns exec execs, so the PID is the
// program's own) in its own process group, so that a child it leaves behind
// (an ACME client under `run`) is ended with it.
func (e *issEnv) start(ns, name string, env []string, argv ...string) *issProc {
	t := e.t
	t.Helper()
	p := &issProc{name: name, out: &issLogBuf{}, done: make(chan struct{})}
	p.cmd = exec.Command("ip", append([]string{"netns", "exec", ns}, argv...)...)
	p.cmd.Env = append(os.Environ(), env...)
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		p.stop(5 * time.Second)
		if t.Failed() {
			t.Logf("--- output of %s (pid %d) ---\n%s", name, p.cmd.Process.Pid, p.out.String())
		}
	})
	return p
}

// stop sends SIGTERM to the process group, then SIGKILL after grace.
func (p *issProc) stop(grace time.Duration) {
	select {
	case <-p.done:
		return
	default:
	}
	pgid := p.cmd.Process.Pid
	syscall.Kill(-pgid, syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(grace):
		syscall.Kill(-pgid, syscall.SIGKILL)
		<-p.done
	}
}

// wait waits for the process to exit within d; on timeout it is killed.
func (p *issProc) wait(d time.Duration) (error, bool) {
	select {
	case <-p.done:
		return p.err, true
	case <-time.After(d):
		p.stop(5 * time.Second)
		return p.err, false
	}
}

func (e *issEnv) startDNS() {
	v4, v6 := issWebV4, ""
	if e.v6 {
		v4, v6 = "", issWebV6
	}
	// Default answers only: every A (or AAAA) query gets the web host.
	p := e.start(e.caNS, "pebble-challtestsrv", nil, e.tools["pebble-challtestsrv"],
		"-defaultIPv4", v4, "-defaultIPv6", v6, "-dns01", "127.0.0.1:8053",
		"-http01", "", "-https01", "", "-tlsalpn01", "", "-management", "127.0.0.1:8055")
	e.waitListening(e.caNS, "127.0.0.1:8053", p)
}

func (e *issEnv) startPebble() {
	cfg := map[string]any{"pebble": map[string]any{
		"listenAddress":                  net.JoinHostPort(issCAv4, "14000"),
		"managementListenAddress":        net.JoinHostPort(issCAv4, "15000"),
		"certificate":                    filepath.Join(e.dir, "pebble.pem"),
		"privateKey":                     filepath.Join(e.dir, "pebble.key"),
		"httpPort":                       80,
		"tlsPort":                        443,
		"ocspResponderURL":               "",
		"externalAccountBindingRequired": false,
	}}
	b, _ := json.Marshal(cfg)
	path := filepath.Join(e.dir, "pebble.json")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		e.t.Fatal(err)
	}
	// Real validation (PEBBLE_VA_ALWAYS_VALID unset); no authz reuse, so
	// every order is validated; no random sleeps or nonce rejections.
	env := []string{"PEBBLE_VA_NOSLEEP=1", "PEBBLE_AUTHZREUSE=0", "PEBBLE_WFE_NONCEREJECT=0", "PEBBLE_VA_ALWAYS_VALID="}
	p := e.start(e.caNS, "pebble", env, e.tools["pebble"], "-config", path, "-dnsserver", "127.0.0.1:8053")
	e.waitListening(e.caNS, net.JoinHostPort(issCAv4, "14000"), p)
	e.waitListening(e.caNS, net.JoinHostPort(issCAv4, "15000"), p)
}

func (e *issEnv) directoryURL() string {
	return "https://" + net.JoinHostPort(issCAv4, "14000") + "/dir"
}

func (e *issEnv) startNginx() {
	d := filepath.Join(e.dir, "nginx")
	if err := os.MkdirAll(filepath.Join(d, "logs"), 0o755); err != nil {
		e.t.Fatal(err)
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
`, d, e.dir, issWebBody)
	path := filepath.Join(d, "nginx.conf")
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		e.t.Fatal(err)
	}
	p := e.start(e.webNS, "nginx", nil, e.tools["nginx"], "-p", d, "-c", path, "-e", filepath.Join(d, "logs", "error.log"))
	e.waitListening(e.caNS, net.JoinHostPort(issWebV4, "443"), p)
	e.waitListening(e.caNS, net.JoinHostPort(issWebV6, "443"), p)
}

// issDialIn dials addr from inside the network namespace ns. The socket is
// created on a locked thread that joined ns; that thread is discarded when
// the goroutine returns still locked, so no other goroutine ever runs in ns.
func issDialIn(ctx context.Context, ns, network, addr string) (net.Conn, error) {
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		f, err := os.Open("/run/netns/" + ns)
		if err != nil {
			ch <- result{nil, err}
			return
		}
		err = unix.Setns(int(f.Fd()), unix.CLONE_NEWNET)
		f.Close()
		if err != nil {
			ch <- result{nil, fmt.Errorf("setns %s: %w", ns, err)}
			return
		}
		var d net.Dialer
		c, err := d.DialContext(ctx, network, addr)
		ch <- result{c, err}
	}()
	r := <-ch
	return r.c, r.err
}

func (e *issEnv) waitListening(ns, addr string, p *issProc) {
	e.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		c, err := issDialIn(ctx, ns, "tcp", addr)
		cancel()
		if err == nil {
			c.Close()
			return
		}
		select {
		case <-p.done:
			e.t.Fatalf("%s exited before listening on %s: %v\n%s", p.name, addr, p.err, p.out.String())
		default:
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("%s not listening on %s in %s: %v\n%s", p.name, addr, ns, err, p.out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// issLoad is a continuous HTTPS load from the CA namespace against the web
// host: every request on a fresh TCP+TLS connection, ALPN rotating between
// h2+http/1.1, http/1.1 and none, over IPv4 and IPv6. A request counts as
// good only if it reached nginx (pinned certificate) and got its body.
type issLoad struct {
	ok, failed atomic.Int64
	mu         sync.Mutex
	errs       []string
	stop       chan struct{}
	wg         sync.WaitGroup
}

func (e *issEnv) startLoad(workers int, pause time.Duration) *issLoad {
	l := &issLoad{stop: make(chan struct{})}
	targets := []string{net.JoinHostPort(issWebV4, "443"), net.JoinHostPort(issWebV6, "443")}
	alpns := [][]string{{"h2", "http/1.1"}, {"http/1.1"}, nil}
	for w := 0; w < workers; w++ {
		l.wg.Add(1)
		go func(w int) {
			defer l.wg.Done()
			for i := w; ; i++ {
				select {
				case <-l.stop:
					return
				default:
				}
				target := targets[i%len(targets)]
				alpn := alpns[(i/len(targets))%len(alpns)]
				if err := e.oneRequest(target, alpn); err != nil {
					l.failed.Add(1)
					l.mu.Lock()
					if len(l.errs) < 20 {
						l.errs = append(l.errs, fmt.Sprintf("%s %s alpn=%v: %v", time.Now().Format("15:04:05.000"), target, alpn, err))
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
		}(w)
	}
	e.t.Cleanup(l.halt)
	return l
}

func (l *issLoad) halt() {
	select {
	case <-l.stop:
	default:
		close(l.stop)
	}
	l.wg.Wait()
}

func (l *issLoad) report() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return fmt.Sprintf("%d ok, %d failed; first errors:\n%s", l.ok.Load(), l.failed.Load(), strings.Join(l.errs, "\n"))
}

func (e *issEnv) oneRequest(target string, alpn []string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var negotiated string
	tr := &http.Transport{
		ForceAttemptHTTP2: true,
		DialTLSContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			raw, err := issDialIn(ctx, e.caNS, "tcp", target)
			if err != nil {
				return nil, err
			}
			c := tls.Client(raw, &tls.Config{
				ServerName: issTestDomain,
				NextProtos: alpn,
				// nginx's certificate is self-signed: pin it exactly.
				InsecureSkipVerify: true,
				VerifyConnection: func(cs tls.ConnectionState) error {
					if len(cs.PeerCertificates) == 0 || !bytes.Equal(cs.PeerCertificates[0].Raw, e.webPEM) {
						return errors.New("peer is not the web server")
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
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+issTestDomain+"/", nil)
	resp, err := tr.RoundTrip(req)
	if err != nil {
		return err
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
	resp.Body.Close()
	if err != nil {
		return fmt.Errorf("body: %w", err)
	}
	if resp.StatusCode != http.StatusOK || string(body) != issWebBody {
		return fmt.Errorf("status %d body %q", resp.StatusCode, body)
	}
	if len(alpn) > 0 && negotiated != alpn[0] {
		return fmt.Errorf("negotiated ALPN %q, want %q", negotiated, alpn[0])
	}
	return nil
}

// waitLoad waits until the load has n more good requests than now, so that
// the load provably runs before, during and after the proxy's life.
func (l *issLoad) waitGood(t *testing.T, n int64) {
	t.Helper()
	target := l.ok.Load() + n
	deadline := time.Now().Add(30 * time.Second)
	for l.ok.Load() < target {
		if time.Now().After(deadline) {
			t.Fatalf("load made no progress: %s", l.report())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// intermediate fetches pebble's issuing certificate from its management API.
func (e *issEnv) intermediate() *x509.Certificate {
	t := e.t
	t.Helper()
	rootPEM, err := os.ReadFile(e.caPEM)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(rootPEM)
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool},
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return issDialIn(ctx, e.caNS, network, addr)
		},
	}}
	resp, err := client.Get("https://" + net.JoinHostPort(issCAv4, "15000") + "/intermediates/0")
	if err != nil {
		t.Fatalf("fetch pebble intermediate: %v", err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	blk, _ := pem.Decode(b)
	if blk == nil {
		t.Fatalf("pebble intermediate: no PEM in %q", b)
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// checkIssued asserts that certPath holds a certificate for the test domain
// signed by this pebble's intermediate.
func (e *issEnv) checkIssued(certPath string) *x509.Certificate {
	t := e.t
	t.Helper()
	b, err := os.ReadFile(certPath)
	if err != nil {
		t.Fatalf("no certificate written: %v", err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "CERTIFICATE" {
		t.Fatalf("%s: no certificate PEM", certPath)
	}
	leaf, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if len(leaf.DNSNames) != 1 || leaf.DNSNames[0] != issTestDomain {
		t.Errorf("certificate SANs %v, want [%s]", leaf.DNSNames, issTestDomain)
	}
	if cn := leaf.Subject.CommonName; cn != "" && cn != issTestDomain {
		t.Errorf("certificate CN %q, want %q", cn, issTestDomain)
	}
	inter := e.intermediate()
	if err := leaf.CheckSignatureFrom(inter); err != nil {
		t.Errorf("certificate (issuer %q) not signed by pebble's intermediate %q: %v", leaf.Issuer, inter.Subject, err)
	}
	if now := time.Now(); now.Before(leaf.NotBefore) || now.After(leaf.NotAfter) {
		t.Errorf("certificate not valid now: %v..%v", leaf.NotBefore, leaf.NotAfter)
	}
	return leaf
}

// proxyFlags are the flags every acme-alpn-proxy invocation of a test uses.
func (e *issEnv) proxyFlags(logPath string) []string {
	return []string{"-log", logPath, "-pidfile", filepath.Join(e.dir, "acme-alpn-proxy.pid")}
}

// proxyCmd runs acme-alpn-proxy synchronously in the web namespace.
func (e *issEnv) proxyCmd(bin string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), issDeadline)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", e.webNS, bin}, args...)...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// checkProxyLog asserts that the validation really went through the proxy.
func (e *issEnv) checkProxyLog(log string) {
	t := e.t
	t.Helper()
	if !strings.Contains(log, "msg=ready") {
		t.Errorf("proxy log has no msg=ready line")
	}
	if !strings.Contains(log, "route=acme") {
		t.Errorf("proxy log has no connection routed to the ACME responder")
	}
	t.Logf("proxy log: %d connections routed to the ACME responder, %d to the web server",
		strings.Count(log, "route=acme"), strings.Count(log, "route=fallback"))
}

// checkNoRules asserts that no table of ours is left in the web namespace.
func (e *issEnv) checkNoRules() {
	t := e.t
	t.Helper()
	out, err := exec.Command("ip", "netns", "exec", e.webNS, "nft", "list", "tables").CombinedOutput()
	if err != nil {
		t.Fatalf("nft list tables: %v\n%s", err, out)
	}
	if strings.Contains(string(out), "acme-alpn-proxy") {
		t.Errorf("rules left after the proxy stopped:\n%s", out)
	}
}

func (e *issEnv) legoArgs(path string) []string {
	return []string{e.tools["lego"], "--server", e.directoryURL(), "--tls", "--tls.port", issResponder,
		"--domains", issTestDomain, "--email", "me@example.org", "--accept-tos", "--path", path, "run"}
}

func TestIssuance(t *testing.T) {
	tools := issRequire(t)
	bin := issProxyBinary(t, t.TempDir())

	// lego's certificate is checked against the pebble that issued it.
	legoCert := func(path string) string {
		return filepath.Join(path, "certificates", issTestDomain+".crt")
	}

	runWrapper := func(t *testing.T, v6 bool) {
		e := newIssEnv(t, tools, v6)
		load := e.startLoad(4, 50*time.Millisecond)
		load.waitGood(t, 20)

		legoDir := filepath.Join(e.dir, "lego")
		logPath := filepath.Join(e.dir, "proxy.log")
		t.Cleanup(func() { e.logOnFailure(logPath) })
		args := append(e.proxyFlags(logPath), "run", "--")
		args = append(args, e.legoArgs(legoDir)...)
		began := time.Now()
		p := e.start(e.webNS, "acme-alpn-proxy run -- lego", []string{"LEGO_CA_CERTIFICATES=" + e.caPEM},
			append([]string{bin}, args...)...)
		err, exited := p.wait(issDeadline)
		took := time.Since(began)
		if !exited {
			t.Fatalf("acme-alpn-proxy run -- lego did not finish in %v\n%s", issDeadline, p.out.String())
		}
		if err != nil {
			t.Fatalf("acme-alpn-proxy run -- lego: %v\n%s", err, p.out.String())
		}
		load.waitGood(t, 20)
		load.halt()

		leaf := e.checkIssued(legoCert(legoDir))
		proxyLog, _ := os.ReadFile(logPath)
		e.checkProxyLog(string(proxyLog))
		e.checkNoRules()
		if load.failed.Load() != 0 {
			t.Errorf("web requests failed during issuance: %s", load.report())
		}
		t.Logf("issued %q by %q in %v (proxy start to exit); load: %s", leaf.DNSNames, leaf.Issuer.CommonName, took, load.report())
	}

	t.Run("run-wrapper", func(t *testing.T) { runWrapper(t, false) })
	t.Run("run-wrapper-ipv6", func(t *testing.T) { runWrapper(t, true) })

	t.Run("hooks", func(t *testing.T) {
		e := newIssEnv(t, tools, false)
		load := e.startLoad(4, 50*time.Millisecond)
		load.waitGood(t, 20)
		logPath := filepath.Join(e.dir, "proxy.log")
		pidPath := filepath.Join(e.dir, "acme-alpn-proxy.pid")
		t.Cleanup(func() { e.logOnFailure(logPath) })
		t.Cleanup(func() { e.stopDaemon(bin, logPath, pidPath) })

		began := time.Now()
		if out, err := e.proxyCmd(bin, append(e.proxyFlags(logPath), "start", "-d")...); err != nil {
			t.Fatalf("start -d: %v\n%s", err, out)
		}
		ready := time.Since(began)
		if out, err := e.proxyCmd(bin, append(e.proxyFlags(logPath), "status")...); err != nil {
			t.Errorf("status after start -d: %v (want exit 0)\n%s", err, out)
		}

		legoDir := filepath.Join(e.dir, "lego")
		p := e.start(e.webNS, "lego", []string{"LEGO_CA_CERTIFICATES=" + e.caPEM}, e.legoArgs(legoDir)...)
		err, exited := p.wait(issDeadline)
		if !exited || err != nil {
			t.Fatalf("lego (exited=%v): %v\n%s", exited, err, p.out.String())
		}
		issued := time.Since(began)

		if out, err := e.proxyCmd(bin, append(e.proxyFlags(logPath), "stop")...); err != nil {
			t.Fatalf("stop: %v\n%s", err, out)
		}
		stopped := time.Since(began)
		out, err := e.proxyCmd(bin, append(e.proxyFlags(logPath), "status")...)
		var exitErr *exec.ExitError
		if !errors.As(err, &exitErr) || exitErr.ExitCode() != 3 {
			t.Errorf("status after stop: %v (want exit 3, not running)\n%s", err, out)
		}
		load.waitGood(t, 20)
		load.halt()

		leaf := e.checkIssued(legoCert(legoDir))
		proxyLog, _ := os.ReadFile(logPath)
		e.checkProxyLog(string(proxyLog))
		e.checkNoRules()
		if load.failed.Load() != 0 {
			t.Errorf("web requests failed during issuance: %s", load.report())
		}
		t.Logf("issued %q: ready after %v, lego done after %v, stopped after %v; load: %s",
			leaf.DNSNames, ready, issued, stopped, load.report())
	})
}

// stopDaemon ends a proxy that `start -d` left running after a failure: the
// CLI's own stop first, then the PID from its pidfile.
func (e *issEnv) stopDaemon(bin, logPath, pidPath string) {
	b, err := os.ReadFile(pidPath)
	if err != nil {
		return
	}
	var pid int
	if _, err := fmt.Sscanf(strings.TrimSpace(string(b)), "%d", &pid); err != nil || pid <= 0 {
		return
	}
	if syscall.Kill(pid, 0) != nil {
		return
	}
	if out, err := e.proxyCmd(bin, append(e.proxyFlags(logPath), "stop")...); err != nil {
		e.t.Logf("cleanup stop: %v\n%s", err, out)
	}
	if syscall.Kill(pid, 0) == nil {
		syscall.Kill(pid, syscall.SIGKILL)
	}
}

func (e *issEnv) logOnFailure(logPath string) {
	if !e.t.Failed() {
		return
	}
	if log, err := os.ReadFile(logPath); err == nil {
		e.t.Logf("--- proxy log ---\n%s", log)
	}
}

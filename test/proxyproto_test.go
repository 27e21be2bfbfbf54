package e2e

// PROXY protocol (-fallback-source proxy-v1|proxy-v2, -alpn-proxy-protocol)
// as real nginx and HAProxy parse it: each sees every client's own address
// and the address the client dialed.

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// ppSite is an Env with a TLS web server (nginx or HAProxy) that takes
// PROXY headers.
type ppSite struct {
	*Env
	files *issSite // certificates and processes, as the issuance tests run them
	dir   string
}

func newPPSite(t *testing.T) *ppSite {
	t.Helper()
	requirePrivileges(t)
	for _, tool := range []string{"nginx", "haproxy"} {
		if issLookPath(tool) == "" {
			skipOrFail(t, tool+" not installed (Debian packages: nginx haproxy)")
		}
	}
	s := &ppSite{Env: NewEnvTagged(t, "pp"), dir: t.TempDir()}
	s.files = &issSite{Env: s.Env, t: t, dir: s.dir}
	s.files.issue("web", &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "web server (self-signed)"},
		IPAddresses: []net.IP{s.SrvV4.AsSlice(), s.SrvV6.AsSlice()},
		KeyUsage:    x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}, nil, nil)
	return s
}

// ppNginxConf is nginx with a body that echoes what it took from the
// header: remote_addr (the header's source, through real_ip), the
// header's source and destination. The proxy connects from this host's
// own addresses, the only ones trusted to send a header. The listen lines
// are a parameter: ppNginxPublic expects a header from everyone on 443,
// ppNginxOwnPort (the README's) keeps 443 for clients and gives the proxy
// a port of its own.
const ppNginxConf = `daemon off;
master_process on;
worker_processes 1;
pid %[1]s/nginx.pid;
error_log %[1]s/logs/error.log;
events { worker_connections 256; }
http {
  client_body_temp_path %[1]s/body;
  proxy_temp_path %[1]s/proxy;
  fastcgi_temp_path %[1]s/fastcgi;
  uwsgi_temp_path %[1]s/uwsgi;
  scgi_temp_path %[1]s/scgi;
  log_format pp '$remote_addr $proxy_protocol_addr $proxy_protocol_port $proxy_protocol_server_addr $proxy_protocol_server_port';
  access_log %[1]s/logs/access.log pp;
  server {
%[5]s
    set_real_ip_from %[3]s;
    set_real_ip_from %[4]s;
    set_real_ip_from 127.0.0.1;
    real_ip_header proxy_protocol;
    ssl_certificate %[2]s/web.pem;
    ssl_certificate_key %[2]s/web.key;
    location / { return 200 "$remote_addr $proxy_protocol_addr $proxy_protocol_port $proxy_protocol_server_addr $proxy_protocol_server_port\n"; }
  }
}
`

const (
	ppNginxPublic = `    listen 443 ssl proxy_protocol;
    listen [::]:443 ssl proxy_protocol;`
	ppNginxOwnPort = `    listen 443 ssl;
    listen [::]:443 ssl;
    listen 127.0.0.1:8443 ssl proxy_protocol;`
)

// startNginx runs nginx (its own prefix, never the system service) with
// the listen lines given; it returns the process and the paths of its
// access and error logs.
func (s *ppSite) startNginx(listen string) (p *issProc, accessLog, errorLog string) {
	t := s.files.t
	d := filepath.Join(s.dir, "nginx")
	if err := os.MkdirAll(filepath.Join(d, "logs"), 0o755); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(d, "nginx.conf")
	conf := fmt.Sprintf(ppNginxConf, d, s.dir, s.SrvV4, s.SrvV6, listen)
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	errorLog = filepath.Join(d, "logs", "error.log")
	p = s.files.start(s.Srv, "nginx", issLookPath("nginx"), "-p", d, "-c", path, "-e", errorLog)
	s.files.waitListening(s.Srv, s.ServerAddr(IPv4, 443).String(), p)
	s.files.waitListening(s.Srv, s.ServerAddr(IPv6, 443).String(), p)
	return p, filepath.Join(d, "logs", "access.log"), errorLog
}

// ppHAProxyConf is the configuration the README shows: on the web
// server's port a header is expected from this host's own addresses (the
// proxy's source) only, so clients coming straight in are served too; the
// ACME responder's port takes one from everyone (accept-proxy). Each
// answers with what HAProxy took from the header (src, dst) and its
// frontend's name.
const ppHAProxyConf = `global
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend web
  bind :443 ssl crt %[1]s/web-haproxy.pem
  bind :::443 v6only ssl crt %[1]s/web-haproxy.pem
  tcp-request connection expect-proxy layer4 if { src %[2]s %[3]s }
  http-request return status 200 content-type text/plain lf-string "%%[src] %%[src_port] %%[dst] %%[dst_port] %%f\n"
frontend acme
  bind 127.0.0.1:31443 ssl crt %[1]s/web-haproxy.pem accept-proxy
  http-request return status 200 content-type text/plain lf-string "%%[src] %%[src_port] %%[dst] %%[dst_port] %%f\n"
`

func (s *ppSite) startHAProxy() {
	t := s.files.t
	pem := filepath.Join(s.dir, "web-haproxy.pem") // HAProxy wants the key with the certificate
	var both []byte
	for _, f := range []string{"web.pem", "web.key"} {
		b, err := os.ReadFile(filepath.Join(s.dir, f))
		if err != nil {
			t.Fatal(err)
		}
		both = append(both, b...)
	}
	if err := os.WriteFile(pem, both, 0o600); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(s.dir, "haproxy.cfg")
	if err := os.WriteFile(path, []byte(fmt.Sprintf(ppHAProxyConf, s.dir, s.SrvV4, s.SrvV6)), 0o600); err != nil {
		t.Fatal(err)
	}
	p := s.files.start(s.Srv, "haproxy", issLookPath("haproxy"), "-db", "-f", path)
	s.files.waitListening(s.Srv, s.ServerAddr(IPv4, 443).String(), p)
	s.files.waitListening(s.Srv, s.ServerAddr(IPv6, 443).String(), p)
	s.files.waitListening(s.Srv, "127.0.0.1:31443", p)
}

// get sends GET / over TLS, offering alpn, from the client namespace to
// target, and returns the body and the client's own address and port.
func (s *ppSite) get(target netip.AddrPort, alpn []string) (body string, client netip.AddrPort, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	raw, err := s.Cli.Dial(ctx, target)
	if err != nil {
		return "", client, err
	}
	defer raw.Close()
	client = raw.LocalAddr().(*net.TCPAddr).AddrPort()
	raw.SetDeadline(time.Now().Add(10 * time.Second))
	c := tls.Client(raw, &tls.Config{InsecureSkipVerify: true, NextProtos: alpn}) // self-signed; the body is the proof
	if err := c.HandshakeContext(ctx); err != nil {
		return "", client, fmt.Errorf("TLS handshake: %w", err)
	}
	if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"); err != nil {
		return "", client, err
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return "", client, fmt.Errorf("reading the response: %w", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode != http.StatusOK {
		return string(b), client, fmt.Errorf("status %d", resp.StatusCode)
	}
	return strings.TrimSpace(string(b)), client, err
}

// nginx behind the proxy sees each client's own address and port, and the
// address it dialed, IPv4 and IPv6, from a v1 or v2 header, and logs them;
// without a header it refuses the connection. With the README's setup (a
// port of its own for the proxy, -fallback) the header still names the
// address the client dialed, and clients reach 443 directly once the
// proxy is stopped.
func TestProxyProtocolNginx(t *testing.T) {
	forEachVariant(t, func(t *testing.T, v Variant) {
		s := newPPSite(t)
		nginx, accessLog, errorLog := s.startNginx(ppNginxPublic)
		for _, source := range []string{"proxy-v1", "proxy-v2"} {
			s.checkNginx(t, v, accessLog, errorLog, "-fallback-source", source)
		}

		// Without a header nginx takes the ClientHello for a broken
		// PROXY line: the header is what makes it work.
		p := s.NewProxy(t, v, "-fallback-source", "host")
		p.Start()
		before := strings.Count(readFile(errorLog), "broken header")
		for _, f := range families {
			if body, _, err := s.get(s.ServerAddr(f, 443), []string{"h2", "http/1.1"}); err == nil {
				t.Errorf("-fallback-source host, %v: nginx with proxy_protocol answered %q, want a refused connection", f, body)
			}
		}
		p.Stop()
		if after := strings.Count(readFile(errorLog), "broken header"); after != before+len(families) {
			t.Errorf("nginx logged %d new broken headers, want %d:\n%s", after-before, len(families), readFile(errorLog))
		}
		if !logHasLine(p.RunLog(), "route=fallback", "source=host") {
			t.Errorf("no connection line says source=host:\n%s", p.RunLog())
		}

		nginx.stop()
		_, accessLog, errorLog = s.startNginx(ppNginxOwnPort)
		s.checkNginx(t, v, accessLog, errorLog, "-fallback-source", "proxy-v2", "-fallback", "127.0.0.1:8443")
		for _, f := range families {
			body, client, err := s.get(s.ServerAddr(f, 443), []string{"h2", "http/1.1"})
			if err != nil || body != client.Addr().String() {
				t.Errorf("%v, no proxy: nginx answered %q, %v; want the client's own address and no header", f, body, err)
			}
		}
	})
}

// checkNginx runs the proxy with flags (-fallback-source first) and
// checks that nginx answers and logs each client's address and port and
// the address it dialed, taken from the header.
func (s *ppSite) checkNginx(t *testing.T, v Variant, accessLog, errorLog string, flags ...string) {
	t.Helper()
	p := s.NewProxy(t, v, flags...)
	p.Start()
	for _, f := range families {
		target := s.ServerAddr(f, 443)
		body, client, err := s.get(target, []string{"h2", "http/1.1"})
		if err != nil {
			t.Fatalf("%q, %v: %v (body %q)\nnginx error log:\n%s", flags, f, err, body, readFile(errorLog))
		}
		want := fmt.Sprintf("%s %s %d %s %d", client.Addr(), client.Addr(), client.Port(), target.Addr(), target.Port())
		if body != want {
			t.Errorf("%q, %v: nginx answered %q, want remote_addr, the header's source and destination: %q", flags, f, body, want)
		}
		line := want + "\n"
		if log := waitFileContains(accessLog, line); !strings.Contains(log, line) {
			t.Errorf("%q, %v: nginx access log lacks %q:\n%s", flags, f, line, log)
		}
	}
	p.Stop()
	if !logHasLine(p.RunLog(), "route=fallback", "source="+flags[1]) {
		t.Errorf("%q: no connection line says source=%s:\n%s", flags, flags[1], p.RunLog())
	}
}

// HAProxy takes src and dst from the header as nginx does, for the web
// server and for the ACME responder (-alpn-proxy-protocol): the responder
// too is told the address the client dialed, not its own. Expecting the
// header only from this host's addresses, it serves clients that come
// straight in as well.
func TestProxyProtocolHAProxy(t *testing.T) {
	forEachVariant(t, func(t *testing.T, v Variant) {
		s := newPPSite(t)
		s.startHAProxy()
		for _, version := range []string{"v1", "v2"} {
			p := s.NewProxy(t, v, "-fallback-source", "proxy-"+version, "-alpn-proxy-protocol", version)
			p.Start()
			for _, f := range families {
				target := s.ServerAddr(f, 443)
				for _, route := range []struct {
					alpn     []string
					frontend string
				}{{[]string{"h2", "http/1.1"}, "web"}, {[]string{ACMEALPN}, "acme"}} {
					body, client, err := s.get(target, route.alpn)
					if err != nil {
						t.Fatalf("%s, %v, ALPN %q: %v (body %q)", version, f, route.alpn, err, body)
					}
					want := fmt.Sprintf("%s %d %s %d %s", client.Addr(), client.Port(), target.Addr(), target.Port(), route.frontend)
					if body != want {
						t.Errorf("%s, %v, ALPN %q: HAProxy answered %q, want src, src_port, dst, dst_port, frontend %q", version, f, route.alpn, body, want)
					}
				}
			}
			p.Stop()
			for _, route := range []string{"fallback", "acme"} {
				if !logHasLine(p.RunLog(), "route="+route, "source=proxy-"+version) {
					t.Errorf("%s: no route=%s connection line with source=proxy-%s:\n%s", version, route, version, p.RunLog())
				}
			}
		}
		for _, f := range families {
			target := s.ServerAddr(f, 443)
			body, client, err := s.get(target, []string{"h2", "http/1.1"})
			if want := fmt.Sprintf("%s %d %s %d web", client.Addr(), client.Port(), target.Addr(), target.Port()); err != nil || body != want {
				t.Errorf("%v, no proxy: HAProxy answered %q, %v; want %q", f, body, err, want)
			}
		}
	})
}

// logHasLine reports whether a line of log contains every one of parts.
func logHasLine(log string, parts ...string) bool {
	for _, line := range strings.Split(log, "\n") {
		if !slices.ContainsFunc(parts, func(p string) bool { return !strings.Contains(line, p) }) {
			return true
		}
	}
	return false
}

func readFile(path string) string {
	b, _ := os.ReadFile(path)
	return string(b)
}

// waitFileContains returns the file once it contains s, or after 5 s
// (nginx writes its access log line as the request ends).
func waitFileContains(path, s string) string {
	deadline := time.Now().Add(5 * time.Second)
	for {
		b := readFile(path)
		if strings.Contains(b, s) || time.Now().After(deadline) {
			return b
		}
		time.Sleep(20 * time.Millisecond)
	}
}

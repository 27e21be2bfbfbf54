package e2e

// Issue 12: the web server sees each client's own address while the proxy
// runs (-fallback-source client, the default), with real nginx, Docker-style
// DNAT, kill -9 and a host where the return path cannot work.

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// nginxServer is a real nginx in the server namespace on 443 (IPv4 and
// IPv6) that logs "$remote_addr $remote_port" per request, answers / with
// 200, and proxies /hold, limited to 2 connections per client address
// (limit_conn, 503 beyond), to a backend that holds each request until
// released.
type nginxServer struct {
	dir     string
	held    atomic.Int32  // requests waiting in the hold backend
	release chan struct{} // closed by releaseAll: the hold backend answers
	once    sync.Once
}

func (n *nginxServer) releaseAll() { n.once.Do(func() { close(n.release) }) }

func startNginx(t *testing.T, ns *Netns) *nginxServer {
	t.Helper()
	bin := issLookPath("nginx")
	if bin == "" {
		skipOrFail(t, "nginx not installed (Debian package nginx)")
	}
	n := &nginxServer{dir: t.TempDir(), release: make(chan struct{})}
	t.Cleanup(n.releaseAll)
	n.writeCert(t)

	hold, err := ns.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n.held.Add(1)
		defer n.held.Add(-1)
		select {
		case <-n.release:
		case <-r.Context().Done():
		}
		fmt.Fprintln(w, "released")
	})}
	go srv.Serve(hold)
	t.Cleanup(func() { srv.Close() })

	conf := fmt.Sprintf(`daemon off;
master_process on;
worker_processes 1;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log;
events { worker_connections 1024; }
http {
  log_format addr '$remote_addr $remote_port';
  access_log %[1]s/access.log addr;
  client_body_temp_path %[1]s/body;
  proxy_temp_path %[1]s/proxy;
  fastcgi_temp_path %[1]s/fastcgi;
  uwsgi_temp_path %[1]s/uwsgi;
  scgi_temp_path %[1]s/scgi;
  limit_conn_zone $binary_remote_addr zone=perip:1m;
  limit_conn_status 503;
  server {
    listen 443 ssl;
    listen [::]:443 ssl;
    ssl_certificate %[1]s/web.pem;
    ssl_certificate_key %[1]s/web.key;
    location / { return 200 "ok\n"; }
    location /hold {
      limit_conn perip 2;
      proxy_pass http://%[2]s;
      proxy_read_timeout 120s;
    }
  }
}
`, n.dir, hold.Addr())
	path := filepath.Join(n.dir, "nginx.conf")
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("ip", "netns", "exec", ns.Name, bin, "-p", n.dir, "-c", path, "-e", filepath.Join(n.dir, "error.log"))
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-done
		}
		if t.Failed() {
			errLog, _ := os.ReadFile(filepath.Join(n.dir, "error.log"))
			t.Logf("nginx output:\n%s\nerror.log:\n%s", out.String(), errLog)
		}
	})
	if !eventually(10*time.Second, func() bool {
		ok, _ := listening(ns, 443)
		return ok
	}) {
		t.Fatalf("nginx did not listen on 443: %s", out.String())
	}
	return n
}

// listening reports whether something listens on port in ns (IPv4 and IPv6).
func listening(ns *Netns, port int) (bool, error) {
	out, err := ns.Exec(context.Background(), "ss", "-Htln", fmt.Sprintf("sport = :%d", port))
	return strings.Count(out, "LISTEN") >= 2, err
}

func (n *nginxServer) writeCert(t *testing.T) {
	cert, err := testCertificate()
	if err != nil {
		t.Fatal(err)
	}
	key, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	for name, block := range map[string]*pem.Block{
		"web.pem": {Type: "CERTIFICATE", Bytes: cert.Certificate[0]},
		"web.key": {Type: "PRIVATE KEY", Bytes: key},
	} {
		if err := os.WriteFile(filepath.Join(n.dir, name), pem.EncodeToMemory(block), 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// accessLog returns the $remote_addr of every request nginx logged.
func (n *nginxServer) accessLog(t *testing.T) []string {
	b, err := os.ReadFile(filepath.Join(n.dir, "access.log"))
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var addrs []string
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if f := strings.Fields(l); len(f) == 2 {
			addrs = append(addrs, f[0])
		}
	}
	return addrs
}

// httpsGet sends one HTTP/1.1 request for path over a new TLS connection
// from (a zero port: any) to the server and returns the status code.
func httpsGet(ctx context.Context, ns *Netns, from, to netip.AddrPort, path string) (int, error) {
	conn, err := dialFromPort(ctx, ns, from, to)
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	if d, ok := ctx.Deadline(); ok {
		conn.SetDeadline(d)
	}
	tc := tls.Client(conn, &tls.Config{InsecureSkipVerify: true, ServerName: "e2e.test", NextProtos: []string{"http/1.1"}})
	if _, err := fmt.Fprintf(tc, "GET %s HTTP/1.1\r\nHost: e2e.test\r\nConnection: close\r\n\r\n", path); err != nil {
		return 0, err
	}
	resp, err := http.ReadResponse(bufio.NewReader(tc), nil)
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.StatusCode, nil
}

// 12.1 nginx's $remote_addr is the client's address, IPv4 and IPv6, with
// default flags, on every request through the proxy.
func TestNginxSeesClientAddress(t *testing.T) {
	forEachVariant(t, func(t *testing.T, v Variant) {
		e := NewEnv(t)
		ng := startNginx(t, e.Srv)
		StartACMEServer(t, e.Srv)
		p := e.NewProxy(t, v)
		p.Start()
		const each = 5
		for _, f := range families {
			for range each {
				ctx := timeout(t, 10*time.Second)
				code, err := httpsGet(ctx, e.Cli, netip.AddrPortFrom(e.ClientAddr(f), 0), e.ServerAddr(f, 443), "/")
				if err != nil || code != 200 {
					t.Fatalf("%v: GET / = %d, %v", f, code, err)
				}
			}
		}
		p.Stop()
		if n := strings.Count(p.RunLog(), "source=client"); n < 2*each {
			t.Errorf("%d connection lines say source=client, want %d:\n%s", n, 2*each, p.RunLog())
		}
		seen := map[string]int{}
		for _, a := range ng.accessLog(t) {
			seen[a]++
		}
		want := map[string]int{e.CliV4.String(): each, e.CliV6.String(): each}
		if fmt.Sprint(seen) != fmt.Sprint(want) {
			t.Errorf("nginx logged $remote_addr %v, want %v (the clients' own addresses)", seen, want)
		}
	})
}

// 12.2 nginx limit_conn 2 per address, 20 held connections from 10 client
// addresses through the proxy: none refused. With -fallback-source host
// (the behaviour before) every connection has this host's address, and
// all but 2 are refused: the test can tell.
func TestNginxLimitConnPerClient(t *testing.T) {
	forEachVariant(t, func(t *testing.T, v Variant) {
		for _, tc := range []struct {
			name       string
			flags      []string
			wantRefuse bool
		}{{"default", nil, false}, {"host", []string{"-fallback-source", "host"}, true}} {
			t.Run(tc.name, func(t *testing.T) {
				refused := limitConnRun(t, v, tc.flags)
				switch {
				case !tc.wantRefuse && refused != 0:
					t.Errorf("%d of 20 held connections refused by limit_conn 2 per address, want 0", refused)
				case tc.wantRefuse && refused < 18:
					t.Errorf("with this host's address %d of 20 refused, want 18: the test cannot tell the modes apart", refused)
				}
			})
		}
	})
}

// limitConnRun holds 20 requests (2 from each of 10 addresses) in nginx at
// once through the proxy, then releases them, and returns how many nginx
// refused with 503.
func limitConnRun(t *testing.T, v Variant, flags []string) int {
	e := NewEnv(t)
	ng := startNginx(t, e.Srv)
	var clients []netip.Addr
	for i := range 10 {
		a := netip.AddrFrom4([4]byte{198, 18, 0, byte(10 + i)})
		e.Cli.MustExec(t, "ip", "addr", "add", a.String()+"/24", "dev", "e2v")
		clients = append(clients, a)
	}
	p := e.NewProxy(t, v, flags...)
	p.Start()
	defer p.Stop()

	ctx := timeout(t, 90*time.Second)
	type res struct {
		code int
		err  error
	}
	results := make(chan res, 20)
	for i := range 20 {
		go func() {
			code, err := httpsGet(ctx, e.Cli, netip.AddrPortFrom(clients[i/2], 0), e.ServerAddr(IPv4, 443), "/hold")
			results <- res{code, err}
		}()
	}
	// All 20 are either held by the backend or answered (refused).
	var got []res
	for len(got)+int(ng.held.Load()) < 20 {
		select {
		case r := <-results:
			got = append(got, r)
		case <-time.After(50 * time.Millisecond):
		case <-ctx.Done():
			t.Fatalf("held %d, answered %d: the 20 requests never all arrived", ng.held.Load(), len(got))
		}
	}
	ng.releaseAll()
	for len(got) < 20 {
		got = append(got, <-results)
	}
	refused := 0
	for _, r := range got {
		switch {
		case r.err != nil:
			t.Errorf("request failed: %v", r.err)
		case r.code == 503:
			refused++
		case r.code != 200:
			t.Errorf("status %d", r.code)
		}
	}
	return refused
}

// 12.3 A web server in another namespace behind a Docker-style DNAT of
// port 443 sees the client's address, with no failure.
func TestDockerDNATSeesClientAddress(t *testing.T) {
	keep := func(v Variant) bool { return v.Backend == "nft" || v.Iptables == "nft" }
	forEachVariantWhere(t, keep, func(t *testing.T, v Variant) {
		s := newTaggedSite(t)
		to := dockerTargets[0].start(t, s) // the container
		form := dockerRuleForms[1]         // iptables-nft, as Docker writes them
		form.add(t, s.Srv, to)
		p := s.NewProxy(t, v)
		p.Start()
		for range 10 {
			a := s.Cli.MustRequest(t, s.ServerAddr(IPv4, 443), []string{"h2"})
			if a.Server != "docker" || a.Peer.Addr() != s.CliV4 || a.Peer == a.Local {
				t.Fatalf("answered by %s, which saw %s (client socket %s): want the container, seeing the client's address through the proxy", a.Server, a.Peer, a.Local)
			}
		}
		if a := s.Cli.MustRequest(t, s.ServerAddr(IPv4, 443), []string{ACMEALPN}); a.Server != "acme" {
			t.Errorf("acme-tls/1 answered by %s", a.Server)
		}
		p.Stop()
	})
}

// 12.5 kill -9: the next connection goes direct; the routing rules left
// behind change nothing for a plain client (only our table set the mark);
// status shows them; the next start replaces and its stop removes them —
// and a stop with nothing running removes them too.
func TestKill9LeavesInertRoutes(t *testing.T) {
	forEachVariant(t, func(t *testing.T, v Variant) {
		s := NewSite(t)
		p := s.NewProxy(t, v)
		ourRules := func() (rules, routes string) {
			r4 := s.Srv.MustExec(t, "ip", "-4", "rule", "show")
			r6 := s.Srv.MustExec(t, "ip", "-6", "rule", "show")
			rt := s.Srv.MustExec(t, "ip", "-4", "route", "show", "table", "all")
			rt += s.Srv.MustExec(t, "ip", "-6", "route", "show", "table", "all")
			var keep []string
			for _, l := range strings.Split(rt, "\n") {
				if strings.Contains(l, "table 21443") {
					keep = append(keep, l)
				}
			}
			return grepLines(r4+r6, "lookup 21443"), strings.Join(keep, "\n")
		}
		for round := range 2 {
			p.Start()
			requireProxied(t, s, IPv4, s.Cli.MustRequest(t, s.ServerAddr(IPv4, 443), []string{"h2"}))
			rules, routes := ourRules()
			if strings.Count(rules, "fwmark 0x1000/0x1000 lookup 21443") != 2 || strings.Count(routes, "local default dev lo") != 2 {
				t.Fatalf("round %d: while running, want one rule and one route per family:\n%s\n%s", round, rules, routes)
			}
			p.Kill9()
			if v.Backend == "iptables" {
				// Its rules outlive the process; stop removes them (TestKill9).
				if r := p.RunT("stop"); r.Code != 0 {
					t.Fatalf("stop after kill -9: %v", r)
				}
				if rules, _ := ourRules(); rules != "" {
					t.Fatalf("stop left the routing rules:\n%s", rules)
				}
				return
			}
			if rules, routes := ourRules(); rules == "" || routes == "" {
				t.Fatalf("round %d: no routing rules left after kill -9; the test would prove nothing", round)
			}
			// Inert: plain clients reach the web server directly, both families.
			for range 3 {
				requireBypassed(t, s)
			}
			if r := p.RunT("status"); r.Code != 3 || !strings.Contains(r.Output, "lookup 21443") {
				t.Errorf("status after kill -9: %v; want exit 3 and the routing rules shown", r)
			}
			if round == 1 {
				if r := p.RunT("stop"); r.Code != 0 || !strings.Contains(r.Output, "removed policy routing") {
					t.Fatalf("stop with nothing running: %v", r)
				}
				if rules, routes := ourRules(); rules != "" || routes != "" {
					t.Errorf("stop left routing entries:\n%s\n%s", rules, routes)
				}
				return
			}
			// The next start replaces them (still one of each) ...
			p.Start()
			rules, routes = ourRules()
			if strings.Count(rules, "lookup 21443") != 2 || strings.Count(routes, "local default") != 2 {
				t.Errorf("after restart, want exactly one rule and route per family:\n%s\n%s", rules, routes)
			}
			// ... and its stop removes them.
			p.Stop()
			if rules, routes := ourRules(); rules != "" || routes != "" {
				t.Errorf("stop left routing entries:\n%s\n%s", rules, routes)
			}
		}
	})
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// 12.6 A host whose return path cannot work (here a firewall rule drops
// every packet to the test address the start-time check dials from) starts
// in the old mode with one log line saying why, and serves.
func TestReturnPathBlockedFallsBackToHost(t *testing.T) {
	forEachVariant(t, func(t *testing.T, v Variant) {
		s := NewSite(t)
		nftApply(t, s.Srv, `table inet block {
	chain output {
		type filter hook output priority filter; policy accept;
		ip daddr 192.0.2.0/24 drop
		ip6 daddr 2001:db8::/32 drop
	}
}
`)
		p := s.NewProxy(t, v)
		p.Start()
		log := p.RunLog()
		if n := strings.Count(log, "the web server sees this host's address, not the client's"); n != 1 {
			t.Errorf("%d log lines say why the client's address is not used, want 1:\n%s", n, log)
		}
		if !logHas(log, "msg=ready", "source=host") {
			t.Errorf("ready line does not say source=host:\n%s", log)
		}
		for _, f := range families {
			a := s.Cli.MustRequest(t, s.ServerAddr(f, 443), []string{"h2"})
			if a.Server != "web" || a.Peer.Addr() != s.ServerAddr(f, 0).Addr() {
				t.Errorf("%v: %s saw %s, want the web server seeing this host's address", f, a.Server, a.Peer)
			}
		}
		if out := s.Srv.MustExec(t, "ip", "rule", "show"); strings.Contains(out, "21443") {
			t.Errorf("routing rule left although the return path is not used:\n%s", out)
		}
		p.Stop()
	})
}

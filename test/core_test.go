package e2e

// Core end-to-end behaviour, each test over every (backend, mode) variant.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

func timeout(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// requireProxied fails unless the connection came through the proxy: by
// default from the client's address on a port of the proxy's choosing
// (not the client's own), and with -fallback-source host (or to the ACME
// responder) from the server's own address.
func requireProxied(t testing.TB, s *Site, f Family, a Answer) {
	t.Helper()
	if a.Peer == a.Local {
		t.Fatalf("%s saw the client's own socket %s: the connection did not go through the proxy", a.Server, a.Peer)
	}
	if a.Peer.Addr() != s.ClientAddr(f) && a.Peer.Addr() != s.ServerAddr(f, 0).Addr() {
		t.Fatalf("%s answered a connection from %s; through the proxy it comes from %s or %s", a.Server, a.Peer, s.ClientAddr(f), s.ServerAddr(f, 0).Addr())
	}
}

// requireDirect fails unless the web server saw the client itself.
func requireDirect(t testing.TB, s *Site, f Family, a Answer) {
	t.Helper()
	if a.Server != "web" {
		t.Fatalf("answered by %q, want the web server directly", a.Server)
	}
	if a.Peer != a.Local {
		t.Fatalf("web server saw %s, want the client's socket %s directly (no proxy)", a.Peer, a.Local)
	}
}

// requireNoRules fails if any rule of ours is left in the server namespace.
func requireNoRules(t testing.TB, s *Site, v Variant) {
	t.Helper()
	if rules := s.OurRules(t, v); len(rules) > 0 {
		t.Fatalf("rules of ours remain:\n%s", strings.Join(rules, "\n"))
	}
}

// requireBypassed checks that, with no proxy intercepting, every client
// reaches the web server directly, whatever ALPN it offers.
func requireBypassed(t testing.TB, s *Site) {
	t.Helper()
	for _, f := range families {
		for _, alpn := range [][]string{{"h2"}, {ACMEALPN}} {
			a := s.Cli.MustRequest(t, s.ServerAddr(f, 443), alpn)
			requireDirect(t, s, f, a)
		}
	}
}

type routeCase struct {
	name     string
	alpn     []string
	server   string
	wantALPN string
}

var routeCases = []routeCase{
	{"acme-tls-1", []string{ACMEALPN}, "acme", ACMEALPN},
	{"h2", []string{"h2"}, "web", "h2"},
	{"http-1.1", []string{"http/1.1"}, "web", ""},
	{"no-alpn", nil, "web", ""},
	// "offers acme-tls/1" is the rule, wherever it is in the list.
	{"h2-and-acme-tls-1", []string{"h2", ACMEALPN}, "acme", ACMEALPN},
}

// 1. acme-tls/1 goes to the responder, everything else to the web server.
func TestRouting(t *testing.T) {
	forEachVariant(t, func(t *testing.T, v Variant) {
		s := NewSite(t)
		p := s.NewProxy(t, v)
		p.Start()
		for _, f := range families {
			t.Run(f.String(), func(t *testing.T) {
				for _, c := range routeCases {
					t.Run(c.name, func(t *testing.T) {
						a := s.Cli.MustRequest(t, s.ServerAddr(f, 443), c.alpn)
						if a.Server != c.server || a.ALPN != c.wantALPN {
							t.Fatalf("offering %q: answered by %q with ALPN %q, want %q with %q", c.alpn, a.Server, a.ALPN, c.server, c.wantALPN)
						}
						if a.Server == "web" {
							requireProxied(t, s, f, a)
						}
					})
				}
			})
		}
		// One log line per connection, naming the route.
		for _, route := range []string{"route=acme", "route=fallback"} {
			if !eventually(2*time.Second, func() bool { return logHas(p.RunLog(), "msg=conn", route) }) {
				t.Errorf("no msg=conn line with %s in the log", route)
			}
		}
	})
}

// logHas reports whether one line of log contains all parts.
func logHas(log string, parts ...string) bool {
	for _, line := range strings.Split(log, "\n") {
		ok := true
		for _, p := range parts {
			ok = ok && strings.Contains(line, p)
		}
		if ok {
			return true
		}
	}
	return false
}

// eventually polls cond every 50 ms until it holds or limit passes.
func eventually(limit time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(limit)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// 2. A ClientHello that arrives in many small segments or in several TLS
// records is reassembled and routed by its ALPN (NETFILTER-NOTES fact 7).
func TestFragmentedClientHello(t *testing.T) {
	shapes := []struct {
		name   string
		shaper helloShaper
	}{
		{"segments-10B", helloShaper{Segment: 10, Pause: time.Millisecond}},
		// The first record carries a single byte: not even the handshake
		// header is complete in it.
		{"records-1-7-100-rest", helloShaper{Records: []int{1, 7, 100}}},
		{"records-and-segments", helloShaper{Records: []int{1, 7, 100}, Segment: 10, Pause: time.Millisecond}},
	}
	forEachVariant(t, func(t *testing.T, v Variant) {
		s := NewSite(t)
		p := s.NewProxy(t, v)
		p.Start()
		for _, f := range families {
			for _, shape := range shapes {
				for _, c := range []routeCase{routeCases[0], routeCases[1]} {
					t.Run(f.String()+"/"+shape.name+"/"+c.name, func(t *testing.T) {
						ctx := timeout(t, 15*time.Second)
						conn, err := s.Cli.Dial(ctx, s.ServerAddr(f, 443))
						if err != nil {
							t.Fatal(err)
						}
						shaped := shape.shaper
						shaped.Conn = conn
						sess, err := OpenTLSOver(ctx, &shaped, c.alpn)
						if err != nil {
							t.Fatalf("offering %q: %v", c.alpn, err)
						}
						defer sess.Close()
						if sess.Answer.Server != c.server || sess.Answer.ALPN != c.wantALPN {
							t.Fatalf("answered by %q with %q, want %q with %q", sess.Answer.Server, sess.Answer.ALPN, c.server, c.wantALPN)
						}
						if err := sess.Echo("after a fragmented hello"); err != nil {
							t.Fatal(err)
						}
					})
				}
			}
		}
	})
}

// 3. A client whose first byte is not a TLS handshake record is relayed to
// the web server at once, with its bytes intact, instead of waiting for a
// ClientHello until -hello-timeout. The backend here is plain TCP so the
// bytes it receives can be checked.
func TestNonTLSRelayedAtOnce(t *testing.T) {
	forEachVariant(t, func(t *testing.T, v Variant) {
		e := NewEnv(t)
		StartEchoServer(t, e.Srv, "raw", "tcp", ":443", nil)
		StartACMEServer(t, e.Srv)
		s := &Site{Env: e}
		// Far longer than the 10 s this test allows for the answer.
		p := s.NewProxy(t, v, "-hello-timeout", "60s")
		p.Start()
		for _, f := range families {
			for _, c := range []struct{ name, send string }{
				{"http-request", "GET / HTTP/1.0\r\n\r\n"},
				{"one-byte", "G"},
			} {
				t.Run(f.String()+"/"+c.name, func(t *testing.T) {
					ctx := timeout(t, 10*time.Second)
					conn, err := s.Cli.Dial(ctx, s.ServerAddr(f, 443))
					if err != nil {
						t.Fatal(err)
					}
					defer conn.Close()
					if _, err := io.WriteString(conn, c.send); err != nil {
						t.Fatal(err)
					}
					sess, err := Greet(conn, 10*time.Second)
					if err != nil {
						t.Fatalf("no answer within 10 s after sending %q: %v", c.send, err)
					}
					if sess.Answer.Server != "raw" {
						t.Fatalf("answered by %q, want the web server (raw)", sess.Answer.Server)
					}
					requireProxied(t, s, f, sess.Answer)
					got := make([]byte, len(c.send))
					conn.SetReadDeadline(time.Now().Add(5 * time.Second))
					if _, err := io.ReadFull(sess.r, got); err != nil {
						t.Fatalf("reading the echo of %q: %v", c.send, err)
					}
					if string(got) != c.send {
						t.Fatalf("web server received %q, client sent %q", got, c.send)
					}
				})
			}
		}
	})
}

// 4. A client that stalls inside its ClientHello is disconnected at
// -hello-timeout: neither early nor never. "trickle" keeps sending a byte
// every 200 ms, so the limit must be on the whole hello, not per read.
func TestStalledClientClosed(t *testing.T) {
	forEachVariant(t, func(t *testing.T, v Variant) {
		s := NewSite(t)
		p := s.NewProxy(t, v, "-hello-timeout", "2s")
		p.Start()
		for _, f := range families {
			for _, trickle := range []bool{false, true} {
				name := "stall-after-3-bytes"
				if trickle {
					name = "trickle"
				}
				t.Run(f.String()+"/"+name, func(t *testing.T) {
					conn, err := s.Cli.Dial(timeout(t, 5*time.Second), s.ServerAddr(f, 443))
					if err != nil {
						t.Fatal(err)
					}
					defer conn.Close()
					begin := time.Now()
					// The start of a handshake record header, without its length.
					if _, err := conn.Write([]byte{0x16, 0x03, 0x01}); err != nil {
						t.Fatal(err)
					}
					stopTrickle := make(chan struct{})
					defer close(stopTrickle)
					if trickle {
						go func() {
							// Length 512, a ClientHello header of 508, then zeros.
							for _, b := range append([]byte{0x02, 0x00, 0x01, 0x00, 0x01, 0xfc}, make([]byte, 500)...) {
								select {
								case <-stopTrickle:
									return
								case <-time.After(200 * time.Millisecond):
								}
								if _, err := conn.Write([]byte{b}); err != nil {
									return
								}
							}
						}()
					}
					conn.SetReadDeadline(time.Now().Add(15 * time.Second))
					n, err := conn.Read(make([]byte, 64))
					took := time.Since(begin)
					var ne net.Error
					switch {
					case err == nil:
						t.Fatalf("received %d bytes from a connection that never sent a whole ClientHello", n)
					case errors.As(err, &ne) && ne.Timeout():
						t.Fatalf("still open after %v with -hello-timeout 2s", took.Round(time.Millisecond))
					case took < time.Second:
						t.Fatalf("closed after %v (%v), before -hello-timeout 2s", took.Round(time.Millisecond), err)
					case took > 10*time.Second:
						t.Fatalf("closed only after %v with -hello-timeout 2s", took.Round(time.Millisecond))
					}
					t.Logf("closed after %v: %v", took.Round(time.Millisecond), err)
				})
			}
		}
	})
}

// 5. After stop nothing of ours is left and clients reach the web server
// directly, whatever ALPN they offer; status says "not running" (3).
func TestAfterStop(t *testing.T) {
	forEachVariant(t, func(t *testing.T, v Variant) {
		s := NewSite(t)
		p := s.NewProxy(t, v)
		p.Start()
		if a := s.Cli.MustRequest(t, s.ServerAddr(IPv4, 443), []string{ACMEALPN}); a.Server != "acme" {
			t.Fatalf("while running, acme-tls/1 answered by %q", a.Server)
		}
		p.Stop()
		requireNoRules(t, s, v)
		if code := p.Status(); code != 3 {
			t.Errorf("status after stop: exit %d, want 3 (not running)", code)
		}
		requireBypassed(t, s)
	})
}

// 6. A connection in flight when stop begins keeps working until the
// client closes it, with no other rule or conntrack user in the namespace
// (NETFILTER-NOTES fact 1); stop returns only after it has closed. New
// connections bypass the draining proxy.
func TestInFlightSurvivesStop(t *testing.T) {
	forEachVariant(t, func(t *testing.T, v Variant) {
		s := NewSite(t)
		p := s.NewProxy(t, v)
		p.Start()
		sessions := map[Family]*Session{}
		for _, f := range families {
			sess, err := s.Cli.OpenTLS(timeout(t, 10*time.Second), s.ServerAddr(f, 443), []string{"h2"})
			if err != nil {
				t.Fatal(err)
			}
			defer sess.Close()
			requireProxied(t, s, f, sess.Answer)
			if err := sess.Echo("before stop"); err != nil {
				t.Fatal(err)
			}
			sessions[f] = sess
		}

		stopped := make(chan Result, 1)
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
			defer cancel()
			stopped <- p.Run(ctx, "stop")
		}()

		// New connections must stop reaching the proxy soon after stop.
		for _, f := range families {
			var last Answer
			ok := eventually(5*time.Second, func() bool {
				last = s.Cli.MustRequest(t, s.ServerAddr(f, 443), []string{"h2"})
				return last.Peer == last.Local
			})
			if !ok {
				t.Errorf("%v: 5 s into stop, new connections still reach the proxy (web saw %s)", f, last.Peer)
			}
		}
		a := s.Cli.MustRequest(t, s.ServerAddr(IPv4, 443), []string{ACMEALPN})
		requireDirect(t, s, IPv4, a)

		for i := range 30 {
			for f, sess := range sessions {
				if err := sess.Echo("during drain"); err != nil {
					t.Fatalf("%v: in-flight connection broke %d00 ms into stop: %v", f, i, err)
				}
			}
			select {
			case r := <-stopped:
				t.Fatalf("stop returned while connections were in flight: %v", r)
			default:
			}
			time.Sleep(100 * time.Millisecond)
		}
		for _, sess := range sessions {
			sess.Close()
		}
		select {
		case r := <-stopped:
			if r.Err != nil || r.Code != 0 {
				t.Fatalf("stop: %v (%v)", r, r.Err)
			}
		case <-time.After(15 * time.Second):
			t.Fatal("stop still waiting 15 s after the last connection closed")
		}
		if err := p.WaitExit(2 * time.Second); err != nil {
			t.Fatalf("stop returned but the instance did not exit: %v", err)
		}
		requireNoRules(t, s, v)
	})
}

// 7. After kill -9 clients reach the web server directly. nftables: the
// kernel deletes the owner table with the process's socket, so at once.
// iptables: the guardian removes the rules (guardian_test.go measures how
// fast); status then says 3.
func TestKill9(t *testing.T) {
	forEachVariant(t, func(t *testing.T, v Variant) {
		s := NewSite(t)
		p := s.NewProxy(t, v)
		p.Start()
		if a := s.Cli.MustRequest(t, s.ServerAddr(IPv6, 443), []string{ACMEALPN}); a.Server != "acme" {
			t.Fatalf("while running, acme-tls/1 answered by %q", a.Server)
		}
		p.Kill9()
		if v.Backend == "iptables" && !eventually(5*time.Second, func() bool { return len(s.OurRules(t, v)) == 0 }) {
			t.Errorf("iptables rules still there 5 s after kill -9; the guardian should have removed them:\n%s", p.Log())
		}
		requireNoRules(t, s, v)
		requireBypassed(t, s)
		if code := p.Status(); code != 3 {
			t.Errorf("status after kill -9: exit %d, want 3 (nothing left)", code)
		}
	})
}

// 7b. kill -9 ends every connection through the proxy in a way its client
// sees at once: the kernel closes the dead process's sockets, sending a FIN
// on each relayed connection and a reset on each one still queued for
// accept. In redirect mode those packets need the reverse NAT, which goes
// with our owner table when the kernel releases the table's netlink socket;
// a socket released after it answers from :21443, which the client ignores,
// so a client waiting for an answer waits until its own timeout. (The
// kernel releases a dead process's files highest descriptor first.)
// Both as a foreground `start` and as `start -d`, whose child reports on a
// pipe and then must not leave that descriptor free for a connection.
func TestKill9ClientsSeeTheEnd(t *testing.T) {
	forEachVariantWhere(t, func(v Variant) bool { return v.Backend == "nft" }, func(t *testing.T, v Variant) {
		for _, detached := range []bool{false, true} {
			name := "foreground"
			if detached {
				name = "detached"
			}
			t.Run(name, func(t *testing.T) { testKill9ClientsSeeTheEnd(t, v, detached) })
		}
	})
}

func testKill9ClientsSeeTheEnd(t *testing.T, v Variant, detached bool) {
	s := NewSite(t)
	var pause, kill9 func()
	if detached {
		p, _ := detachedProxy(t, s, v)
		if r := p.RunT("start", "-d"); r.Code != 0 {
			t.Fatalf("start -d: %v", r)
		}
		pid := pidFromFile(p.PidFile)
		if pid <= 0 {
			t.Fatal("start -d recorded no PID")
		}
		pause = func() { suspend(t, pid) }
		kill9 = func() {
			syscall.Kill(pid, syscall.SIGKILL)
			// Dead once gone or a zombie: its files are closed then.
			if !eventually(10*time.Second, func() bool {
				b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
				return err != nil || strings.Contains(string(b), ") Z ")
			}) {
				t.Fatalf("background instance %d still alive 10 s after SIGKILL", pid)
			}
		}
	} else {
		p := s.NewProxy(t, v)
		p.Start()
		pause = func() { suspend(t, p.Pid()) }
		kill9 = p.Kill9
	}
	// A relayed connection must end with a FIN (EOF), as from a server
	// that closed; one never accepted with the listener's reset.
	type clientConn struct {
		name string
		net.Conn
		want error
	}
	var conns []clientConn
	for _, f := range families {
		for i := range 3 {
			sess, err := s.Cli.OpenTLS(timeout(t, 10*time.Second), s.ServerAddr(f, 443), []string{"h2"})
			if err != nil {
				t.Fatal(err)
			}
			defer sess.Close()
			requireProxied(t, s, f, sess.Answer)
			conns = append(conns, clientConn{fmt.Sprintf("%v relayed #%d", f, i), sess.Conn, io.EOF})
		}
	}
	// Stopped, the proxy accepts nothing: these stay in its listeners'
	// accept queues, their clients waiting for an answer.
	pause()
	for _, f := range families {
		for i := range 3 {
			c, err := s.Cli.Dial(timeout(t, 5*time.Second), s.ServerAddr(f, 443))
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if _, err := c.Write([]byte("\x16\x03\x01")); err != nil {
				t.Fatal(err)
			}
			conns = append(conns, clientConn{fmt.Sprintf("%v queued #%d", f, i), c, syscall.ECONNRESET})
		}
	}
	kill9()
	for _, c := range conns {
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		_, err := c.Read(make([]byte, 1))
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
			t.Errorf("%s: no end seen 3 s after kill -9; its client would wait for its own timeout", c.name)
		case !errors.Is(err, c.want):
			t.Errorf("%s: read after kill -9 returned %v, want %v", c.name, err, c.want)
		}
	}
}

// suspend stops pid with SIGSTOP and waits until every thread of it has
// stopped: until then a thread may still accept.
func suspend(t *testing.T, pid int) {
	t.Helper()
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stopped := func() bool {
		tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
		if err != nil || len(tasks) == 0 {
			return false
		}
		for _, task := range tasks {
			b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/stat", pid, task.Name()))
			i := bytes.LastIndexByte(b, ')')
			if err != nil || i < 0 || i+2 >= len(b) || b[i+2] != 'T' {
				return false
			}
		}
		return true
	}
	if !eventually(5*time.Second, stopped) {
		t.Fatalf("pid %d not stopped 5 s after SIGSTOP", pid)
	}
}

// 8. A connection made straight to the web server before start keeps
// working while the proxy runs and after it stops (SYN-only interception,
// NETFILTER-NOTES fact 1).
func TestConnectionFromBeforeStart(t *testing.T) {
	forEachVariant(t, func(t *testing.T, v Variant) {
		s := NewSite(t)
		sessions := map[Family]*Session{}
		for _, f := range families {
			sess, err := s.Cli.OpenTLS(timeout(t, 10*time.Second), s.ServerAddr(f, 443), []string{"h2"})
			if err != nil {
				t.Fatal(err)
			}
			defer sess.Close()
			requireDirect(t, s, f, sess.Answer)
			sessions[f] = sess
		}
		echoAll := func(when string) {
			t.Helper()
			for f, sess := range sessions {
				if err := sess.Echo(when); err != nil {
					t.Fatalf("%v: connection from before start broke %s: %v", f, when, err)
				}
			}
		}
		echoAll("before start")
		p := s.NewProxy(t, v)
		p.Start()
		if a := s.Cli.MustRequest(t, s.ServerAddr(IPv4, 443), []string{ACMEALPN}); a.Server != "acme" {
			t.Fatalf("while running, acme-tls/1 answered by %q", a.Server)
		}
		for range 10 {
			echoAll("while the proxy runs")
			time.Sleep(100 * time.Millisecond)
		}
		p.Stop()
		echoAll("after stop")
	})
}

// 9. While running, the rules are visible with the usual tools; nftables
// tables are owner tables (deleted by the kernel if the proxy dies).
func TestRulesListed(t *testing.T) {
	forEachVariant(t, func(t *testing.T, v Variant) {
		s := NewSite(t)
		p := s.NewProxy(t, v)
		p.Start()
		switch v.Backend {
		case "nft":
			action := map[string]string{"redirect": "redirect to :21443", "tproxy": "tproxy to :21443"}[v.Mode]
			for _, fam := range []string{"ip", "ip6"} {
				out := s.Srv.MustExec(t, "nft", "list", "table", fam, TableName)
				for _, want := range []string{"flags owner", "tcp dport 443", action} {
					if !strings.Contains(out, want) {
						t.Errorf("nft list table %s %s lacks %q:\n%s", fam, TableName, want, out)
					}
				}
			}
		case "iptables":
			action := map[string]string{"redirect": "--to-ports 21443", "tproxy": "--on-port 21443"}[v.Mode]
			rules := strings.Join(s.OurRules(t, v), "\n")
			if strings.Count(rules, action) < 2 {
				t.Errorf("want a rule with %q for IPv4 and IPv6 among ours:\n%s", action, rules)
			}
		default:
			t.Fatalf("unknown backend %q", v.Backend)
		}
	})
}

// 10. By default the web server is dialed at the address the client
// dialed (so virtual hosts bound to one address keep working), from the
// client's own address. With -fallback-source host it sees the server's
// own address; with -fallback 127.0.0.1:443 it sees 127.0.0.1 — the
// documented caveat: the kernel does not route 127.0.0.1's replies to
// another address, so the start-time check falls back to this host's
// address, and says so.
func TestFallbackAddress(t *testing.T) {
	forEachVariant(t, func(t *testing.T, v Variant) {
		s := NewSite(t)
		for _, c := range []struct {
			name  string
			flags []string
			want  func(Family) netip.Addr
		}{
			{"default", nil, func(f Family) netip.Addr { return s.ClientAddr(f) }},
			{"host", []string{"-fallback-source", "host"}, func(f Family) netip.Addr { return s.ServerAddr(f, 0).Addr() }},
			{"explicit-loopback", []string{"-fallback", "127.0.0.1:443"}, func(Family) netip.Addr { return netip.MustParseAddr("127.0.0.1") }},
		} {
			t.Run(c.name, func(t *testing.T) {
				p := s.NewProxy(t, v, c.flags...)
				p.Start()
				for _, f := range families {
					a := s.Cli.MustRequest(t, s.ServerAddr(f, 443), []string{"h2"})
					if a.Server != "web" {
						t.Fatalf("%v: answered by %q", f, a.Server)
					}
					if a.Peer.Addr() != c.want(f) {
						t.Errorf("%v: web server saw the connection from %s, want %s", f, a.Peer, c.want(f))
					}
				}
				p.Stop()
			})
		}
	})
}

// 11. The listener is reachable only through the interception: a client
// dialing :21443 directly gets nowhere, local diagnostics do.
func TestListenerOnlyThroughInterception(t *testing.T) {
	forEachVariant(t, func(t *testing.T, v Variant) {
		s := NewSite(t)
		p := s.NewProxy(t, v)
		p.Start()
		for _, f := range families {
			t.Run(f.String(), func(t *testing.T) {
				if a := s.Cli.MustRequest(t, s.ServerAddr(f, 443), []string{ACMEALPN}); a.Server != "acme" {
					t.Fatalf("through :443, acme-tls/1 answered by %q", a.Server)
				}
				direct := s.ServerAddr(f, ListenPort)
				conn, err := s.Cli.Dial(timeout(t, 2*time.Second), direct)
				if err == nil {
					conn.Close()
					t.Fatalf("client connected to %s directly", direct)
				}
				local := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), ListenPort)
				if f == IPv6 {
					local = netip.AddrPortFrom(netip.IPv6Loopback(), ListenPort)
				}
				conn, err = s.Srv.Dial(timeout(t, 5*time.Second), local)
				if err != nil {
					t.Fatalf("inside the server namespace, %s: %v", local, err)
				}
				conn.Close()
			})
		}
	})
}

// 12. Zero downtime: steady HTTPS load (h2 and no ALPN, IPv4 and IPv6,
// every request a new connection) while the proxy is started and stopped
// repeatedly: not one request may fail.
func TestZeroDowntime(t *testing.T) {
	const (
		cycles = 5
		rate   = 100 // per second, over four targets: 50/s per family
	)
	forEachVariant(t, func(t *testing.T, v Variant) {
		s := NewSite(t)
		p := s.NewProxy(t, v)
		r := cycleUnderLoad(t, s, p, rate, cycles)
		// Both paths carried load: through the proxy (the web server sees
		// the client's address on a port of the proxy's) and directly (it
		// sees the client's own socket).
		for _, f := range families {
			if r.Proxied[s.ClientAddr(f)] == 0 {
				t.Errorf("%v: no request went through the proxy", f)
			}
			if r.Direct[s.ClientAddr(f)] == 0 {
				t.Errorf("%v: no request went directly to the web server", f)
			}
			if r.ByPeer[s.ServerAddr(f, 0).Addr()] != 0 {
				t.Errorf("%v: %d requests reached the web server from this host's address, want the client's every time", f, r.ByPeer[s.ServerAddr(f, 0).Addr()])
			}
		}
	})
}

// 13. start while running succeeds without a second instance; stop with
// nothing running succeeds.
func TestIdempotentStartStop(t *testing.T) {
	forEachVariant(t, func(t *testing.T, v Variant) {
		s := NewSite(t)
		p := s.NewProxy(t, v)
		if r := p.RunT("stop"); r.Code != 0 {
			t.Errorf("stop before any start: %v", r)
		}
		if code := p.Status(); code != 3 {
			t.Errorf("status before any start: exit %d, want 3", code)
		}
		p.Start()
		ctx := timeout(t, 15*time.Second)
		r := p.Run(ctx, "start")
		if r.Err != nil {
			t.Fatalf("second start did not return: %v (%v)", r, r.Err)
		}
		if r.Code != 0 || !strings.Contains(strings.ToLower(r.Output), "already running") {
			t.Errorf("second start: want exit 0 and \"already running\", got %v", r)
		}
		select {
		case <-p.Done():
			t.Fatalf("first instance exited after the second start: %v", p.ExitErr())
		default:
		}
		if code := p.Status(); code != 0 {
			t.Errorf("status after second start: exit %d, want 0", code)
		}
		if a := s.Cli.MustRequest(t, s.ServerAddr(IPv4, 443), []string{ACMEALPN}); a.Server != "acme" {
			t.Fatalf("after second start, acme-tls/1 answered by %q", a.Server)
		}
		p.Stop()
		if r := p.RunT("stop"); r.Code != 0 {
			t.Errorf("stop with nothing running: %v", r)
		}
		if code := p.Status(); code != 3 {
			t.Errorf("status: exit %d, want 3", code)
		}
		requireNoRules(t, s, v)
	})
}

// The pure part of the hello shaping needs no privileges.
func TestReframeHandshake(t *testing.T) {
	payload := make([]byte, 1000)
	for i := range payload {
		payload[i] = byte(i)
	}
	in := append([]byte{22, 3, 1, 0x03, 0xe8}, payload...)
	out, err := reframeHandshake(in, []int{1, 7, 100})
	if err != nil {
		t.Fatal(err)
	}
	var sizes []int
	var joined []byte
	for rest := out; len(rest) > 0; {
		if rest[0] != 22 || rest[1] != 3 || rest[2] != 1 {
			t.Fatalf("bad record header % x", rest[:5])
		}
		n := int(rest[3])<<8 | int(rest[4])
		sizes = append(sizes, n)
		joined = append(joined, rest[5:5+n]...)
		rest = rest[5+n:]
	}
	if want := []int{1, 7, 100, 892}; !slices.Equal(sizes, want) {
		t.Errorf("record sizes %v, want %v", sizes, want)
	}
	if string(joined) != string(payload) {
		t.Error("payload changed by re-framing")
	}
	// Re-framing the output again with no split joins it back.
	back, err := reframeHandshake(out, nil)
	if err != nil || string(back) != string(in) {
		t.Errorf("joining records: %v, equal=%v", err, string(back) == string(in))
	}
	for _, bad := range [][]byte{nil, {22, 3, 1, 0, 9, 1}, {23, 3, 3, 0, 1, 0}, {22, 3}} {
		if _, err := reframeHandshake(bad, nil); err == nil {
			t.Errorf("reframeHandshake(% x) accepted bad input", bad)
		}
	}
	if _, err := reframeHandshake(in, []int{1000}); err == nil {
		t.Error("a split leaving an empty last record was accepted")
	}
}

// cycleUnderLoad runs a steady HTTPS load (h2 and no ALPN, both families)
// from the client namespace while p is started and stopped cycles times,
// and fails the test on any failed request or a load below 50 req/s.
func cycleUnderLoad(t *testing.T, s *Site, p *Proxy, rate, cycles int) LoadReport {
	t.Helper()
	load := StartLoad(t, s.Cli, rate, "web",
		LoadTarget{Addr: s.ServerAddr(IPv4, 443), ALPN: []string{"h2"}},
		LoadTarget{Addr: s.ServerAddr(IPv6, 443)},
		LoadTarget{Addr: s.ServerAddr(IPv4, 443)},
		LoadTarget{Addr: s.ServerAddr(IPv6, 443), ALPN: []string{"h2"}},
	)
	time.Sleep(300 * time.Millisecond)
	for range cycles {
		p.Start()
		time.Sleep(600 * time.Millisecond)
		p.Stop()
		time.Sleep(300 * time.Millisecond)
	}
	r := load.Stop()
	t.Logf("%d requests in %v, %d failed, %d over 1 s, slowest %v; by peer %v",
		r.Requests, r.Duration.Round(time.Millisecond), r.Failures, r.Slow, r.MaxLatency.Round(time.Millisecond), r.ByPeer)
	if r.Failures > 0 {
		t.Errorf("%d of %d requests failed across %d start/stop cycles; first failures:\n%s",
			r.Failures, r.Requests, cycles, strings.Join(r.Reasons, "\n"))
	}
	if got := float64(r.Requests) / r.Duration.Seconds(); got < 50 {
		t.Errorf("load generator made only %.0f requests/s, want ≥ 50", got)
	}
	return r
}

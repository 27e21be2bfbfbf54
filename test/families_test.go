package e2e

// Start with what is there: start intercepts each address family on which
// a web server listens and leaves the other alone, with one warning; it
// refuses only when no family has a web server. Also the journal: under
// systemd the log goes to the stderr stream JOURNAL_STREAM names.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"
)

// famTag prefixes the namespaces of these tests.
const famTag = "fam"

// newIPv4OnlySite is a site whose web server listens on 0.0.0.0:443 only,
// like nginx's `listen 443 ssl;` without `listen [::]:443 ssl;`.
func newIPv4OnlySite(t testing.TB) *Site {
	t.Helper()
	e := NewEnvTagged(t, famTag)
	return &Site{Env: e, Web: StartNamedWebServer(t, e.Srv, "web", "tcp4", "0.0.0.0:443"), ACME: StartACMEServer(t, e.Srv)}
}

// requireRulesOnlyFor fails unless rules of ours exist for family f and
// none for the other: no table, no iptables rule of that family.
func requireRulesOnlyFor(t testing.TB, s *Site, v Variant, f Family) {
	t.Helper()
	nftFamily := map[Family]string{IPv4: "ip", IPv6: "ip6"}
	saveTool := map[Family]string{IPv4: "iptables", IPv6: "ip6tables"}
	other := IPv6
	if f == IPv6 {
		other = IPv4
	}
	tables := s.Srv.MustExec(t, "nft", "list", "tables")
	iptablesRules := func(f Family) string {
		if v.Backend != "iptables" {
			return ""
		}
		return s.Srv.MustExec(t, saveTool[f]+"-"+v.Iptables+"-save")
	}
	if v.Backend == "nft" && !strings.Contains(tables, "table "+nftFamily[f]+" "+TableName+"\n") {
		t.Fatalf("no %v table of ours:\n%s", f, tables)
	}
	if rules := iptablesRules(f); v.Backend == "iptables" && !strings.Contains(rules, TableName) {
		t.Fatalf("no %v rules of ours:\n%s", f, rules)
	}
	if strings.Contains(tables, "table "+nftFamily[other]+" "+TableName+"\n") {
		t.Errorf("%v has no web server, yet our %s table is installed:\n%s", other, nftFamily[other], tables)
	}
	if rules := iptablesRules(other); strings.Contains(rules, TableName) {
		t.Errorf("%v has no web server, yet %s rules of ours are installed:\n%s", other, saveTool[other], rules)
	}
}

// requireRefused fails unless a connection to addr from ns is refused.
func requireRefused(t testing.TB, ns *Netns, network, addr, what string) {
	t.Helper()
	c, err := ns.DialContext(timeout(t, 10*time.Second), network, addr)
	if err == nil {
		c.Close()
		t.Fatalf("%s: %s accepted a connection, want it refused", what, addr)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("%s: %s: %v, want connection refused", what, addr, err)
	}
}

// countLines counts the lines of log that contain every part.
func countLines(log string, parts ...string) int {
	n := 0
	for _, line := range strings.Split(log, "\n") {
		if logHas(line, parts...) {
			n++
		}
	}
	return n
}

// A web server on IPv4 only: start succeeds, intercepts IPv4, leaves IPv6
// exactly as it was (refused: nothing listens there) and says so once.
func TestIPv4OnlyWebServer(t *testing.T) {
	forEachVariantWhere(t, lifecycleVariant, func(t *testing.T, v Variant) {
		s := newIPv4OnlySite(t)
		p := s.NewProxy(t, v)
		p.Start()

		if a := s.Cli.MustRequest(t, s.ServerAddr(IPv4, 443), []string{ACMEALPN}); a.Server != "acme" {
			t.Fatalf("IPv4 acme-tls/1 answered by %q, want the responder", a.Server)
		}
		a := s.Cli.MustRequest(t, s.ServerAddr(IPv4, 443), []string{"h2"})
		if a.Server != "web" {
			t.Fatalf("IPv4 h2 answered by %q, want the web server", a.Server)
		}
		requireProxied(t, s, IPv4, a)

		// Not intercepted, IPv6 meets what it met before: no listener. An
		// intercepted connection would have reached the responder.
		requireRefused(t, s.Cli, "tcp6", s.ServerAddr(IPv6, 443).String(), "IPv6 to port 443")
		requireRulesOnlyFor(t, s, v, IPv4)
		requireRefused(t, s.Srv, "tcp6", fmt.Sprintf("[::1]:%d", ListenPort), "proxy listener on IPv6")

		log := p.RunLog()
		if n := countLines(log, "level=WARN", "IPv6 not intercepted", "AAAA", "fix="); n != 1 {
			t.Errorf("%d warnings that IPv6 is not intercepted (with effect and fix), want 1:\n%s", n, log)
		}
		if !logHas(log, "msg=ready", "families=IPv4 ", "not_intercepted=IPv6") {
			t.Errorf("ready line does not name the intercepted families:\n%s", log)
		}
		if r := p.RunT("status"); r.Code != 0 || !strings.Contains(r.Output, "interception active for IPv4 only (IPv6 not intercepted)") {
			t.Errorf("status: %v, want exit 0 naming IPv4 only", r)
		}
		p.Stop()
		requireNoRules(t, s, v)
	})
}

// A web server on one IPv6 address only: the mirror image, IPv4 left
// alone. (A dual-stack [::] socket would count for IPv4 too.)
func TestIPv6OnlyWebServer(t *testing.T) {
	forEachVariantWhere(t, func(v Variant) bool { return v.Backend == "nft" }, func(t *testing.T, v Variant) {
		e := NewEnvTagged(t, famTag)
		web := StartNamedWebServer(t, e.Srv, "web", "tcp6", e.ServerAddr(IPv6, 443).String())
		s := &Site{Env: e, Web: web, ACME: StartACMEServer(t, e.Srv)}
		p := s.NewProxy(t, v)
		p.Start()
		if a := s.Cli.MustRequest(t, s.ServerAddr(IPv6, 443), []string{ACMEALPN}); a.Server != "acme" {
			t.Fatalf("IPv6 acme-tls/1 answered by %q, want the responder", a.Server)
		}
		requireProxied(t, s, IPv6, s.Cli.MustRequest(t, s.ServerAddr(IPv6, 443), []string{"h2"}))
		requireRefused(t, s.Cli, "tcp4", s.ServerAddr(IPv4, 443).String(), "IPv4 to port 443")
		requireRulesOnlyFor(t, s, v, IPv6)
		requireRefused(t, s.Srv, "tcp4", fmt.Sprintf("127.0.0.1:%d", ListenPort), "proxy listener on IPv4")
		if log := p.RunLog(); countLines(log, "level=WARN", "IPv4 not intercepted") != 1 || !logHas(log, "msg=ready", "families=IPv6", "not_intercepted=IPv4") {
			t.Errorf("want one IPv4 warning and a ready line naming IPv6:\n%s", log)
		}
		if r := p.RunT("status"); r.Code != 0 || !strings.Contains(r.Output, "interception active for IPv6 only (IPv4 not intercepted)") {
			t.Errorf("status: %v, want exit 0 naming IPv6 only", r)
		}
		p.Stop()
		requireNoRules(t, s, v)
	})
}

// With no web server on either family start refuses, names the fix and
// installs nothing.
func TestNoWebServerRefuses(t *testing.T) {
	forEachVariantWhere(t, lifecycleVariant, func(t *testing.T, v Variant) {
		e := NewEnvTagged(t, famTag)
		s := &Site{Env: e, ACME: StartACMEServer(t, e.Srv)}
		p := s.NewProxy(t, v)
		if err := p.Launch(); err != nil {
			t.Fatal(err)
		}
		if err := p.WaitExit(30 * time.Second); err != nil {
			t.Fatalf("start with no web server: %v\n%s", err, p.RunLog())
		}
		if p.ExitErr() == nil {
			t.Fatalf("start with no web server exited 0:\n%s", p.RunLog())
		}
		log := p.RunLog()
		for _, want := range []string{"preflight: nothing on this host listens on IPv4 or IPv6 port 443", "start the web server first", "-fallback", "-skip-preflight"} {
			if !strings.Contains(log, want) {
				t.Errorf("refusal does not say %q:\n%s", want, log)
			}
		}
		requireNoRules(t, s, v)
		requireRefused(t, s.Srv, "tcp4", fmt.Sprintf("127.0.0.1:%d", ListenPort), "proxy listener after a refused start")
		if code := p.Status(); code != 3 {
			t.Errorf("status after the refusal: exit %d, want 3", code)
		}
	})
}

// ACME_ALPN_PROXY_DISABLEV6=y still leaves IPv6 alone, without a warning,
// even with a web server there.
func TestDisableV6(t *testing.T) {
	forEachVariantWhere(t, func(v Variant) bool { return v.Backend == "nft" && v.Mode == "tproxy" }, func(t *testing.T, v Variant) {
		e := NewEnvTagged(t, famTag)
		s := &Site{Env: e, Web: StartWebServer(t, e.Srv), ACME: StartACMEServer(t, e.Srv)}
		p := s.NewProxy(t, v)
		p.environ = append(p.environ, "ACME_ALPN_PROXY_DISABLEV6=y")
		p.Start()
		requireProxied(t, s, IPv4, s.Cli.MustRequest(t, s.ServerAddr(IPv4, 443), []string{"h2"}))
		requireDirect(t, s, IPv6, s.Cli.MustRequest(t, s.ServerAddr(IPv6, 443), []string{ACMEALPN}))
		requireRulesOnlyFor(t, s, v, IPv4)
		if log := p.RunLog(); strings.Contains(log, "not intercepted") {
			t.Errorf("IPv6 disabled on purpose, yet a warning:\n%s", log)
		}
		p.Stop()
	})
}

// Under systemd (stderr is the stream JOURNAL_STREAM names) start logs to
// stderr with syslog priorities, and keeps stderr after ready: the lines
// of the stop still arrive.
func TestLogsToTheJournalStream(t *testing.T) {
	forEachVariantWhere(t, func(v Variant) bool { return v.Backend == "nft" && v.Mode == "redirect" }, func(t *testing.T, v Variant) {
		s := newIPv4OnlySite(t)
		p := s.NewProxy(t, v, "-log", "") // no -log: the default destination
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		fi, err := w.Stat()
		if err != nil {
			t.Fatal(err)
		}
		st := fi.Sys().(*syscall.Stat_t)
		cmd := p.command(context.Background(), "start")
		cmd.Env = append(p.environ, fmt.Sprintf("JOURNAL_STREAM=%d:%d", st.Dev, st.Ino))
		cmd.Stdout, cmd.Stderr = w, w
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		w.Close()
		exited := make(chan struct{})
		var waitErr error
		go func() { waitErr = cmd.Wait(); close(exited) }()
		t.Cleanup(func() {
			select {
			case <-exited:
			default:
				syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
				<-exited
			}
		})
		var journal syncBuffer
		lines := make(chan struct{}, 1)
		go func() {
			sc := bufio.NewScanner(r)
			for sc.Scan() {
				journal.Write(append(sc.Bytes(), '\n'))
				select {
				case lines <- struct{}{}:
				default:
				}
			}
		}()
		waitFor := func(parts ...string) {
			t.Helper()
			deadline := time.After(30 * time.Second)
			for !logHas(journal.String(), parts...) {
				select {
				case <-lines:
				case <-deadline:
					t.Fatalf("no line with %q on the journal stream:\n%s", parts, journal.String())
				}
			}
		}
		waitFor("<6>level=INFO msg=ready", "families=IPv4")
		if !logHas(journal.String(), `<4>level=WARN msg="IPv6 not intercepted`) {
			t.Errorf("warning not at priority 4:\n%s", journal.String())
		}
		if code := p.Status(); code != 0 {
			t.Fatalf("status %d after ready", code)
		}
		a := s.Cli.MustRequest(t, s.ServerAddr(IPv4, 443), []string{ACMEALPN})
		if a.Server != "acme" {
			t.Fatalf("acme-tls/1 answered by %q", a.Server)
		}
		waitFor("<6>level=INFO msg=conn", "route=acme")
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(60 * time.Second):
			t.Fatalf("start still running 60 s after SIGTERM\n%s", journal.String())
		}
		if waitErr != nil {
			t.Fatalf("start ended with %v after SIGTERM\n%s", waitErr, journal.String())
		}
		waitFor("<6>level=INFO msg=stopped")
		for _, line := range strings.Split(strings.TrimSpace(journal.String()), "\n") {
			if !strings.HasPrefix(line, "<") || strings.Contains(line, "time=") {
				t.Errorf("journal line without priority, or with a time the journal adds itself: %q", line)
			}
		}
		requireNoRules(t, s, v)
	})
}

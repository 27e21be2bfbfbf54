package e2e

// The proxy on hosts that already have netfilter rules of their own (issue
// 7): a "ufw-style" input firewall that lets in only port 443, and a
// Docker-style DNAT of port 443 to a container or another local port.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// e3Tag prefixes the namespaces of the firewall, lifecycle and conntrack
// tests.
const e3Tag = "e3"

// newTaggedSite is NewSite with namespaces named after e3Tag.
func newTaggedSite(t testing.TB) *Site {
	t.Helper()
	e := NewEnvTagged(t, e3Tag)
	return &Site{Env: e, Web: StartWebServer(t, e.Srv), ACME: StartACMEServer(t, e.Srv)}
}

// nftApply loads an nft script into the namespace (nft -f).
func nftApply(t testing.TB, ns *Netns, script string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "rules.nft")
	if err := os.WriteFile(path, []byte(script), 0o600); err != nil {
		t.Fatal(err)
	}
	ns.MustExec(t, "nft", "-f", path)
}

// hostFirewall installs an input policy in the server namespace the way a
// host firewall does: drop by default, accept loopback, ICMPv6 neighbour
// discovery (IPv6 breaks without it), established/related, and tcp/443.
// Invalid packets are dropped, as ufw does.
type hostFirewall struct {
	name    string
	install func(t testing.TB, ns *Netns)
}

var hostFirewalls = []hostFirewall{
	{"nft", func(t testing.TB, ns *Netns) {
		nftApply(t, ns, `table inet fw {
	chain input {
		type filter hook input priority filter; policy drop;
		iif "lo" accept
		icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert } accept
		ct state invalid drop
		ct state established,related accept
		tcp dport 443 accept
	}
}
`)
	}},
	{"iptables-nft", func(t testing.TB, ns *Netns) {
		requireTools(t, "iptables-nft", "ip6tables-nft")
		for _, ipt := range []string{"iptables-nft", "ip6tables-nft"} {
			rules := [][]string{
				{"-A", "INPUT", "-i", "lo", "-j", "ACCEPT"},
				{"-A", "INPUT", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"},
				{"-A", "INPUT", "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"},
				{"-A", "INPUT", "-p", "tcp", "--dport", "443", "-j", "ACCEPT"},
			}
			if ipt == "ip6tables-nft" {
				nd := [][]string{
					{"-A", "INPUT", "-p", "ipv6-icmp", "--icmpv6-type", "neighbour-solicitation", "-j", "ACCEPT"},
					{"-A", "INPUT", "-p", "ipv6-icmp", "--icmpv6-type", "neighbour-advertisement", "-j", "ACCEPT"},
				}
				rules = append(rules[:1], append(nd, rules[1:]...)...)
			}
			for _, r := range rules {
				ns.MustExec(t, ipt, r...)
			}
			ns.MustExec(t, ipt, "-P", "INPUT", "DROP")
		}
	}},
}

// requireFirewallDrops checks the firewall is in force before the proxy
// starts: a port other than 443 times out (dropped, not refused) while 443
// answers directly, for both families. Without this a test passing "with a
// firewall" could pass with none.
func requireFirewallDrops(t testing.TB, s *Site) {
	t.Helper()
	StartEchoServer(t, s.Srv, "other", "tcp", ":8080", nil)
	for _, f := range families {
		if err := requireDialTimesOut(t, s, s.ServerAddr(f, 8080), time.Second); err != nil {
			t.Fatalf("firewall not in force: %v", err)
		}
	}
	requireBypassed(t, s)
}

// requireDialTimesOut returns nil if a connection from the client to addr
// is neither accepted nor refused within limit (its SYNs are dropped).
func requireDialTimesOut(t testing.TB, s *Site, addr interface{ String() string }, limit time.Duration) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	conn, err := s.Cli.DialContext(ctx, "tcp", addr.String())
	switch {
	case err == nil:
		conn.Close()
		return fmt.Errorf("connection to %s was accepted", addr)
	case errors.Is(err, context.DeadlineExceeded):
		return nil
	default:
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return nil
		}
		return fmt.Errorf("connection to %s failed without timing out: %w", addr, err)
	}
}

func forEachFirewall(t *testing.T, fn func(t *testing.T, fw hostFirewall)) {
	for _, fw := range hostFirewalls {
		t.Run("fw-"+fw.name, func(t *testing.T) {
			t.Parallel()
			fn(t, fw)
		})
	}
}

// In tproxy mode the destination port stays 443, so a firewall that lets
// in only 443 lets intercepted connections in: routing works and steady
// load across start/stop cycles sees no failure (NETFILTER-NOTES fact 3).
func TestHostFirewallTProxy(t *testing.T) {
	const (
		cycles = 3
		rate   = 60 // per second, over four targets
	)
	forEachVariantWhere(t, func(v Variant) bool { return v.Mode == "tproxy" }, func(t *testing.T, v Variant) {
		forEachFirewall(t, func(t *testing.T, fw hostFirewall) {
			s := newTaggedSite(t)
			fw.install(t, s.Srv)
			requireFirewallDrops(t, s)

			p := s.NewProxy(t, v)
			p.Start()
			for _, f := range families {
				if a := s.Cli.MustRequest(t, s.ServerAddr(f, 443), []string{ACMEALPN}); a.Server != "acme" {
					t.Fatalf("%v: acme-tls/1 answered by %q behind the firewall, want acme", f, a.Server)
				}
				a := s.Cli.MustRequest(t, s.ServerAddr(f, 443), []string{"h2"})
				if a.Server != "web" || a.ALPN != "h2" {
					t.Fatalf("%v: h2 answered by %q with %q, want web with h2", f, a.Server, a.ALPN)
				}
				requireProxied(t, s, f, a)
			}
			p.Stop()

			r := cycleUnderLoad(t, s, p, rate, cycles)
			for _, f := range families {
				if r.Proxied[s.ClientAddr(f)] == 0 {
					t.Errorf("%v: no request of the load went through the proxy", f)
				}
			}
			requireNoRules(t, s, v)
		})
	})
}

// Known limitation, pinned so we notice if it changes: in redirect mode the
// kernel rewrites the destination port to 21443 before the input filter
// (NETFILTER-NOTES fact 3), so a firewall that lets in only 443 drops every
// new connection while the proxy runs, and no rule of ours can override
// another table's drop. The README ("Two interception modes") tells users
// of such hosts to use tproxy. If this test fails because the connections
// get through, update the README and this test.
func TestHostFirewallRedirectBlocked(t *testing.T) {
	keep := func(v Variant) bool { return v.Mode == "redirect" && (v.Backend == "nft" || v.Iptables == "nft") }
	forEachVariantWhere(t, keep, func(t *testing.T, v Variant) {
		forEachFirewall(t, func(t *testing.T, fw hostFirewall) {
			s := newTaggedSite(t)
			fw.install(t, s.Srv)
			requireFirewallDrops(t, s)
			p := s.NewProxy(t, v)
			p.Start()
			for _, f := range families {
				if err := requireDialTimesOut(t, s, s.ServerAddr(f, 443), 2*time.Second); err != nil {
					t.Errorf("%v: expected the firewall to drop redirected connections (dport %d): %v", f, ListenPort, err)
				}
			}
			p.Stop()
			// The outage lasts exactly as long as the proxy runs.
			requireBypassed(t, s)
			requireNoRules(t, s, v)
		})
	})
}

// dockerTarget is where a Docker-style DNAT sends port 443: a "docker"
// web server that is not the host's own web server.
type dockerTarget struct {
	name  string
	start func(t testing.TB, s *Site) netip.AddrPort
}

var dockerTargets = []dockerTarget{
	// What Docker does: a container's address behind a veth, so the host
	// forwards the DNATed connections.
	{"container", func(t testing.TB, s *Site) netip.AddrPort {
		ctr := newNetns(t, strings.TrimSuffix(s.Srv.Name, "srv")+"ctr")
		s.Srv.MustExec(t, "ip", "link", "add", "e3ctr", "type", "veth", "peer", "name", "eth0", "netns", ctr.Name)
		s.Srv.MustExec(t, "ip", "addr", "add", "198.19.0.1/24", "dev", "e3ctr")
		s.Srv.MustExec(t, "ip", "link", "set", "e3ctr", "up")
		ctr.MustExec(t, "ip", "addr", "add", "198.19.0.2/24", "dev", "eth0")
		ctr.MustExec(t, "ip", "link", "set", "eth0", "up")
		ctr.MustExec(t, "ip", "route", "add", "default", "via", "198.19.0.1")
		s.Srv.MustExec(t, "sysctl", "-qw", "net.ipv4.ip_forward=1")
		StartNamedWebServer(t, ctr, "docker", "tcp4", ":443")
		return netip.MustParseAddrPort("198.19.0.2:443")
	}},
	// Another port of the host itself (host networking, a second server).
	{"local-port", func(t testing.TB, s *Site) netip.AddrPort {
		addr := s.ServerAddr(IPv4, 8443)
		StartNamedWebServer(t, s.Srv, "docker", "tcp4", addr.String())
		return addr
	}},
}

// dockerRules adds or deletes a DNAT of tcp/443 to the target the way
// Docker publishes a port: in PREROUTING for other hosts and in OUTPUT
// (daddr local, not loopback) for connections made on the host itself —
// without the latter the host could not reach its own published port. IPv4
// only, as Docker by default.
type dockerRules struct {
	name string
	add  func(t testing.TB, ns *Netns, to netip.AddrPort)
	del  func(t testing.TB, ns *Netns, to netip.AddrPort)
}

var dockerRuleForms = []dockerRules{
	{"nft",
		func(t testing.TB, ns *Netns, to netip.AddrPort) {
			nftApply(t, ns, fmt.Sprintf(`table ip docker {
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		fib daddr type local tcp dport 443 dnat to %[1]s
	}
	chain output {
		type nat hook output priority -100; policy accept;
		ip daddr != 127.0.0.0/8 fib daddr type local tcp dport 443 dnat to %[1]s
	}
}
`, to))
		},
		func(t testing.TB, ns *Netns, _ netip.AddrPort) {
			ns.MustExec(t, "nft", "delete", "table", "ip", "docker")
		},
	},
	{"iptables-nft",
		func(t testing.TB, ns *Netns, to netip.AddrPort) { iptablesDocker(t, ns, "-A", to) },
		func(t testing.TB, ns *Netns, to netip.AddrPort) { iptablesDocker(t, ns, "-D", to) },
	},
}

func iptablesDocker(t testing.TB, ns *Netns, op string, to netip.AddrPort) {
	t.Helper()
	requireTools(t, "iptables-nft")
	match := []string{"-p", "tcp", "--dport", "443", "-m", "addrtype", "--dst-type", "LOCAL", "-j", "DNAT", "--to-destination", to.String()}
	ns.MustExec(t, "iptables-nft", append([]string{"-t", "nat", op, "PREROUTING"}, match...)...)
	ns.MustExec(t, "iptables-nft", append([]string{"-t", "nat", op, "OUTPUT", "!", "-d", "127.0.0.0/8"}, match...)...)
}

// expectAnswer is one request and who must answer it.
type expectAnswer struct {
	f      Family
	alpn   []string
	server string
}

// requireAnswers makes the requests concurrently (a dropped connection
// costs its timeout once, not once per request) and reports every wrong
// or missing answer.
func requireAnswers(t testing.TB, s *Site, when string, exps []expectAnswer) {
	t.Helper()
	type result struct {
		a   Answer
		err error
	}
	results := make([]chan result, len(exps))
	for i, e := range exps {
		results[i] = make(chan result, 1)
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			defer cancel()
			a, err := s.Cli.Request(ctx, s.ServerAddr(e.f, 443), e.alpn)
			results[i] <- result{a, err}
		}()
	}
	for i, e := range exps {
		r := <-results[i]
		switch {
		case r.err != nil:
			t.Errorf("%s: %v offering %q: %v (want %s)", when, e.f, e.alpn, r.err, e.server)
		case r.a.Server != e.server:
			t.Errorf("%s: %v offering %q: answered by %s, want %s", when, e.f, e.alpn, r.a.Server, e.server)
		}
	}
}

// With Docker publishing port 443 (a DNAT), acme-tls/1 must still reach
// the ACME responder, and everything else must reach what Docker publishes,
// as it does without the proxy — whether Docker's rules were registered
// before the proxy started or again while it runs (Docker reloads its
// rules; equal-priority NAT chains run last registered first,
// NETFILTER-NOTES fact 2).
func TestDockerDNAT(t *testing.T) {
	keep := func(v Variant) bool { return v.Backend == "nft" || v.Iptables == "nft" }
	forEachVariantWhere(t, keep, func(t *testing.T, v Variant) {
		for _, target := range dockerTargets {
			for _, form := range dockerRuleForms {
				if v.Backend == "iptables" && form.name == "nft" {
					// Not covered: iptables' nat PREROUTING chain has the
					// fixed priority dstnat, so an nft-native Docker chain
					// at dstnat registered after start runs first (fact 2)
					// and takes acme-tls/1; only the nft backend's
					// dstnat - 10 avoids that. Docker with iptables shares
					// our chain, where we insert first (the other form).
					continue
				}
				t.Run(target.name+"/"+form.name, func(t *testing.T) {
					t.Parallel()
					s := newTaggedSite(t)
					to := target.start(t, s)
					form.add(t, s.Srv, to)
					viaDocker := []expectAnswer{
						{IPv4, []string{ACMEALPN}, "docker"},
						{IPv4, []string{"h2"}, "docker"},
						{IPv6, []string{"h2"}, "web"}, // not published over IPv6
					}
					requireAnswers(t, s, "without the proxy", viaDocker)

					withProxy := []expectAnswer{
						{IPv4, []string{ACMEALPN}, "acme"},
						{IPv4, []string{"h2"}, "docker"},
						{IPv4, nil, "docker"},
						{IPv6, []string{ACMEALPN}, "acme"},
						{IPv6, []string{"h2"}, "web"},
					}
					p := s.NewProxy(t, v)
					p.Start()
					requireAnswers(t, s, "Docker's rules registered before start", withProxy)
					form.del(t, s.Srv, to)
					form.add(t, s.Srv, to)
					requireAnswers(t, s, "Docker's rules registered again while running", withProxy)
					p.Stop()
					requireAnswers(t, s, "after stop", viaDocker)
					requireNoRules(t, s, v)
				})
			}
		}
	})
}

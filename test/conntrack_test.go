package e2e

// Stale conntrack entries of redirected connections (issue 6,
// NETFILTER-NOTES fact 6).

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"
)

// reusedPort is the client's fixed source port; the namespaces are the
// test's own, so no other socket uses it.
const reusedPort = 45443

// dialFromPort connects from the client namespace, from a fixed source
// port, with SO_REUSEADDR as clients that pin their port do.
func dialFromPort(ctx context.Context, ns *Netns, from netip.AddrPort, to netip.AddrPort) (*net.TCPConn, error) {
	var conn net.Conn
	err := ns.Do(func() (err error) {
		d := net.Dialer{
			LocalAddr: net.TCPAddrFromAddrPort(from),
			Control: func(_, _ string, c syscall.RawConn) error {
				var serr error
				if err := c.Control(func(fd uintptr) {
					serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1)
				}); err != nil {
					return err
				}
				return serr
			},
		}
		conn, err = d.DialContext(ctx, "tcp", to.String())
		return err
	})
	if err != nil {
		return nil, err
	}
	return conn.(*net.TCPConn), nil
}

// redirectedEntries lists the conntrack entries of family f in the server
// namespace whose reply comes from the proxy's listener port, i.e. the
// connections our redirect translated.
func redirectedEntries(t testing.TB, s *Site, f Family) []string {
	t.Helper()
	fam := "ipv4"
	if f == IPv6 {
		fam = "ipv6"
	}
	// conntrack prints the entries on stdout and a summary on stderr.
	out := s.Srv.MustExec(t, "conntrack", "-L", "-f", fam, "-p", "tcp", "--reply-port-src", "21443")
	var entries []string
	for _, l := range strings.Split(out, "\n") {
		if strings.Contains(l, "sport=21443") {
			entries = append(entries, l)
		}
	}
	return entries
}

// After stop, a client that reuses the 4-tuple of a redirected connection
// it reset reaches the web server directly, not the listener that is
// gone: stop deletes the conntrack entries our redirect created. The
// namespace keeps conntrack and NAT running after our tables go (an
// unrelated masquerade rule, as Docker has), which is when a stale
// entry's NAT binding would still be applied.
func TestStaleConntrackAfterStop(t *testing.T) {
	forEachVariantWhere(t, func(v Variant) bool { return v.Mode == "redirect" }, func(t *testing.T, v Variant) {
		requireTools(t, "conntrack")
		s := newTaggedSite(t)
		nftApply(t, s.Srv, `table inet other {
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		oifname "e3none" masquerade
	}
}
`)
		p := s.NewProxy(t, v)
		p.Start()
		for _, f := range families {
			from := netip.AddrPortFrom(s.ClientAddr(f), reusedPort)
			conn, err := dialFromPort(timeout(t, 5*time.Second), s.Cli, from, s.ServerAddr(f, 443))
			if err != nil {
				t.Fatalf("%v: dial from %s: %v", f, from, err)
			}
			sess, err := OpenTLSOver(timeout(t, 10*time.Second), conn, []string{"h2"})
			if err != nil {
				t.Fatalf("%v: %v", f, err)
			}
			requireProxied(t, s, f, sess.Answer)
			if err := sess.Echo("before the reset"); err != nil {
				t.Fatal(err)
			}
			// An abortive close: RST, no TIME_WAIT on the client, the
			// conntrack entry stays (state CLOSE) with its NAT binding.
			conn.SetLinger(0)
			conn.Close()
			if len(redirectedEntries(t, s, f)) == 0 {
				t.Fatalf("%v: no conntrack entry with reply port %d while running; the test would prove nothing", f, ListenPort)
			}
		}
		p.Stop()
		for _, f := range families {
			if stale := redirectedEntries(t, s, f); len(stale) > 0 {
				t.Errorf("%v: conntrack entries of redirected connections remain after stop:\n%s", f, strings.Join(stale, "\n"))
			}
			from := netip.AddrPortFrom(s.ClientAddr(f), reusedPort)
			conn, err := dialFromPort(timeout(t, 5*time.Second), s.Cli, from, s.ServerAddr(f, 443))
			if err != nil {
				t.Errorf("%v: after stop, reconnecting from %s: %v (sent to the dead :%d?)", f, from, err, ListenPort)
				continue
			}
			sess, err := OpenTLSOver(timeout(t, 10*time.Second), conn, []string{"h2"})
			if err != nil {
				t.Errorf("%v: after stop, from %s: %v", f, from, err)
				continue
			}
			requireDirect(t, s, f, sess.Answer)
			if sess.Answer.Peer != from {
				t.Errorf("%v: web server saw %s, want the reused %s", f, sess.Answer.Peer, from)
			}
			sess.Close()
		}
	})
}

// Our NAT rules turn connection tracking on for every connection of the
// namespace. Where it was off, start warns with the table's capacity (a
// busy host could fill it, and the kernel then drops new connections on
// every port); where a firewall already tracks, it says nothing. status
// shows the table's use.
func TestWarnsWhenTurningConntrackOn(t *testing.T) {
	forEachVariantWhere(t, func(v Variant) bool { return v.Backend == "nft" }, func(t *testing.T, v Variant) {
		for _, alreadyOn := range []bool{false, true} {
			name := "was off"
			if alreadyOn {
				name = "already on"
			}
			t.Run(name, func(t *testing.T) {
				s := newTaggedSite(t)
				if alreadyOn {
					nftApply(t, s.Srv, `table inet firewall {
	chain input {
		type filter hook input priority filter; policy accept;
		ct state established,related accept
	}
}
`)
					requireDirect(t, s, IPv4, s.Cli.MustRequest(t, s.ServerAddr(IPv4, 443), []string{"h2"}))
				}
				// The fact behind the warning: with our rules in place a
				// connection to an unrelated port is tracked too.
				otherPort := trackedOtherPort(t, s)
				if !alreadyOn && otherPort() {
					t.Fatal("a connection to :8080 was tracked before start; the namespace should not track yet")
				}
				p := s.NewProxy(t, v)
				p.Start()
				if !otherPort() {
					t.Error("with the proxy running, a connection to :8080 was not tracked")
				}
				warned := logHas(p.RunLog(), "level=WARN", "connection tracking was off", "nf_conntrack_max=")
				if warned == alreadyOn {
					t.Errorf("conntrack warning logged: %v, want %v", warned, !alreadyOn)
				}
				if r := p.RunT("status"); !strings.Contains(r.Output, "conntrack entries: ") {
					t.Errorf("status does not show the conntrack table's use: %v", r)
				}
				p.Stop()
			})
		}
	})
}

// trackedOtherPort serves :8080 in the server namespace and returns a
// probe: it connects there from the client and reports whether conntrack
// recorded that connection.
func trackedOtherPort(t *testing.T, s *Site) func() bool {
	t.Helper()
	requireTools(t, "conntrack")
	to := netip.AddrPortFrom(s.ServerAddr(IPv4, 0).Addr(), 8080)
	ln, err := s.Srv.Listen("tcp", to.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	next := uint16(41000)
	return func() bool {
		next++
		from := netip.AddrPortFrom(s.ClientAddr(IPv4), next)
		c, err := dialFromPort(timeout(t, 5*time.Second), s.Cli, from, to)
		if err != nil {
			t.Fatalf("dial %s: %v", to, err)
		}
		c.Close()
		out := s.Srv.MustExec(t, "conntrack", "-L", "-p", "tcp", "--orig-port-src", fmt.Sprint(next), "--orig-port-dst", "8080")
		return strings.Contains(out, "dport=8080")
	}
}

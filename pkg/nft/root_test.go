package nft

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/intercept"
)

// openIn opens a Backend whose socket lives in ns and closes it at the end.
func openIn(t *testing.T, ns string) *Backend {
	t.Helper()
	var b *Backend
	inNetns(t, ns, func() {
		var err error
		if b, err = Open(Options{Logf: t.Logf}); err != nil {
			t.Fatal(err)
		}
	})
	t.Cleanup(func() { b.Close() })
	return b
}

func inspectIn(t *testing.T, ns string) State {
	t.Helper()
	var s State
	var err error
	inNetns(t, ns, func() { s, err = Inspect() })
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// nftList returns `nft list table FAMILY acme-alpn-proxy` in ns, "" if the
// table does not exist.
func nftList(t *testing.T, ns string, f intercept.Family) string {
	t.Helper()
	out, err := runErr(ns, "nft", "list", "table", f.String(), intercept.TableName)
	if err != nil {
		if strings.Contains(out, "No such file or directory") {
			return ""
		}
		t.Fatalf("nft list table: %v: %s", err, out)
	}
	return out
}

func wantLines(t *testing.T, listing string, lines ...string) {
	t.Helper()
	have := map[string]bool{}
	for _, l := range strings.Split(listing, "\n") {
		have[strings.TrimSpace(l)] = true
	}
	for _, l := range lines {
		if !have[l] {
			t.Errorf("nft list lacks line\n\t%s\nin\n%s", l, listing)
		}
	}
}

// What `nft list` (nftables 1.0.x) prints for the rule sets, as the
// intercept package documents them in its canonical spelling.
var (
	redirectListing = []string{
		"flags owner",
		"type nat hook prerouting priority dstnat - 10; policy accept;",
		`fib daddr type local tcp dport 443 tcp flags syn / fin,syn,rst,ack redirect to :21443 comment "acme-alpn-proxy: new connections to the proxy"`,
		"type filter hook input priority filter - 10; policy accept;",
		`iifname != "lo" fib daddr type local tcp dport 21443 ct status ! dnat drop comment "acme-alpn-proxy: listener only through the redirect"`,
	}
)

// tproxyListing differs per family only in the address the identity DNAT
// loads: `dnat to ip daddr` / `dnat to ip6 daddr`.
func tproxyListing(f intercept.Family) []string {
	return []string{
		"flags owner",
		"chain prerouting {",
		"type filter hook prerouting priority mangle - 10; policy accept;",
		`iifname != "lo" fib daddr type local tcp dport 21443 drop comment "acme-alpn-proxy: listener only through tproxy"`,
		`iifname != "lo" fib daddr type local tcp dport 443 tcp flags syn / fin,syn,rst,ack tproxy to :21443 comment "acme-alpn-proxy: new connections to the proxy"`,
		"chain claim-nat {",
		"type nat hook prerouting priority dstnat - 10; policy accept;",
		`iifname != "lo" fib daddr type local tcp dport 443 tcp flags syn / fin,syn,rst,ack dnat to ` + f.String() +
			` daddr comment "acme-alpn-proxy: no other DNAT for proxied connections"`,
	}
}

// ruleCount is how many rules t installs; `nft list` shows one comment each.
func ruleCount(t intercept.Table) int {
	n := 0
	for _, c := range t.Chains {
		n += len(c.Rules)
	}
	return n
}

func TestRootInstallListsAsDocumented(t *testing.T) {
	for _, tc := range []struct {
		mode    intercept.Mode
		listing func(intercept.Family) []string
		prios   []int32
	}{
		{intercept.Redirect, func(intercept.Family) []string { return redirectListing }, []int32{-110, -10}},
		{intercept.TProxy, tproxyListing, []int32{-160, -110}},
	} {
		t.Run(string(tc.mode), func(t *testing.T) {
			ns := newNetns(t)
			b := openIn(t, ns)
			rs := ruleSet(t, tc.mode, intercept.IPv4, intercept.IPv6)
			if err := b.Install(rs); err != nil {
				t.Fatal(err)
			}
			if !b.Owner() {
				t.Error("Owner() false on a kernel with owner tables")
			}
			for i, f := range []intercept.Family{intercept.IPv4, intercept.IPv6} {
				l := nftList(t, ns, f)
				wantLines(t, l, tc.listing(f)...)
				if n := strings.Count(l, "comment"); n != ruleCount(rs.Tables[i]) {
					t.Errorf("%s: %d rules listed, want %d:\n%s", f, n, ruleCount(rs.Tables[i]), l)
				}
			}
			// Another process reads the same back, rule for rule.
			s := inspectIn(t, ns)
			for i, ts := range s.Tables {
				if !ts.Exists || !ts.Owner || ts.OwnerPort == 0 || ts.Mode() != tc.mode {
					t.Errorf("table %d: %+v", i, ts)
				}
				want := rs.Tables[i]
				if len(ts.Chains) != len(want.Chains) {
					t.Fatalf("%s: %d chains, want %d", ts.Family, len(ts.Chains), len(want.Chains))
				}
				for j, c := range ts.Chains {
					w := want.Chains[j]
					if c.Name != w.Name || c.Type != w.Type || c.Hook != w.Hook || c.Priority != tc.prios[j] {
						t.Errorf("chain %+v, want %s %s %s priority %d", c, w.Name, w.Type, w.Hook, tc.prios[j])
					}
					if len(c.Rules) != len(w.Rules) {
						t.Fatalf("chain %s: %d rules, want %d", c.Name, len(c.Rules), len(w.Rules))
					}
					for k, r := range c.Rules {
						if !r.Known || r.Rule != w.Rules[k] {
							t.Errorf("rule read back %+v, want %+v", r, w.Rules[k])
						}
					}
				}
			}
		})
	}
}

func TestRootOwnerTable(t *testing.T) {
	ns := newNetns(t)
	b := openIn(t, ns)
	rs := ruleSet(t, intercept.Redirect, intercept.IPv4, intercept.IPv6)
	if err := b.Install(rs); err != nil {
		t.Fatal(err)
	}

	// Only our socket may change the table.
	out, err := runErr(ns, "nft", "delete", "table", "ip", intercept.TableName)
	if err == nil || !strings.Contains(out, "Operation not permitted") {
		t.Errorf("nft delete table from the CLI: err %v, output %q; want EPERM", err, out)
	}
	run(t, ns, "nft", "flush", "ruleset")
	wantLines(t, nftList(t, ns, intercept.IPv4), redirectListing...)

	// A second instance is told who is in the way.
	other := openIn(t, ns)
	err = other.Install(rs)
	if !errors.Is(err, ErrOwnedByAnother) || err.Error() != "table ip acme-alpn-proxy is owned by another process — is another acme-alpn-proxy running?" {
		t.Errorf("second instance: %v", err)
	}
	var removed []intercept.Family
	inNetns(t, ns, func() { removed, err = RemoveStale("") })
	if len(removed) != 0 || !errors.Is(err, ErrOwnedByAnother) {
		t.Errorf("RemoveStale with a live owner: removed %v, err %v", removed, err)
	}
	wantLines(t, nftList(t, ns, intercept.IPv6), redirectListing...)

	// Closing the socket is enough for the kernel to delete the tables.
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	for _, f := range []intercept.Family{intercept.IPv4, intercept.IPv6} {
		if l := nftList(t, ns, f); l != "" {
			t.Errorf("table %s survived Close:\n%s", f, l)
		}
	}
	// Now the other instance may install.
	if err := other.Install(rs); err != nil {
		t.Errorf("install after the owner closed: %v", err)
	}
}

func TestRootRemoveInterceptThenRemove(t *testing.T) {
	for _, mode := range []intercept.Mode{intercept.Redirect, intercept.TProxy} {
		t.Run(string(mode), func(t *testing.T) {
			ns := newNetns(t)
			b := openIn(t, ns)
			rs := ruleSet(t, mode, intercept.IPv4, intercept.IPv6)
			if err := b.Install(rs); err != nil {
				t.Fatal(err)
			}
			for _, ts := range inspectIn(t, ns).Tables {
				if ts.Mode() != mode {
					t.Errorf("%s after Install: Mode() %q, want %q", ts.Family, ts.Mode(), mode)
				}
			}
			if err := b.RemoveIntercept(); err != nil {
				t.Fatal(err)
			}
			s := inspectIn(t, ns)
			for i, ts := range s.Tables {
				if !ts.Exists || ts.Intercepting() || ts.Mode() != "" {
					t.Errorf("%s after RemoveIntercept: exists %v, intercepting %v, mode %q", ts.Family, ts.Exists, ts.Intercepting(), ts.Mode())
				}
				if len(ts.Chains) != len(rs.Tables[i].Chains) {
					t.Errorf("%s: %d chains left, want all %d", ts.Family, len(ts.Chains), len(rs.Tables[i].Chains))
				}
				guards := 0
				for _, c := range ts.Chains {
					for _, r := range c.Rules {
						if !r.Known || r.Rule.Role != intercept.RoleGuard {
							t.Errorf("%s: rule %s left", ts.Family, r.Rule)
						}
						guards++
					}
				}
				if guards != 1 {
					t.Errorf("%s: %d guard rules left, want 1", ts.Family, guards)
				}
			}
			if err := b.Remove(); err != nil {
				t.Fatal(err)
			}
			if s := inspectIn(t, ns); s.Installed() {
				t.Errorf("tables left after Remove: %+v", s)
			}
			if out := run(t, ns, "nft", "list", "ruleset"); strings.TrimSpace(out) != "" {
				t.Errorf("ruleset not empty after Remove:\n%s", out)
			}
			if err := b.Remove(); err != nil {
				t.Errorf("second Remove: %v", err)
			}
		})
	}
}

func TestRootInstallReplaces(t *testing.T) {
	ns := newNetns(t)
	// A plain table left by a run on an old kernel, with a rule of its own.
	run(t, ns, "nft", "add", "table", "ip", intercept.TableName)
	run(t, ns, "nft", "add", "chain", "ip", intercept.TableName, "old", "{ type filter hook input priority 0; }")
	run(t, ns, "nft", "add", "rule", "ip", intercept.TableName, "old", "tcp", "dport", "9", "drop")

	b := openIn(t, ns)
	if err := b.Install(ruleSet(t, intercept.Redirect, intercept.IPv4)); err != nil {
		t.Fatalf("install over a stale plain table: %v", err)
	}
	rs := ruleSet(t, intercept.TProxy, intercept.IPv4)
	for i := 0; i < 2; i++ {
		if err := b.Install(rs); err != nil {
			t.Fatalf("install %d: %v", i, err)
		}
	}
	l := nftList(t, ns, intercept.IPv4)
	wantLines(t, l, tproxyListing(intercept.IPv4)...)
	if strings.Contains(l, "chain old") || strings.Contains(l, "redirect") || strings.Count(l, "comment") != ruleCount(rs.Tables[0]) {
		t.Errorf("re-install did not replace the table:\n%s", l)
	}
	// RemoveIntercept removes the intercept rules of the current rule set
	// (tproxy and the identity DNAT), keeping the guard and both chains.
	if err := b.RemoveIntercept(); err != nil {
		t.Fatal(err)
	}
	l = nftList(t, ns, intercept.IPv4)
	if strings.Contains(l, "tproxy to") || strings.Contains(l, "dnat to") || strings.Count(l, "comment") != 1 {
		t.Errorf("intercept rules left:\n%s", l)
	}
	wantLines(t, l, tproxyListing(intercept.IPv4)[:4]...)
	wantLines(t, l, "chain claim-nat {", "type nat hook prerouting priority dstnat - 10; policy accept;")
}

func TestRootRemoveStalePlainTable(t *testing.T) {
	ns := newNetns(t)
	run(t, ns, "nft", "add", "table", "ip6", intercept.TableName)
	var removed []intercept.Family
	var err error
	inNetns(t, ns, func() { removed, err = RemoveStale("") })
	if err != nil || len(removed) != 1 || removed[0] != intercept.IPv6 {
		t.Errorf("RemoveStale: removed %v, err %v; want [ip6]", removed, err)
	}
	if l := nftList(t, ns, intercept.IPv6); l != "" {
		t.Errorf("stale table left:\n%s", l)
	}
	if s := inspectIn(t, ns); s.Installed() {
		t.Errorf("Inspect: %+v", s)
	}
}

func TestRootProbe(t *testing.T) {
	ns := newNetns(t)
	var err error
	inNetns(t, ns, func() { err = Probe() })
	if err != nil {
		t.Errorf("Probe as root: %v", err)
	}
}

const helperEnv = "NFT_TEST_HOLD_TABLES"

// TestRootKilledOwnerLeavesNothing kills (SIGKILL) a process holding our
// tables: the kernel must delete them, no cleanup code runs.
func TestRootKilledOwnerLeavesNothing(t *testing.T) {
	if os.Getenv(helperEnv) != "" {
		holdTables()
		return
	}
	ns := newNetns(t)
	cmd := exec.Command("ip", "netns", "exec", ns, os.Args[0], "-test.run=^TestRootKilledOwnerLeavesNothing$")
	cmd.Env = append(os.Environ(), helperEnv+"=1")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	ready := make(chan string, 1)
	go func() {
		buf := make([]byte, 64)
		n, _ := stdout.Read(buf)
		ready <- string(buf[:n])
	}()
	select {
	case line := <-ready:
		if !strings.HasPrefix(line, "installed") {
			t.Fatalf("helper: %q", line)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("helper did not install its tables")
	}
	wantLines(t, nftList(t, ns, intercept.IPv4), redirectListing...)
	s := inspectIn(t, ns)
	if p := s.Tables[0].OwnerPort; p != uint32(cmd.Process.Pid) {
		t.Errorf("owner port %d, want the holder's PID %d", p, cmd.Process.Pid)
	}
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	for _, f := range []intercept.Family{intercept.IPv4, intercept.IPv6} {
		if l := nftList(t, ns, f); l != "" {
			t.Errorf("table %s survived SIGKILL of its owner:\n%s", f, l)
		}
	}
}

// holdTables runs in the helper process: install, report, wait to be killed.
func holdTables() {
	rs, _ := intercept.Build(intercept.Config{Mode: intercept.Redirect, Port: 443, ListenPort: 21443,
		Families: []intercept.Family{intercept.IPv4, intercept.IPv6}})
	b, err := Open(Options{})
	if err == nil {
		err = b.Install(rs)
	}
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	fmt.Println("installed")
	time.Sleep(time.Minute)
	b.Close()
	os.Exit(1)
}

// PlainTables (the test switch for kernels < 5.12) installs a plain table
// that outlives its socket; RemoveStale with an instance id removes only
// that instance's table, so a guardian never takes a newer instance's.
func TestRootPlainTablesAndInstanceRemoval(t *testing.T) {
	ns := newNetns(t)
	var b *Backend
	inNetns(t, ns, func() {
		var err error
		if b, err = Open(Options{PlainTables: true}); err != nil {
			t.Fatal(err)
		}
	})
	rs, err := intercept.Build(intercept.Config{Mode: intercept.Redirect, Port: 443, ListenPort: 21443,
		Families: []intercept.Family{intercept.IPv4, intercept.IPv6}, Instance: "00aa"})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Install(rs); err != nil {
		t.Fatal(err)
	}
	if b.Owner() {
		t.Error("Owner() with PlainTables")
	}
	b.Close()
	s := inspectIn(t, ns)
	for _, tb := range s.Tables {
		if !tb.Exists || tb.Owner {
			t.Fatalf("after Close: table %s exists %v owner %v; want a plain table left", tb.Family, tb.Exists, tb.Owner)
		}
		if id, ok := tb.Instance(); !ok || id != "00aa" {
			t.Errorf("table %s: Instance() = %q, %v; want 00aa", tb.Family, id, ok)
		}
	}
	var removed []intercept.Family
	inNetns(t, ns, func() { removed, err = RemoveStale("00bb") })
	if err != nil || len(removed) != 0 || !inspectIn(t, ns).Installed() {
		t.Errorf("RemoveStale of another instance: removed %v, err %v", removed, err)
	}
	inNetns(t, ns, func() { removed, err = RemoveStale("00aa") })
	if err != nil || len(removed) != 2 {
		t.Errorf("RemoveStale(00aa): removed %v, err %v; want both tables", removed, err)
	}
	if inspectIn(t, ns).Installed() {
		t.Error("tables left after RemoveStale of their instance")
	}
}

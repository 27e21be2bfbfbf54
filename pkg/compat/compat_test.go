package compat

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"reflect"
	"strings"
	"testing"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/intercept"
)

func newTestBackend(t *testing.T, fake *fakeIPTables, spec string) *Backend {
	t.Helper()
	b, err := New(Options{Runner: fake, RuleSpec: spec, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

const (
	dockerNAT = `-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A DOCKER ! -i docker0 -p tcp -m tcp --dport 8443 -j DNAT --to-destination 172.17.0.2:443`
	hostInput = `-A INPUT -i lo -j ACCEPT
-A INPUT -p tcp -m tcp --dport 443 -m comment --comment "allow https (acme-alpn-proxy too)" -j ACCEPT
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT`
	// What a killed instance in tproxy mode on other ports left behind,
	// as iptables -S prints it.
	staleNAT    = `-A PREROUTING ! -i lo -p tcp -m tcp --dport 8443 --tcp-flags FIN,SYN,RST,ACK SYN -m addrtype --dst-type LOCAL -m comment --comment acme-alpn-proxy -j ACCEPT`
	staleMangle = `-A PREROUTING ! -i lo -p tcp -m tcp --dport 30000 -m comment --comment acme-alpn-proxy -j DROP
-A PREROUTING -j MARK --set-xmark 0x1/0xffffffff
-A PREROUTING ! -i lo -p tcp -m tcp --dport 8443 --tcp-flags FIN,SYN,RST,ACK SYN -m comment --comment acme-alpn-proxy -j TPROXY --on-port 30000 --on-ip 0.0.0.0 --tproxy-mark 0x0/0x0`
)

func seedHost(f *fakeIPTables) {
	for _, bin := range []string{"iptables", "ip6tables"} {
		f.seed(bin, "nat", dockerNAT)
		f.seed(bin, "filter", hostInput)
	}
}

func TestInstallRedirectPutsOursFirstAndLeavesForeignRules(t *testing.T) {
	fake := newFake()
	seedHost(fake)
	b := newTestBackend(t, fake, "")
	if err := b.Install(mustBuild(t, intercept.Redirect, 443, 21443, intercept.IPv4, intercept.IPv6)); err != nil {
		t.Fatal(err)
	}
	for _, bin := range []string{"iptables", "ip6tables"} {
		nat := fake.chain(bin, "nat", "PREROUTING")
		want := []string{
			"-A PREROUTING -p tcp --dport 443 --syn -m addrtype --dst-type LOCAL -m comment --comment acme-alpn-proxy -j REDIRECT --to-ports 21443",
			"-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER",
		}
		if !reflect.DeepEqual(nat, want) {
			t.Errorf("%s nat PREROUTING:\n%q\nwant\n%q", bin, nat, want)
		}
		input := fake.chain(bin, "filter", "INPUT")
		if len(input) != 4 || !strings.Contains(input[0], "--dport 21443") || !strings.Contains(input[0], "-j DROP") {
			t.Errorf("%s filter INPUT: guard not first: %q", bin, input)
		}
		if got := fake.chain(bin, "nat", "DOCKER"); len(got) != 1 {
			t.Errorf("%s Docker's chain changed: %q", bin, got)
		}
	}
}

func TestInstallRemovesStaleCopiesFromOtherModesAndPorts(t *testing.T) {
	fake := newFake()
	seedHost(fake)
	fake.seed("iptables", "mangle", staleMangle)
	fake.seed("ip6tables", "mangle", staleMangle) // IPv6 not asked for now: still cleaned
	fake.seed("iptables", "nat", "-A PREROUTING -p tcp --dport 443 --syn -m comment --comment acme-alpn-proxy -j REDIRECT --to-ports 1111")
	for _, bin := range []string{"iptables", "ip6tables"} {
		fake.seed(bin, "nat", staleNAT)
	}
	b := newTestBackend(t, fake, "")
	if err := b.Install(mustBuild(t, intercept.Redirect, 443, 21443, intercept.IPv4)); err != nil {
		t.Fatal(err)
	}
	for _, bin := range []string{"iptables", "ip6tables"} {
		if got := fake.chain(bin, "mangle", "PREROUTING"); !reflect.DeepEqual(got, []string{"-A PREROUTING -j MARK --set-xmark 0x1/0xffffffff"}) {
			t.Errorf("%s mangle: %q, want only the foreign MARK rule", bin, got)
		}
		if got := fake.chain(bin, "nat", "PREROUTING"); strings.Contains(strings.Join(got, "\n"), "-j ACCEPT") {
			t.Errorf("%s: stale tproxy-mode nat ACCEPT survived: %q", bin, got)
		}
	}
	if n := fake.ours(); n != 2 {
		t.Errorf("%d rules of ours after install, want 2 (redirect and guard, IPv4)", n)
	}
	if got := fake.chain("iptables", "nat", "PREROUTING"); strings.Contains(strings.Join(got, "\n"), "1111") {
		t.Errorf("stale redirect to :1111 survived: %q", got)
	}
}

func TestInstallTwiceKeepsOneCopy(t *testing.T) {
	fake := newFake()
	seedHost(fake)
	b := newTestBackend(t, fake, "")
	rs := mustBuild(t, intercept.TProxy, 443, 21443, intercept.IPv4, intercept.IPv6)
	for i := 0; i < 2; i++ {
		if err := b.Install(rs); err != nil {
			t.Fatal(err)
		}
	}
	if n := fake.ours(); n != 6 {
		t.Errorf("%d rules of ours, want 6 (guard, tproxy, nat ACCEPT per family)", n)
	}
	for _, bin := range []string{"iptables", "ip6tables"} {
		got := fake.chain(bin, "mangle", "PREROUTING")
		if len(got) != 2 || !strings.HasSuffix(got[0], "-j DROP") || !strings.Contains(got[1], "-j TPROXY") {
			t.Errorf("%s mangle order: %q, want guard then tproxy", bin, got)
		}
		// Ahead of Docker's jump to its DNAT chain.
		nat := fake.chain(bin, "nat", "PREROUTING")
		want := []string{
			"-A PREROUTING ! -i lo -p tcp --dport 443 --syn -m addrtype --dst-type LOCAL -m comment --comment acme-alpn-proxy -j ACCEPT",
			"-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER",
		}
		if !reflect.DeepEqual(nat, want) {
			t.Errorf("%s nat PREROUTING:\n%q\nwant\n%q", bin, nat, want)
		}
	}
}

func TestRemoveInterceptKeepsGuardsThenRemoveLeavesOnlyForeign(t *testing.T) {
	for _, mode := range []intercept.Mode{intercept.Redirect, intercept.TProxy} {
		t.Run(string(mode), func(t *testing.T) {
			fake := newFake()
			seedHost(fake)
			b := newTestBackend(t, fake, "")
			if err := b.Install(mustBuild(t, mode, 443, 21443, intercept.IPv4, intercept.IPv6)); err != nil {
				t.Fatal(err)
			}
			if err := b.RemoveIntercept(); err != nil {
				t.Fatal(err)
			}
			st, err := b.Inspect()
			if err != nil {
				t.Fatal(err)
			}
			if st.Intercepting() || len(st.Rules) != 2 {
				t.Errorf("after RemoveIntercept: %+v, want the two guards only", st.Rules)
			}
			for _, bin := range []string{"iptables", "ip6tables"} {
				if got := fake.chain(bin, "nat", "PREROUTING"); !reflect.DeepEqual(got, []string{"-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER"}) {
					t.Errorf("%s nat PREROUTING after RemoveIntercept: %q, want only Docker's jump", bin, got)
				}
			}
			for _, r := range st.Rules {
				if r.Role != intercept.RoleGuard {
					t.Errorf("left %v rule %s", r.Role, r.Rule)
				}
			}
			// A separate instance (`stop` with no proxy running) cleans up.
			if err := newTestBackend(t, fake, "").Remove(); err != nil {
				t.Fatal(err)
			}
			if n := fake.ours(); n != 0 {
				t.Errorf("%d rules of ours after Remove", n)
			}
			if got := fake.chain("iptables", "filter", "INPUT"); len(got) != 3 {
				t.Errorf("foreign INPUT rules changed: %q", got)
			}
		})
	}
}

func TestRollbackWhenIP6TablesFails(t *testing.T) {
	fake := newFake()
	seedHost(fake)
	fake.fail = func(argv []string) (string, int, bool) {
		if argv[0] == "ip6tables" && hasArg(argv, "-I") && hasArg(argv, "TPROXY") {
			return "ip6tables v1.8.9 (nf_tables): Couldn't load target `TPROXY':No such file or directory\n\nTry `ip6tables -h' or 'ip6tables --help' for more information.\n", 2, true
		}
		return "", 0, false
	}
	b := newTestBackend(t, fake, "")
	err := b.Install(mustBuild(t, intercept.TProxy, 443, 21443, intercept.IPv4, intercept.IPv6))
	if !errors.Is(err, ErrUnsupported) {
		t.Fatalf("err = %v, want ErrUnsupported", err)
	}
	for _, want := range []string{"TPROXY target is unavailable", "xt_TPROXY", "-mode redirect"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
	if strings.Contains(err.Error(), "\n") || strings.Contains(err.Error(), "Try `") {
		t.Errorf("error is not one clean line: %q", err)
	}
	if n := fake.ours(); n != 0 {
		t.Errorf("%d rules of ours left after the failed install (IPv4 not rolled back)", n)
	}
	if got := fake.chain("iptables", "filter", "INPUT"); len(got) != 3 {
		t.Errorf("rollback touched foreign rules: %q", got)
	}
}

func hasArg(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

func TestErrorsNameCauseAndFix(t *testing.T) {
	rs := mustBuild(t, intercept.Redirect, 443, 21443, intercept.IPv4)
	for _, tc := range []struct {
		name   string
		stderr string
		code   int
		kind   error
		hint   string
	}{
		{"nft permission", "iptables v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)\n", 4, ErrPermission, "run as root"},
		{"legacy lock file", "Fatal: can't open lock file /run/xtables.lock: Permission denied\n", 4, ErrPermission, "run as root"},
		{"lock held", "Another app is currently holding the xtables lock. Stopped waiting after 30s.\n", 4, ErrLocked, "retry"},
		{"no comment match", "iptables v1.8.9 (legacy): Couldn't load match `comment':No such file or directory\n\nTry `iptables -h' or 'iptables --help' for more information.\n", 2, ErrUnsupported, "xt_comment"},
		{"no nat table", "iptables v1.8.9 (legacy): can't initialize iptables table `nat': Table does not exist (do you need to insmod?)\nPerhaps iptables or your kernel needs to be upgraded.\n", 3, ErrUnsupported, "iptable_nat"},
		{"kernel lacks extension", "iptables: No chain/target/match by that name.\n", 1, ErrUnsupported, "xt_REDIRECT"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fake := newFake()
			fake.fail = func(argv []string) (string, int, bool) {
				// Listing works; only changes fail, except for the table
				// and permission cases where everything fails.
				if hasArg(argv, "-S") && tc.kind != ErrPermission && tc.kind != ErrLocked {
					return "", 0, false
				}
				return tc.stderr, tc.code, true
			}
			err := newTestBackend(t, fake, "").Install(rs)
			if !errors.Is(err, tc.kind) {
				t.Fatalf("err = %v, want %v", err, tc.kind)
			}
			if !strings.Contains(err.Error(), tc.hint) || strings.Contains(err.Error(), "\n") {
				t.Errorf("error %q: want one line containing %q", err, tc.hint)
			}
		})
	}
}

func TestMissingBinaryIsNamed(t *testing.T) {
	// The real exec path: a binary that is not in PATH.
	b, err := New(Options{IPTables: "iptables-not-installed-here", Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	err = b.Install(mustBuild(t, intercept.Redirect, 443, 21443, intercept.IPv4))
	if !errors.Is(err, ErrNotFound) || !errors.Is(err, exec.ErrNotFound) {
		t.Fatalf("err = %v, want ErrNotFound", err)
	}
	if !strings.Contains(err.Error(), "iptables-not-installed-here is not installed") || !strings.Contains(err.Error(), "-backend nft") {
		t.Errorf("error %q does not name the binary and the alternative", err)
	}
}

func TestUnavailableIPv6TableCountsAsClean(t *testing.T) {
	for _, spec := range []string{"", "-p tcp --dport 443 -j REDIRECT --to-ports 21443"} {
		testUnavailableIPv6(t, spec)
	}
}

func testUnavailableIPv6(t *testing.T, spec string) {
	fake := newFake()
	fake.seed("iptables", "nat", "-A PREROUTING -p tcp --dport 443 -m comment --comment acme-alpn-proxy -j REDIRECT --to-ports 21443")
	fake.fail = func(argv []string) (string, int, bool) {
		if argv[0] == "ip6tables" {
			return "ip6tables v1.8.9 (legacy): can't initialize ip6tables table `" + argv[4] + "': Address family not supported by protocol\n", 3, true
		}
		return "", 0, false
	}
	b := newTestBackend(t, fake, spec)
	if err := b.Install(mustBuild(t, intercept.Redirect, 443, 21443, intercept.IPv4)); err != nil {
		t.Fatalf("IPv4-only install on a host without IPv6: %v", err)
	}
	if err := b.Remove(); err != nil {
		t.Fatalf("Remove on a host without IPv6 (rule spec %q): %v", spec, err)
	}
	if n := fake.ours(); n != 0 {
		t.Errorf("%d rules of ours left", n)
	}
}

func TestRuleSpecWithoutOurCommentIsFoundAndRemoved(t *testing.T) {
	const spec = "-p tcp --dport 443 -j REDIRECT --to-ports 21443"
	fake := newFake()
	// Two copies left by the old shell script.
	fake.seed("iptables", "nat", "-A PREROUTING "+spec+"\n-A PREROUTING "+spec)
	b := newTestBackend(t, fake, spec)
	if err := b.Install(mustBuild(t, intercept.Redirect, 443, 21443, intercept.IPv4, intercept.IPv6)); err != nil {
		t.Fatal(err)
	}
	for _, bin := range []string{"iptables", "ip6tables"} {
		if got := fake.chain(bin, "nat", "PREROUTING"); !reflect.DeepEqual(got, []string{"-A PREROUTING " + spec}) {
			t.Errorf("%s nat after install: %q, want exactly one spec rule", bin, got)
		}
	}
	st, err := b.Inspect()
	if err != nil {
		t.Fatal(err)
	}
	if !st.Intercepting() || len(st.Rules) != 4 {
		t.Errorf("Inspect: %+v, want spec rule and guard per family", st.Rules)
	}
	if err := b.RemoveIntercept(); err != nil {
		t.Fatal(err)
	}
	if got := fake.chain("iptables", "nat", "PREROUTING"); len(got) != 0 {
		t.Errorf("spec rule survived RemoveIntercept: %q", got)
	}
	if n := fake.ours(); n != 2 {
		t.Errorf("%d rules of ours after RemoveIntercept, want the 2 guards", n)
	}
}

func TestRemoveFailsLoudlyWhenDeleteDoesNotTakeEffect(t *testing.T) {
	fake := newFake()
	fake.seed("iptables", "filter", "-A INPUT -p tcp --dport 21443 -m comment --comment acme-alpn-proxy -j DROP")
	// A -D that iptables answers as "no such rule" although -S shows it.
	fake.fail = func(argv []string) (string, int, bool) {
		if hasArg(argv, "-D") {
			return "iptables: Bad rule (does a matching rule exist in that chain?).\n", 1, true
		}
		return "", 0, false
	}
	err := newTestBackend(t, fake, "").Remove()
	if err == nil || !strings.Contains(err.Error(), "still present") {
		t.Fatalf("err = %v, want a report of the rule still present", err)
	}
}

func TestTProxySupportedProbe(t *testing.T) {
	fake := newFake()
	b := newTestBackend(t, fake, "")
	if !b.TProxySupported(intercept.IPv4, intercept.IPv6) {
		t.Fatal("TPROXY reported unsupported although inserting works")
	}
	if n := fake.ours(); n != 0 {
		t.Errorf("probe left %d rules", n)
	}
	fake.fail = func(argv []string) (string, int, bool) {
		if argv[0] == "ip6tables" && hasArg(argv, "TPROXY") {
			return "ip6tables: No chain/target/match by that name.\n", 1, true
		}
		return "", 0, false
	}
	if !b.TProxySupported() {
		t.Error("IPv4 probe failed although only ip6tables lacks TPROXY")
	}
	if b.TProxySupported(intercept.IPv4, intercept.IPv6) {
		t.Error("TPROXY reported supported although ip6tables lacks it")
	}
}

func TestInspectAndVariant(t *testing.T) {
	fake := newFake()
	fake.variant = "legacy"
	seedHost(fake)
	b := newTestBackend(t, fake, "")
	st, err := b.Inspect()
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Rules) != 0 || st.Intercepting() {
		t.Errorf("foreign rules reported as ours: %+v", st.Rules)
	}
	if st.Variants[intercept.IPv4] != "legacy" || st.Variants[intercept.IPv6] != "legacy" {
		t.Errorf("variants %v", st.Variants)
	}
	if err := b.Install(mustBuild(t, intercept.Redirect, 443, 21443, intercept.IPv4)); err != nil {
		t.Fatal(err)
	}
	st, err = b.Inspect()
	if err != nil {
		t.Fatal(err)
	}
	want := []Present{
		{intercept.IPv4, "nat", "PREROUTING", intercept.RoleIntercept, "-A PREROUTING -p tcp --dport 443 --syn -m addrtype --dst-type LOCAL -m comment --comment acme-alpn-proxy -j REDIRECT --to-ports 21443"},
		{intercept.IPv4, "filter", "INPUT", intercept.RoleGuard, "-A INPUT ! -i lo -p tcp --dport 21443 -m addrtype --dst-type LOCAL -m conntrack ! --ctstate DNAT -m comment --comment acme-alpn-proxy -j DROP"},
	}
	if !reflect.DeepEqual(st.Rules, want) {
		t.Errorf("Inspect:\n%+v\nwant\n%+v", st.Rules, want)
	}

	if err := b.Install(mustBuild(t, intercept.TProxy, 443, 21443, intercept.IPv6)); err != nil {
		t.Fatal(err)
	}
	st, err = b.Inspect()
	if err != nil {
		t.Fatal(err)
	}
	want = []Present{
		{intercept.IPv6, "nat", "PREROUTING", intercept.RoleIntercept, "-A PREROUTING ! -i lo -p tcp --dport 443 --syn -m addrtype --dst-type LOCAL -m comment --comment acme-alpn-proxy -j ACCEPT"},
		{intercept.IPv6, "mangle", "PREROUTING", intercept.RoleGuard, "-A PREROUTING ! -i lo -p tcp --dport 21443 -m addrtype --dst-type LOCAL -m comment --comment acme-alpn-proxy -j DROP"},
		{intercept.IPv6, "mangle", "PREROUTING", intercept.RoleIntercept, "-A PREROUTING ! -i lo -p tcp --dport 443 --syn -m addrtype --dst-type LOCAL -m comment --comment acme-alpn-proxy -j TPROXY --on-port 21443"},
	}
	if !reflect.DeepEqual(st.Rules, want) || !st.Intercepting() {
		t.Errorf("Inspect in tproxy mode:\n%+v\nwant\n%+v", st.Rules, want)
	}
}

func TestParseVariant(t *testing.T) {
	for out, want := range map[string]string{
		"iptables v1.8.9 (nf_tables)\n": "nf_tables",
		"ip6tables v1.8.7 (legacy)\n":   "legacy",
		"iptables v1.6.1\n":             "legacy",
	} {
		if got, err := parseVariant(out); err != nil || got != want {
			t.Errorf("parseVariant(%q) = %q, %v; want %q", out, got, err, want)
		}
	}
	if _, err := parseVariant("BusyBox v1.36"); err == nil {
		t.Error("unrelated version output accepted")
	}
}

func TestExecRunnerBoundsOutput(t *testing.T) {
	if _, err := exec.LookPath("head"); err != nil {
		t.Skip("no head binary")
	}
	const max = 1 << 16
	r := ExecRunner{MaxOutput: max}
	out, _, err := r.Run(t.Context(), []string{"head", "-c", fmt.Sprint(4 * max), "/dev/zero"})
	if err == nil || len(out) != max {
		t.Errorf("got %d bytes, err %v; want %d bytes and an error", len(out), err, max)
	}
	out, _, err = r.Run(t.Context(), []string{"head", "-c", fmt.Sprint(max), "/dev/zero"})
	if err != nil || len(out) != max {
		t.Errorf("output of exactly the limit: %d bytes, err %v", len(out), err)
	}
}

// A guardian's Remove (Options.Instance) deletes its dead proxy's rules and
// leaves a newer instance's; a new Install replaces every instance's.
func TestRemoveOnlyTheInstancesRules(t *testing.T) {
	fake := newFake()
	newer := mustBuild(t, intercept.TProxy, 443, 21443, intercept.IPv4, intercept.IPv6)
	newer.Instance = "bbbb"
	old := mustBuild(t, intercept.Redirect, 443, 21443, intercept.IPv4)
	old.Instance = "aaaa"
	if err := newTestBackend(t, fake, "").Install(newer); err != nil {
		t.Fatal(err)
	}
	want := fake.ours()
	// Rules of the dead instance, as if they had survived its Install.
	fake.seed("iptables", "nat", "-A PREROUTING -p tcp -m tcp --dport 443 --tcp-flags FIN,SYN,RST,ACK SYN -m addrtype --dst-type LOCAL -m comment --comment acme-alpn-proxy-aaaa -j REDIRECT --to-ports 21443")
	guardian, err := New(Options{Runner: fake, Instance: "aaaa", Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	if err := guardian.Remove(); err != nil {
		t.Fatal(err)
	}
	if n := fake.ours(); n != want {
		t.Errorf("after the old instance's Remove: %d rules of ours, want the newer instance's %d", n, want)
	}
	for _, r := range fake.chain("iptables", "nat", "PREROUTING") {
		if strings.Contains(r, "acme-alpn-proxy-aaaa") {
			t.Errorf("old instance's rule left: %s", r)
		}
	}
	if err := newTestBackend(t, fake, "").Install(old); err != nil {
		t.Fatal(err)
	}
	for _, bin := range []string{"iptables", "ip6tables"} {
		for _, table := range []string{"nat", "mangle"} {
			for _, r := range fake.chain(bin, table, "PREROUTING") {
				if strings.Contains(r, "acme-alpn-proxy-bbbb") {
					t.Errorf("Install left another instance's rule: %s", r)
				}
			}
		}
	}
}

// RemoveRuleSet deletes what rs renders and nothing else; rules already
// gone are fine.
func TestRemoveRuleSet(t *testing.T) {
	for _, mode := range []intercept.Mode{intercept.TProxy, intercept.Redirect} {
		fake := newFake()
		other := mustBuild(t, mode, 443, 21443, intercept.IPv4)
		other.Instance = "bbbb"
		mine := mustBuild(t, mode, 443, 21443, intercept.IPv4, intercept.IPv6)
		mine.Instance = "aaaa"
		b := newTestBackend(t, fake, "")
		if err := b.Install(other); err != nil {
			t.Fatal(err)
		}
		want := fake.ours()
		// Both sets at once, as no Install would leave them.
		steps, err := render(mine, "", DefaultBinaries)
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range steps {
			if _, _, err := fake.Run(context.Background(), s.Insert); err != nil {
				t.Fatal(err)
			}
		}
		if err := b.RemoveRuleSet(mine); err != nil {
			t.Fatalf("%s: %v", mode, err)
		}
		if n := fake.ours(); n != want {
			t.Errorf("%s: %d rules of ours left, want the other instance's %d", mode, n, want)
		}
		if err := b.RemoveRuleSet(mine); err != nil {
			t.Errorf("%s: second RemoveRuleSet: %v", mode, err)
		}
	}
}

package compat

import (
	"reflect"
	"strings"
	"testing"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/intercept"
)

func mustBuild(t testing.TB, mode intercept.Mode, port, listen uint16, fams ...intercept.Family) intercept.RuleSet {
	t.Helper()
	rs, err := intercept.Build(intercept.Config{Mode: mode, Port: port, ListenPort: listen, Families: fams})
	if err != nil {
		t.Fatal(err)
	}
	return rs
}

func argv(s string) []string { return strings.Fields(s) }

func TestArgsRedirectBothFamilies(t *testing.T) {
	rs := mustBuild(t, intercept.Redirect, 443, 21443, intercept.IPv4, intercept.IPv6)
	install, remove, err := Args(rs, "")
	if err != nil {
		t.Fatal(err)
	}
	const (
		nat   = "-p tcp --dport 443 --syn -m addrtype --dst-type LOCAL -m comment --comment acme-alpn-proxy -j REDIRECT --to-ports 21443"
		guard = "! -i lo -p tcp --dport 21443 -m addrtype --dst-type LOCAL -m conntrack ! --ctstate DNAT -m comment --comment acme-alpn-proxy -j DROP"
	)
	wantInstall := [][]string{
		argv("iptables -w 30 -t nat -I PREROUTING 1 " + nat),
		argv("iptables -w 30 -t filter -I INPUT 1 " + guard),
		argv("ip6tables -w 30 -t nat -I PREROUTING 1 " + nat),
		argv("ip6tables -w 30 -t filter -I INPUT 1 " + guard),
	}
	wantRemove := [][]string{
		argv("ip6tables -w 30 -t filter -D INPUT " + guard),
		argv("ip6tables -w 30 -t nat -D PREROUTING " + nat),
		argv("iptables -w 30 -t filter -D INPUT " + guard),
		argv("iptables -w 30 -t nat -D PREROUTING " + nat),
	}
	if !reflect.DeepEqual(install, wantInstall) {
		t.Errorf("install:\n%q\nwant\n%q", install, wantInstall)
	}
	if !reflect.DeepEqual(remove, wantRemove) {
		t.Errorf("remove:\n%q\nwant\n%q", remove, wantRemove)
	}
}

func TestArgsTProxyIPv4OnlyKeepsGuardFirst(t *testing.T) {
	rs := mustBuild(t, intercept.TProxy, 8443, 30000, intercept.IPv4)
	install, remove, err := Args(rs, "")
	if err != nil {
		t.Fatal(err)
	}
	const (
		guard = "! -i lo -p tcp --dport 30000 -m addrtype --dst-type LOCAL -m comment --comment acme-alpn-proxy -j DROP"
		tp    = "! -i lo -p tcp --dport 8443 --syn -m addrtype --dst-type LOCAL -m comment --comment acme-alpn-proxy -j TPROXY --on-port 30000"
		// ACCEPT at the head of nat PREROUTING: the same SYNs get a null
		// NAT binding before Docker's DNAT further down can take them.
		claim = "! -i lo -p tcp --dport 8443 --syn -m addrtype --dst-type LOCAL -m comment --comment acme-alpn-proxy -j ACCEPT"
	)
	wantInstall := [][]string{
		argv("iptables -w 30 -t mangle -I PREROUTING 1 " + guard),
		argv("iptables -w 30 -t mangle -I PREROUTING 2 " + tp),
		argv("iptables -w 30 -t nat -I PREROUTING 1 " + claim),
	}
	wantRemove := [][]string{
		argv("iptables -w 30 -t nat -D PREROUTING " + claim),
		argv("iptables -w 30 -t mangle -D PREROUTING " + tp),
		argv("iptables -w 30 -t mangle -D PREROUTING " + guard),
	}
	if !reflect.DeepEqual(install, wantInstall) {
		t.Errorf("install:\n%q\nwant\n%q", install, wantInstall)
	}
	if !reflect.DeepEqual(remove, wantRemove) {
		t.Errorf("remove:\n%q\nwant\n%q", remove, wantRemove)
	}
}

func TestArgsTProxyBothFamilies(t *testing.T) {
	rs := mustBuild(t, intercept.TProxy, 443, 21443, intercept.IPv4, intercept.IPv6)
	install, remove, err := Args(rs, "")
	if err != nil {
		t.Fatal(err)
	}
	const (
		guard = "! -i lo -p tcp --dport 21443 -m addrtype --dst-type LOCAL -m comment --comment acme-alpn-proxy -j DROP"
		tp    = "! -i lo -p tcp --dport 443 --syn -m addrtype --dst-type LOCAL -m comment --comment acme-alpn-proxy -j TPROXY --on-port 21443"
		claim = "! -i lo -p tcp --dport 443 --syn -m addrtype --dst-type LOCAL -m comment --comment acme-alpn-proxy -j ACCEPT"
	)
	var wantInstall, wantRemove [][]string
	for _, bin := range []string{"iptables", "ip6tables"} {
		wantInstall = append(wantInstall,
			argv(bin+" -w 30 -t mangle -I PREROUTING 1 "+guard),
			argv(bin+" -w 30 -t mangle -I PREROUTING 2 "+tp),
			argv(bin+" -w 30 -t nat -I PREROUTING 1 "+claim),
		)
	}
	for _, bin := range []string{"ip6tables", "iptables"} {
		wantRemove = append(wantRemove,
			argv(bin+" -w 30 -t nat -D PREROUTING "+claim),
			argv(bin+" -w 30 -t mangle -D PREROUTING "+tp),
			argv(bin+" -w 30 -t mangle -D PREROUTING "+guard),
		)
	}
	if !reflect.DeepEqual(install, wantInstall) {
		t.Errorf("install:\n%q\nwant\n%q", install, wantInstall)
	}
	if !reflect.DeepEqual(remove, wantRemove) {
		t.Errorf("remove:\n%q\nwant\n%q", remove, wantRemove)
	}
}

func TestArgsClaimNATOnlyInNATTable(t *testing.T) {
	rs := mustBuild(t, intercept.TProxy, 443, 21443, intercept.IPv4)
	rs.Tables[0].Chains[1].Type = intercept.ChainFilter // would be mangle: ACCEPT there binds no NAT
	if _, _, err := Args(rs, ""); err == nil || !strings.Contains(err.Error(), "nat table") {
		t.Errorf("identity DNAT outside the nat table: err = %v", err)
	}
}

func TestArgsRuleSpecReplacesRedirectRuleInBothFamilies(t *testing.T) {
	rs := mustBuild(t, intercept.Redirect, 443, 21443, intercept.IPv4, intercept.IPv6)
	spec := "  -p tcp\t--dport 443 -d 198.18.0.1\n-j REDIRECT --to-ports 21443 "
	install, remove, err := Args(rs, spec)
	if err != nil {
		t.Fatal(err)
	}
	const custom = "-p tcp --dport 443 -d 198.18.0.1 -j REDIRECT --to-ports 21443"
	if want := argv("iptables -w 30 -t nat -I PREROUTING 1 " + custom); !reflect.DeepEqual(install[0], want) {
		t.Errorf("v4 install %q, want %q", install[0], want)
	}
	if want := argv("ip6tables -w 30 -t nat -I PREROUTING 1 " + custom); !reflect.DeepEqual(install[2], want) {
		t.Errorf("v6 install %q, want %q", install[2], want)
	}
	if want := argv("iptables -w 30 -t nat -D PREROUTING " + custom); !reflect.DeepEqual(remove[3], want) {
		t.Errorf("v4 remove %q, want %q", remove[3], want)
	}
	// The guard is still ours and rendered normally.
	if !strings.Contains(strings.Join(install[1], " "), "-t filter -I INPUT 1 ! -i lo -p tcp --dport 21443") {
		t.Errorf("guard changed by the rule spec: %q", install[1])
	}
}

func TestArgsRuleSpecRejected(t *testing.T) {
	tp := mustBuild(t, intercept.TProxy, 443, 21443, intercept.IPv4)
	if _, _, err := Args(tp, "-p tcp --dport 443 -j REDIRECT --to-ports 21443"); err == nil || !strings.Contains(err.Error(), "-mode redirect") {
		t.Errorf("rule spec in tproxy mode: err = %v, want a pointer to -mode redirect", err)
	}
	rd := mustBuild(t, intercept.Redirect, 443, 21443, intercept.IPv4)
	if _, _, err := Args(rd, " \t\n"); err == nil {
		t.Error("blank rule spec accepted")
	}
	if _, _, err := Args(rd, strings.Repeat("-p tcp ", 1000)); err == nil {
		t.Error("oversized rule spec accepted")
	}
}

func TestArgsRejectsUnmappableRuleSet(t *testing.T) {
	rs := mustBuild(t, intercept.Redirect, 443, 21443, intercept.IPv4)
	rs.Tables[0].Chains[0].Hook = intercept.HookInput // nat input: not something we render
	if _, _, err := Args(rs, ""); err == nil {
		t.Error("nat/input chain rendered")
	}
	if _, _, err := Args(intercept.RuleSet{Mode: intercept.Redirect}, ""); err == nil {
		t.Error("empty rule set rendered")
	}
}

// Realistic `iptables -t nat -S PREROUTING` on a Docker host with leftovers
// of ours from two earlier runs, and foreign rules whose comments merely
// mention our name.
const dockerNATPrerouting = `-P PREROUTING ACCEPT
-A PREROUTING -p tcp -m tcp --dport 443 --tcp-flags FIN,SYN,RST,ACK SYN -m comment --comment acme-alpn-proxy -j REDIRECT --to-ports 21443
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A PREROUTING -p tcp -m tcp --dport 443 -m comment --comment "acme-alpn-proxy old \"v1\"" -j REDIRECT --to-ports 8443
-A PREROUTING -p tcp -m tcp --dport 443 -m comment --comment acme-alpn-proxy-legacy -j REDIRECT --to-ports 8443
-A PREROUTING -p tcp -m tcp --dport 80 -m comment --comment acme-alpn-proxy -j REDIRECT --to-ports 9999
-A DOCKER -p tcp -m tcp --dport 443 -m comment --comment acme-alpn-proxy -j DNAT --to-destination 172.17.0.2:443
-A DOCKER ! -i docker0 -p tcp -m tcp --dport 8443 -j DNAT --to-destination 172.17.0.2:443
# Warning: iptables-legacy tables present, use iptables-legacy to see them
`

func TestParseOwnRulesOnlyOurComment(t *testing.T) {
	got := parseOwnRules(location{"nat", "PREROUTING"}, dockerNATPrerouting)
	want := []string{
		"-A PREROUTING -p tcp -m tcp --dport 443 --tcp-flags FIN,SYN,RST,ACK SYN -m comment --comment acme-alpn-proxy -j REDIRECT --to-ports 21443",
		"-A PREROUTING -p tcp -m tcp --dport 80 -m comment --comment acme-alpn-proxy -j REDIRECT --to-ports 9999",
	}
	var lines []string
	for _, r := range got {
		lines = append(lines, r.Line)
		if r.Role != intercept.RoleIntercept {
			t.Errorf("%s: role %v, want intercept", r.Line, r.Role)
		}
	}
	if !reflect.DeepEqual(lines, want) {
		t.Fatalf("found\n%q\nwant\n%q", lines, want)
	}
	del := got[0].deleteArgv("iptables-nft")
	wantDel := argv("iptables-nft -w 30 -t nat -D PREROUTING -p tcp -m tcp --dport 443 --tcp-flags FIN,SYN,RST,ACK SYN -m comment --comment acme-alpn-proxy -j REDIRECT --to-ports 21443")
	if !reflect.DeepEqual(del, wantDel) {
		t.Errorf("delete argv %q, want %q", del, wantDel)
	}
}

func TestParseOwnRulesClaimNATIsIntercept(t *testing.T) {
	// As iptables-legacy and iptables-nft 1.8.9 print our tproxy-mode nat
	// rule, after Docker's PREROUTING jump was inserted above it.
	out := `-P PREROUTING ACCEPT
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A PREROUTING ! -i lo -p tcp -m tcp --dport 443 --tcp-flags FIN,SYN,RST,ACK SYN -m addrtype --dst-type LOCAL -m comment --comment acme-alpn-proxy -j ACCEPT
`
	got := parseOwnRules(location{"nat", "PREROUTING"}, out)
	if len(got) != 1 || got[0].Role != intercept.RoleIntercept {
		t.Fatalf("got %+v, want one intercept rule (removed with the TPROXY rule at drain)", got)
	}
}

func TestParseOwnRulesGuardRole(t *testing.T) {
	out := `-P INPUT DROP
-A INPUT -i lo -j ACCEPT
-A INPUT ! -i lo -p tcp -m tcp --dport 21443 -m conntrack ! --ctstate DNAT -m comment --comment acme-alpn-proxy -j DROP
-A INPUT -p tcp -m tcp --dport 443 -j ACCEPT
`
	got := parseOwnRules(location{"filter", "INPUT"}, out)
	if len(got) != 1 || got[0].Role != intercept.RoleGuard {
		t.Fatalf("got %+v, want one guard", got)
	}
}

func TestSplitSaved(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want []string
	}{
		{`-A INPUT -j DROP`, []string{"-A", "INPUT", "-j", "DROP"}},
		{`-A X  -m comment --comment "a b"  -j ACCEPT`, []string{"-A", "X", "-m", "comment", "--comment", "a b", "-j", "ACCEPT"}},
		{`--comment "q\"x\'y\\z"`, []string{"--comment", `q"x'y\z`}},
		{`--comment ""`, []string{"--comment", ""}},
	} {
		got, err := splitSaved(tc.in)
		if err != nil || !reflect.DeepEqual(got, tc.want) {
			t.Errorf("splitSaved(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
	}
	for _, bad := range []string{`--comment "open`, `--comment "x\`} {
		if _, err := splitSaved(bad); err == nil {
			t.Errorf("splitSaved(%q) accepted", bad)
		}
	}
}

// FuzzParseOwnRules: any listing must parse without panicking, and every
// rule reported as ours must carry our comment as its own token.
func FuzzParseOwnRules(f *testing.F) {
	f.Add(dockerNATPrerouting)
	f.Add("-A PREROUTING --comment \"acme-alpn-proxy\\")
	f.Add("-A PREROUTING \"")
	f.Fuzz(func(t *testing.T, out string) {
		for _, r := range parseOwnRules(location{"nat", "PREROUTING"}, out) {
			if !hasOurComment(r.Tokens) {
				t.Fatalf("%q reported as ours", r.Line)
			}
		}
	})
}

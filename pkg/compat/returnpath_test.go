package compat

import (
	"slices"
	"strings"
	"testing"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/intercept"
)

func returnRuleSet(t *testing.T, fams ...intercept.Family) intercept.RuleSet {
	t.Helper()
	rs, err := intercept.Build(intercept.Config{Mode: intercept.TProxy, Port: 443, ListenPort: 21443, Families: fams, ReturnMark: 0x1000})
	if err != nil {
		t.Fatal(err)
	}
	return rs
}

// The return path renders as mangle OUTPUT and PREROUTING rules that
// touch only our mark bit, the same as the nft chains.
func TestArgsReturnPath(t *testing.T) {
	install, remove, err := Args(returnRuleSet(t, intercept.IPv4), "")
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, a := range install {
		got = append(got, strings.Join(a, " "))
	}
	want := []string{
		"iptables -w 30 -t mangle -I OUTPUT 1 -m mark --mark 0x1000/0x1000 -m comment --comment acme-alpn-proxy -j CONNMARK --or-mark 0x1000",
		// Cleared only where a DNAT may need it gone (see intercept).
		"iptables -w 30 -t mangle -I OUTPUT 2 -m mark --mark 0x1000/0x1000 -m conntrack --ctstate NEW -m comment --comment acme-alpn-proxy -j MARK --and-mark 0xffffefff",
		"iptables -w 30 -t mangle -I OUTPUT 3 -m mark --mark 0x1000/0x1000 -m conntrack --ctstate DNAT -m comment --comment acme-alpn-proxy -j MARK --and-mark 0xffffefff",
		"iptables -w 30 -t mangle -I OUTPUT 4 -m conntrack --ctdir REPLY -m connmark --mark 0x1000/0x1000 -m comment --comment acme-alpn-proxy -j MARK --or-mark 0x1000",
		// Before the interception: the return path must be there first.
		"iptables -w 30 -t mangle -I PREROUTING 1 -m conntrack --ctdir REPLY -m connmark --mark 0x1000/0x1000 -m comment --comment acme-alpn-proxy -j MARK --or-mark 0x1000",
	}
	for _, w := range want {
		if !slices.Contains(got, w) {
			t.Errorf("install lacks\n\t%s\nin\n%s", w, strings.Join(got, "\n"))
		}
	}
	// Rule by rule, the return path goes in before anything intercepts.
	firstIntercept, lastReturn := len(got), -1
	for i, g := range got {
		if strings.Contains(g, "MARK") {
			lastReturn = i
		} else if strings.Contains(g, "TPROXY") || strings.Contains(g, "-j ACCEPT") {
			firstIntercept = min(firstIntercept, i)
		}
	}
	if lastReturn > firstIntercept {
		t.Errorf("a return rule comes after an intercept rule:\n%s", strings.Join(got, "\n"))
	}
	if len(install) != 3+5 || len(remove) != len(install) {
		t.Errorf("%d install and %d remove commands, want 8 each", len(install), len(remove))
	}
	for _, line := range []string{
		"-A OUTPUT -m mark --mark 0x1000/0x1000 -m comment --comment acme-alpn-proxy -j CONNMARK --or-mark 0x1000",
		"-A OUTPUT -m mark --mark 0x1000/0x1000 -m conntrack --ctstate DNAT -m comment --comment acme-alpn-proxy -j MARK --set-xmark 0x0/0x1000",
		"-A PREROUTING -m conntrack --ctdir REPLY -m connmark --mark 0x1000/0x1000 -m comment --comment acme-alpn-proxy -j MARK --set-xmark 0x1000/0x1000",
	} {
		loc := location{"mangle", strings.Fields(line)[1]}
		if rs := parseOwnRules(loc, line); len(rs) != 1 || rs[0].Role != intercept.RoleReturn {
			t.Errorf("%s: parsed %+v, want one return rule (kept until the drain ends)", line, rs)
		}
	}
}

func TestRootReturnPathWithRealBinaries(t *testing.T) {
	for _, v := range variants {
		t.Run(v.name, func(t *testing.T) {
			requireRoot(t, v.v4, v.v6)
			ns := newNetns(t)
			b := ns.backend(t, v, "")
			if err := b.Install(returnRuleSet(t, intercept.IPv4, intercept.IPv6)); err != nil {
				t.Fatal(err)
			}
			for _, bin := range []string{v.v4, v.v6} {
				out := ns.rules(t, bin, "mangle", "OUTPUT")
				if len(out) != 4 || !strings.Contains(out[0], "CONNMARK") || !strings.Contains(out[1], "--ctstate NEW") ||
					!strings.Contains(out[2], "--ctstate DNAT") || !strings.Contains(out[3], "--ctdir REPLY") {
					t.Errorf("%s mangle OUTPUT:\n%s", bin, strings.Join(out, "\n"))
				}
				if n := ourLines(ns.rules(t, bin, "mangle", "PREROUTING")); n != 3 {
					t.Errorf("%s: %d of our rules in mangle PREROUTING, want guard, tproxy and restore", bin, n)
				}
			}
			if err := b.RemoveIntercept(); err != nil {
				t.Fatal(err)
			}
			for _, bin := range []string{v.v4, v.v6} {
				if n := ourLines(ns.rules(t, bin, "mangle", "OUTPUT")); n != 4 {
					t.Errorf("%s: %d return rules after RemoveIntercept, want 4 (the drain needs them)", bin, n)
				}
			}
			if err := b.Remove(); err != nil {
				t.Fatal(err)
			}
			for _, bin := range []string{v.v4, v.v6} {
				if n := ourLines(ns.rules(t, bin, "mangle", "OUTPUT")) + ourLines(ns.rules(t, bin, "mangle", "PREROUTING")); n != 0 {
					t.Errorf("%s: %d rules left after Remove", bin, n)
				}
			}
		})
	}
}

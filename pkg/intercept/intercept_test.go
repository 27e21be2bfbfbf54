package intercept

import (
	"strings"
	"testing"
)

func TestBuildRedirect(t *testing.T) {
	rs, err := Build(Config{Mode: Redirect, Port: 443, ListenPort: 21443, Families: []Family{IPv4, IPv6, IPv4}})
	if err != nil {
		t.Fatal(err)
	}
	if len(rs.Tables) != 2 || rs.Tables[0].Family != IPv4 || rs.Tables[1].Family != IPv6 {
		t.Fatalf("tables = %+v, want ip and ip6 once each", rs.Tables)
	}
	nat := rs.Tables[0].Chains[0]
	if nat.Type != ChainNAT || nat.Hook != HookPrerouting || nat.Priority != -110 {
		t.Errorf("nat chain = %+v, want nat prerouting at dstnat - 10 (-110)", nat)
	}
	r := nat.Rules[0]
	if !r.SynOnly || !r.LocalOnly || r.Role != RoleIntercept || r.Action != ActionRedirect || r.ToPort != 21443 || r.DPort != 443 {
		t.Errorf("redirect rule = %+v", r)
	}
	guard := rs.Tables[0].Chains[1]
	if guard.Hook != HookInput || guard.Rules[0].Role != RoleGuard || !guard.Rules[0].NotDNAT || guard.Rules[0].DPort != 21443 {
		t.Errorf("guard = %+v: want an input chain whose rule drops non-redirected connections to the listener and uses conntrack", guard)
	}
	want := `fib daddr type local tcp dport 443 tcp flags & (fin|syn|rst|ack) == syn redirect to :21443`
	if !strings.HasPrefix(r.String(), want) {
		t.Errorf("rule text = %q, want prefix %q", r.String(), want)
	}
}

func TestBuildTProxy(t *testing.T) {
	rs, err := Build(Config{Mode: TProxy, Port: 8443, ListenPort: 9443, Families: []Family{IPv6}})
	if err != nil {
		t.Fatal(err)
	}
	c := rs.Tables[0].Chains[0]
	if c.Type != ChainFilter || c.Hook != HookPrerouting || c.Priority != -160 {
		t.Errorf("chain = %+v, want filter prerouting at mangle - 10 (-160)", c)
	}
	// The guard must come first: the tproxy rule is terminal.
	if c.Rules[0].Action != ActionDrop || c.Rules[0].DPort != 9443 || c.Rules[1].Action != ActionTProxy || c.Rules[1].DPort != 8443 {
		t.Errorf("rules = %+v", c.Rules)
	}
	for _, r := range append(c.Rules, rs.Tables[0].Chains[1].Rules...) {
		if !r.NotLoopback || !r.LocalOnly || r.NotDNAT {
			t.Errorf("rule %v: tproxy rules must skip loopback (our own dials), match local destinations only, and not use conntrack", r)
		}
	}
	claim := rs.Tables[0].Chains[1]
	if claim.Type != ChainNAT || claim.Priority != -110 || claim.Rules[0].Action != ActionClaimNAT ||
		claim.Rules[0].Role != RoleIntercept || !claim.Rules[0].SynOnly || claim.Rules[0].DPort != 8443 {
		t.Errorf("claim-nat chain = %+v: want an intercept-role identity DNAT of the same SYNs at dstnat - 10", claim)
	}
	if !strings.Contains(rs.String(), "table ip6 acme-alpn-proxy {") {
		t.Errorf("String() = %s", rs)
	}
}

func TestBuildTablesDoNotShareRules(t *testing.T) {
	rs, _ := Build(Config{Mode: TProxy, Port: 443, ListenPort: 21443, Families: []Family{IPv4, IPv6}})
	rs.Tables[0].Chains[0].Rules[0].DPort = 1
	if rs.Tables[1].Chains[0].Rules[0].DPort == 1 {
		t.Fatal("tables share a rules slice: editing one edits both")
	}
}

func TestBuildRejects(t *testing.T) {
	for name, cfg := range map[string]Config{
		"no families":  {Mode: Redirect, Port: 443, ListenPort: 21443},
		"same port":    {Mode: Redirect, Port: 443, ListenPort: 443, Families: []Family{IPv4}},
		"zero port":    {Mode: Redirect, ListenPort: 21443, Families: []Family{IPv4}},
		"unknown mode": {Mode: "dnat", Port: 443, ListenPort: 21443, Families: []Family{IPv4}},
		"unknown fam":  {Mode: Redirect, Port: 443, ListenPort: 21443, Families: []Family{5}},
		"instance id":  {Mode: Redirect, Port: 443, ListenPort: 21443, Families: []Family{IPv4}, Instance: "x y"},
	} {
		if _, err := Build(cfg); err == nil {
			t.Errorf("%s: Build accepted %+v", name, cfg)
		}
	}
	if _, err := ParseMode("nat"); err == nil {
		t.Error("ParseMode accepted nat")
	}
}

// Every rule of an instance carries its tag, and the tag reads back as the
// instance: a guardian tells a dead instance's rules from a newer one's.
func TestBuildTagsInstance(t *testing.T) {
	for _, mode := range []Mode{Redirect, TProxy} {
		rs, err := Build(Config{Mode: mode, Port: 443, ListenPort: 21443, Families: []Family{IPv4, IPv6}, Instance: "0a1b2c"})
		if err != nil {
			t.Fatal(err)
		}
		if rs.Instance != "0a1b2c" {
			t.Errorf("%s: RuleSet.Instance = %q", mode, rs.Instance)
		}
		for _, tb := range rs.Tables {
			for _, c := range tb.Chains {
				for _, r := range c.Rules {
					if !strings.HasPrefix(r.Comment, "acme-alpn-proxy-0a1b2c: ") {
						t.Errorf("%s %s: comment %q lacks the instance tag", mode, c.Name, r.Comment)
					}
					if id, ok := ParseTag(r.Comment); !ok || id != "0a1b2c" {
						t.Errorf("ParseTag(%q) = %q, %v", r.Comment, id, ok)
					}
				}
			}
		}
	}
	untagged, _ := Build(Config{Mode: Redirect, Port: 443, ListenPort: 21443, Families: []Family{IPv4}})
	if c := untagged.Tables[0].Chains[0].Rules[0].Comment; c != "acme-alpn-proxy: new connections to the proxy" {
		t.Errorf("untagged comment = %q", c)
	}
}

func TestParseTag(t *testing.T) {
	for in, want := range map[string]struct {
		id string
		ok bool
	}{
		"acme-alpn-proxy":            {"", true},
		"acme-alpn-proxy: x":         {"", true},
		"acme-alpn-proxy-00ff":       {"00ff", true},
		"acme-alpn-proxy-00ff: text": {"00ff", true},
		"acme-alpn-proxy-":           {"", false},
		"acme-alpn-proxy-XYZ":        {"", false},
		"acme-alpn-proxyx":           {"", false},
		"docker":                     {"", false},
		"":                           {"", false},
	} {
		id, ok := ParseTag(in)
		if id != want.id || ok != want.ok {
			t.Errorf("ParseTag(%q) = %q, %v; want %q, %v", in, id, ok, want.id, want.ok)
		}
	}
}

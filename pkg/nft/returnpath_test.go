package nft

import (
	"testing"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/intercept"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

func returnRuleSet(t *testing.T, mode intercept.Mode) intercept.RuleSet {
	t.Helper()
	rs, err := intercept.Build(intercept.Config{Mode: mode, Port: 443, ListenPort: 21443,
		Families: []intercept.Family{intercept.IPv4, intercept.IPv6}, ReturnMark: 0x1000})
	if err != nil {
		t.Fatal(err)
	}
	return rs
}

// The return-path rules read back from the wire as the rules written, so
// status can show them; a mark rule for another bit is not ours.
func TestDecodeReturnRulesRoundTrip(t *testing.T) {
	rs := returnRuleSet(t, intercept.TProxy)
	n := 0
	for _, tb := range rs.Tables {
		for _, c := range tb.Chains {
			for _, r := range c.Rules {
				if r.Role != intercept.RoleReturn {
					continue
				}
				n++
				es, err := ruleExprs(tb.Family, r)
				if err != nil {
					t.Fatal(err)
				}
				m := ruleDumpMsg(t, netlink.Message{Data: nfgenmsg(nfproto(tb.Family), 0)}, c.Name, 7, es)
				m.Data = append(m.Data, marshal(t, netlink.Attribute{Type: unix.NFTA_RULE_USERDATA,
					Data: append(append([]byte{0, byte(len(r.Comment) + 1)}, r.Comment...), 0)})...)
				p, err := parseRule(m)
				if err != nil {
					t.Fatal(err)
				}
				if !p.state.Known || p.state.Rule != r {
					t.Errorf("decoded %+v, want %+v", p.state, r)
				}
			}
		}
	}
	if n != 10 {
		t.Fatalf("%d return rules, want 5 per family", n)
	}
}

// What nft itself lists for the return path: the kernel took the
// expressions as the nft syntax the intercept package documents.
func TestRootReturnPathListsAsDocumented(t *testing.T) {
	ns := newNetns(t)
	b := openIn(t, ns)
	rs := returnRuleSet(t, intercept.TProxy)
	if err := b.Install(rs); err != nil {
		t.Fatal(err)
	}
	for _, f := range []intercept.Family{intercept.IPv4, intercept.IPv6} {
		wantLines(t, nftList(t, ns, f),
			"chain return-out {",
			"type route hook output priority mangle; policy accept;",
			`meta mark & 0x00001000 == 0x00001000 ct mark set ct mark | 0x00001000 comment "acme-alpn-proxy: dialed from the client's address"`,
			`meta mark & 0x00001000 == 0x00001000 ct state new meta mark set meta mark & 0xffffefff comment "acme-alpn-proxy: our own packets route normally"`,
			`meta mark & 0x00001000 == 0x00001000 ct status dnat meta mark set meta mark & 0xffffefff comment "acme-alpn-proxy: our own packets route normally"`,
			`ct direction reply ct mark & 0x00001000 == 0x00001000 meta mark set meta mark | 0x00001000 comment "acme-alpn-proxy: replies to the proxy"`,
			"chain return-in {",
			"type filter hook prerouting priority mangle; policy accept;",
		)
	}
	s := inspectIn(t, ns)
	for _, ts := range s.Tables {
		if ts.Mode() != intercept.TProxy || len(ts.Chains) != 4 {
			t.Fatalf("%s: mode %q, %d chains", ts.Family, ts.Mode(), len(ts.Chains))
		}
		for _, c := range ts.Chains[:2] {
			for _, r := range c.Rules {
				if !r.Known || r.Rule.Role != intercept.RoleReturn {
					t.Errorf("chain %s: rule %+v not read back as a return rule", c.Name, r)
				}
			}
		}
	}
	// Stop keeps the return path through the drain.
	if err := b.RemoveIntercept(); err != nil {
		t.Fatal(err)
	}
	wantLines(t, nftList(t, ns, intercept.IPv4), "chain return-out {",
		`ct direction reply ct mark & 0x00001000 == 0x00001000 meta mark set meta mark | 0x00001000 comment "acme-alpn-proxy: replies to the proxy"`)
}

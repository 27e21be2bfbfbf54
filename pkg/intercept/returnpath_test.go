package intercept

import "testing"

func TestBuildReturnPath(t *testing.T) {
	rs, err := Build(Config{Mode: Redirect, Port: 443, ListenPort: 21443, Families: []Family{IPv4, IPv6}, ReturnMark: 0x1000})
	if err != nil {
		t.Fatal(err)
	}
	if !rs.HasReturn() {
		t.Fatal("no return path")
	}
	for _, tb := range rs.Tables {
		out, in := tb.Chains[0], tb.Chains[1]
		if out.Type != ChainRoute || out.Hook != HookOutput || out.Priority != PriorityMangle || len(out.Rules) != 4 {
			t.Fatalf("%s: return-out = %+v, want a route chain on output at mangle with save, clear (new, dnat), restore", tb.Family, out)
		}
		if out.Rules[0].Action != ActionSaveMark || out.Rules[1].Action != ActionClearMark || out.Rules[2].Action != ActionClearMark || out.Rules[3].Action != ActionRestoreMark {
			t.Errorf("%s: output rules out of order: %v", tb.Family, out.Rules)
		}
		if in.Hook != HookPrerouting || in.Priority != PriorityMangle || len(in.Rules) != 1 || in.Rules[0].Action != ActionRestoreMark {
			t.Errorf("%s: return-in = %+v", tb.Family, in)
		}
		for _, r := range append(out.Rules, in.Rules...) {
			if r.Role != RoleReturn || r.Mark != 0x1000 || !r.IsMarkRule() {
				t.Errorf("rule %+v: want a return-role mark rule for 0x1000", r)
			}
		}
	}
	// The mark is cleared only on a connection's first packets and on
	// DNATed ones: every other packet keeps it and is not routed again.
	for i, want := range []string{
		`meta mark & 0x1000 == 0x1000 ct state new meta mark set meta mark & 0xffffefff comment "acme-alpn-proxy: our own packets route normally"`,
		`meta mark & 0x1000 == 0x1000 ct status dnat meta mark set meta mark & 0xffffefff comment "acme-alpn-proxy: our own packets route normally"`,
	} {
		if got := rs.Tables[0].Chains[0].Rules[1+i].String(); got != want {
			t.Errorf("clear rule %d = %s, want %s", i, got, want)
		}
	}
	only := rs.ReturnOnly()
	without := rs.WithoutReturn()
	for i := range rs.Tables {
		if len(only.Tables[i].Chains) != 2 || len(without.Tables[i].Chains) != 2 || without.HasReturn() {
			t.Errorf("split %d: only %v, without %v", i, only.Tables[i].Chains, without.Tables[i].Chains)
		}
		if without.Tables[i].Chains[0].Name != "prerouting" || only.Tables[i].Chains[0].Name != "return-out" {
			t.Errorf("split %d picked the wrong chains", i)
		}
	}
	plain, _ := Build(Config{Mode: TProxy, Port: 443, ListenPort: 21443, Families: []Family{IPv4}})
	if plain.HasReturn() || len(plain.Tables[0].Chains) != 2 {
		t.Error("ReturnMark 0 must add no return path (host mode)")
	}
}

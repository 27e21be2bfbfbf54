package nft

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/intercept"
	"github.com/google/nftables/expr"
	"github.com/mdlayher/netlink"
	"github.com/mdlayher/netlink/nltest"
	"golang.org/x/sys/unix"
)

func ruleSet(t *testing.T, mode intercept.Mode, fams ...intercept.Family) intercept.RuleSet {
	t.Helper()
	rs, err := intercept.Build(intercept.Config{Mode: mode, Port: 443, ListenPort: 21443, Families: fams})
	if err != nil {
		t.Fatal(err)
	}
	return rs
}

// Message types and flags spelled out from the uapi headers, independent
// of the code under test.
const (
	tNewTable = 0x0a00
	tNewChain = 0x0a03
	tDelTable = 0x0a02
	tNewRule  = 0x0a06
	tDelRule  = 0x0a08
	fReq      = 0x1
	fAck      = 0x4
	fEcho     = 0x8
	fExcl     = 0x200
	fCreate   = 0x400
	fAppend   = 0x800
)

type wantMsg struct {
	typ   netlink.HeaderType
	flags netlink.HeaderFlags
	attrs map[uint16][]byte // exact attributes (nested ones as raw bytes)
}

func marshal(t *testing.T, as ...netlink.Attribute) []byte {
	t.Helper()
	b, err := netlink.MarshalAttributes(as)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// exprList encodes expressions the way a NEWRULE carries them.
func exprList(t *testing.T, fam byte, es ...expr.Any) []byte {
	t.Helper()
	var list []netlink.Attribute
	for _, e := range es {
		b, err := expr.Marshal(fam, e)
		if err != nil {
			t.Fatal(err)
		}
		list = append(list, netlink.Attribute{Type: unix.NLA_F_NESTED | unix.NFTA_LIST_ELEM, Data: b})
	}
	return marshal(t, list...)
}

var name = []byte("acme-alpn-proxy\x00")

func tableMsgs(t *testing.T, owner bool) []wantMsg {
	kept := map[uint16][]byte{1: name}
	if owner {
		kept[2] = []byte{0, 0, 0, 2} // NFTA_TABLE_FLAGS = NFT_TABLE_F_OWNER, big endian
	}
	return []wantMsg{
		{tNewTable, fReq | fAck | fCreate, map[uint16][]byte{1: name}},
		{tDelTable, fReq | fAck, map[uint16][]byte{1: name}},
		{tNewTable, fReq | fAck | fCreate | fExcl, kept},
	}
}

func chainMsg(t *testing.T, chain string, hook uint32, prio int32, typ string) wantMsg {
	return wantMsg{tNewChain, fReq | fAck | fCreate, map[uint16][]byte{
		1: name,
		3: []byte(chain + "\x00"),
		4: marshal(t, netlink.Attribute{Type: 1, Data: binary.BigEndian.AppendUint32(nil, hook)},
			netlink.Attribute{Type: 2, Data: binary.BigEndian.AppendUint32(nil, uint32(prio))}),
		7: []byte(typ + "\x00"),
	}}
}

func ruleMsg(t *testing.T, chain, comment string, exprs []byte) wantMsg {
	ud := append([]byte{0, byte(len(comment) + 1)}, comment...)
	return wantMsg{tNewRule, fReq | fAck | fCreate | fAppend | fEcho, map[uint16][]byte{
		1: name, 2: []byte(chain + "\x00"), 4: exprs, 7: append(ud, 0),
	}}
}

// Expressions as `nft --debug=netlink` shows them for the rules.
func notLo() []expr.Any {
	lo := make([]byte, 16)
	copy(lo, "lo")
	return []expr.Any{&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1}, &expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: lo}}
}

func local() []expr.Any {
	return []expr.Any{
		&expr.Fib{Register: 1, FlagDADDR: true, ResultADDRTYPE: true},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binary.NativeEndian.AppendUint32(nil, 2)}, // RTN_LOCAL
	}
}

func dport(p uint16) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{6}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{byte(p >> 8), byte(p)}},
	}
}

func synOnly() []expr.Any {
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 13, Len: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 1, Mask: []byte{0x17}, Xor: []byte{0}},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{0x02}},
	}
}

func notDNAT() []expr.Any {
	return []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATUS},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: binary.NativeEndian.AppendUint32(nil, 0x20), Xor: []byte{0, 0, 0, 0}},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{0, 0, 0, 0}},
	}
}

// claimNAT is `dnat to ip daddr` (`dnat to ip6 daddr`): the destination
// address loaded into reg 1 and DNAT to it. nft itself sends only addr_min;
// naming reg 1 as addr_max too is what the kernel assumes without it, and
// it dumps both back.
func claimNAT(fam byte) []expr.Any {
	off, n := uint32(16), uint32(4) // iphdr.daddr
	if fam == 10 {
		off, n = 24, 16 // ipv6hdr.daddr
	}
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: n},
		&expr.NAT{Type: expr.NATTypeDestNAT, Family: uint32(fam), RegAddrMin: 1, RegAddrMax: 1},
	}
}

func cat(parts ...[]expr.Any) []expr.Any {
	var out []expr.Any
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

func wantRedirect(t *testing.T) []wantMsg {
	msgs := tableMsgs(t, true)
	msgs = append(msgs,
		chainMsg(t, "prerouting", 0, -110, "nat"),
		chainMsg(t, "guard", 1, -10, "filter"),
		ruleMsg(t, "prerouting", "acme-alpn-proxy: new connections to the proxy", exprList(t, 2, cat(local(), dport(443), synOnly(),
			[]expr.Any{&expr.Immediate{Register: 1, Data: []byte{0x53, 0xc3}}, &expr.Redir{RegisterProtoMin: 1, Flags: 2}})...)),
		ruleMsg(t, "guard", "acme-alpn-proxy: listener only through the redirect", exprList(t, 2, cat(notLo(), local(), dport(21443), notDNAT(),
			[]expr.Any{&expr.Verdict{Kind: expr.VerdictDrop}})...)),
	)
	return msgs
}

func wantTProxy(t *testing.T, fam byte) []wantMsg {
	msgs := tableMsgs(t, true)
	msgs = append(msgs,
		chainMsg(t, "prerouting", 0, -160, "filter"),
		chainMsg(t, "claim-nat", 0, -110, "nat"),
		ruleMsg(t, "prerouting", "acme-alpn-proxy: listener only through tproxy", exprList(t, fam, cat(notLo(), local(), dport(21443),
			[]expr.Any{&expr.Verdict{Kind: expr.VerdictDrop}})...)),
		ruleMsg(t, "prerouting", "acme-alpn-proxy: new connections to the proxy", exprList(t, fam, cat(notLo(), local(), dport(443), synOnly(),
			[]expr.Any{&expr.Immediate{Register: 1, Data: []byte{0x53, 0xc3}}, &expr.TProxy{Family: fam, TableFamily: fam, RegPort: 1}})...)),
		ruleMsg(t, "claim-nat", "acme-alpn-proxy: no other DNAT for proxied connections", exprList(t, fam, cat(notLo(), local(), dport(443), synOnly(),
			claimNAT(fam))...)),
	)
	return msgs
}

func checkMsgs(t *testing.T, got []netlink.Message, fams []byte, want []wantMsg) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("batch has %d messages, want %d", len(got), len(want))
	}
	for i, w := range want {
		g := got[i]
		if g.Header.Type != w.typ || g.Header.Flags != w.flags {
			t.Errorf("message %d: type %#x flags %#x, want type %#x flags %#x", i, uint16(g.Header.Type), uint16(g.Header.Flags), uint16(w.typ), uint16(w.flags))
			continue
		}
		if g.Data[0] != fams[i] || g.Data[1] != 0 {
			t.Errorf("message %d: nfgenmsg %x, want family %d version 0", i, g.Data[:4], fams[i])
		}
		ga := msgAttrs(t, g)
		if len(ga) != len(w.attrs) {
			t.Errorf("message %d (%#x): attributes %v, want %v", i, uint16(w.typ), keys(ga), keys(w.attrs))
		}
		for typ, data := range w.attrs {
			if !bytes.Equal(ga[typ], data) {
				t.Errorf("message %d (%#x): attribute %d = %x, want %x", i, uint16(w.typ), typ, ga[typ], data)
			}
		}
	}
}

func keys(m map[uint16][]byte) []uint16 {
	var ks []uint16
	for k := range m {
		ks = append(ks, k)
	}
	return ks
}

func repeat(b byte, n int) []byte { return bytes.Repeat([]byte{b}, n) }

func TestInstallBatch(t *testing.T) {
	for _, tc := range []struct {
		mode intercept.Mode
		fams []intercept.Family
		want func(t *testing.T) ([]wantMsg, []byte)
	}{
		{intercept.Redirect, []intercept.Family{intercept.IPv4}, func(t *testing.T) ([]wantMsg, []byte) {
			return wantRedirect(t), repeat(2, 7)
		}},
		{intercept.TProxy, []intercept.Family{intercept.IPv6}, func(t *testing.T) ([]wantMsg, []byte) {
			return wantTProxy(t, 10), repeat(10, 8)
		}},
		{intercept.TProxy, []intercept.Family{intercept.IPv4, intercept.IPv6}, func(t *testing.T) ([]wantMsg, []byte) {
			return append(wantTProxy(t, 2), wantTProxy(t, 10)...), append(repeat(2, 8), repeat(10, 8)...)
		}},
	} {
		t.Run(fmt.Sprint(tc.mode, tc.fams), func(t *testing.T) {
			k := &fakeKernel{t: t}
			b := newBackend(k.conn(), Options{})
			if err := b.Install(ruleSet(t, tc.mode, tc.fams...)); err != nil {
				t.Fatal(err)
			}
			if len(k.batches) != 1 {
				t.Fatalf("%d batches, want one transaction", len(k.batches))
			}
			bt := k.batches[0]
			begin, end := bt[0], bt[len(bt)-1]
			for _, m := range []netlink.Message{begin, end} {
				// res_id NFNL_SUBSYS_NFTABLES (10), big endian.
				if !bytes.Equal(m.Data, []byte{0, 0, 0, 10}) {
					t.Errorf("batch marker %#x: nfgenmsg %x", m.Header.Type, m.Data)
				}
			}
			if begin.Header.Type != 0x10 || end.Header.Type != 0x11 {
				t.Errorf("batch framed by %#x..%#x, want BEGIN 0x10 .. END 0x11", begin.Header.Type, end.Header.Type)
			}
			want, fams := tc.want(t)
			checkMsgs(t, k.inner(0), fams, want)
			if !b.Owner() {
				t.Error("Owner() false after installing owner tables")
			}
			if len(k.queue) != 0 {
				t.Errorf("%d replies left unread", len(k.queue))
			}
		})
	}
}

func TestInstallFallsBackToPlainTables(t *testing.T) {
	for _, errno := range []unix.Errno{unix.EINVAL, unix.EOPNOTSUPP} {
		t.Run(errno.Error(), func(t *testing.T) {
			k := &fakeKernel{t: t, refuse: func(m netlink.Message) int {
				// A pre-5.12 kernel refuses any table flag but dormant.
				if m.Header.Type == tNewTable {
					if _, ok := msgAttrs(t, m)[unix.NFTA_TABLE_FLAGS]; ok {
						return int(errno)
					}
				}
				return 0
			}}
			var logs []string
			b := newBackend(k.conn(), Options{Logf: func(f string, a ...any) { logs = append(logs, fmt.Sprintf(f, a...)) }})
			rs := ruleSet(t, intercept.Redirect, intercept.IPv4)
			if err := b.Install(rs); err != nil {
				t.Fatal(err)
			}
			if b.Owner() {
				t.Error("Owner() true on a kernel without owner tables")
			}
			if len(logs) != 1 || !strings.Contains(logs[0], "owner") || !strings.Contains(logs[0], "plain tables") {
				t.Errorf("log %q does not report the fallback", logs)
			}
			if len(k.batches) != 2 {
				t.Fatalf("%d batches, want owner attempt then plain", len(k.batches))
			}
			want := wantRedirect(t)
			copy(want, tableMsgs(t, false))
			checkMsgs(t, k.inner(1), repeat(2, 7), want)

			// The decision sticks: a re-install goes straight to plain
			// tables, still deleting the stale table first.
			if err := b.Install(rs); err != nil {
				t.Fatal(err)
			}
			if len(k.batches) != 3 || len(logs) != 1 {
				t.Errorf("re-install: %d batches, %d logs; want 3, 1", len(k.batches), len(logs))
			}
			checkMsgs(t, k.inner(2), repeat(2, 7), want)
		})
	}
}

func TestInstallOwnedByAnother(t *testing.T) {
	k := &fakeKernel{t: t, refuse: func(m netlink.Message) int {
		// Only the owning socket may look up an owner table.
		if m.Header.Type&0xff <= unix.NFT_MSG_DELRULE && m.Data[0] == unix.NFPROTO_IPV6 {
			return int(unix.EPERM)
		}
		return 0
	}}
	b := newBackend(k.conn(), Options{})
	err := b.Install(ruleSet(t, intercept.Redirect, intercept.IPv4, intercept.IPv6))
	if !errors.Is(err, ErrOwnedByAnother) {
		t.Fatalf("err = %v, want ErrOwnedByAnother", err)
	}
	const want = "table ip6 acme-alpn-proxy is owned by another process — is another acme-alpn-proxy running?"
	if err.Error() != want {
		t.Errorf("err = %q, want %q", err, want)
	}
	if len(k.batches) != 1 {
		t.Errorf("%d batches; EPERM must not trigger the owner fallback", len(k.batches))
	}
	if b.Owner() || len(b.installed) != 0 {
		t.Error("failed Install recorded tables as installed")
	}
}

func TestInstallWithoutPermission(t *testing.T) {
	k := &fakeKernel{t: t, beginErr: int(unix.EPERM)}
	b := newBackend(k.conn(), Options{})
	err := b.Install(ruleSet(t, intercept.TProxy, intercept.IPv4))
	if err == nil || errors.Is(err, ErrOwnedByAnother) || !strings.Contains(err.Error(), "CAP_NET_ADMIN") {
		t.Fatalf("err = %v, want a missing-capability error", err)
	}
	if len(k.queue) != 0 {
		t.Errorf("%d replies left unread", len(k.queue))
	}
}

func TestInstallTProxyUnsupported(t *testing.T) {
	for _, errno := range []unix.Errno{unix.ENOENT, unix.EOPNOTSUPP} {
		k := &fakeKernel{t: t, refuse: func(m netlink.Message) int {
			if m.Header.Type == tNewRule && hasExpr(t, m, "tproxy") {
				return int(errno)
			}
			return 0
		}}
		b := newBackend(k.conn(), Options{})
		err := b.Install(ruleSet(t, intercept.TProxy, intercept.IPv4, intercept.IPv6))
		if !errors.Is(err, ErrTProxyUnsupported) || !errors.Is(err, errno) {
			t.Errorf("%v: err = %v, want ErrTProxyUnsupported wrapping the errno", errno, err)
		}
		if len(k.queue) != 0 {
			t.Errorf("%d replies left unread", len(k.queue))
		}
	}
	// ENOENT on a redirect rule is not a tproxy problem.
	k := &fakeKernel{t: t, refuse: func(m netlink.Message) int {
		if m.Header.Type == tNewRule && hasExpr(t, m, "redir") {
			return int(unix.ENOENT)
		}
		return 0
	}}
	err := newBackend(k.conn(), Options{}).Install(ruleSet(t, intercept.Redirect, intercept.IPv4))
	if err == nil || errors.Is(err, ErrTProxyUnsupported) || !strings.Contains(err.Error(), "nft_redir") {
		t.Errorf("redirect rule refused: err = %v, want one naming nft_redir", err)
	}
	// Nor is a refused identity DNAT of the tproxy rule set: it needs nft_nat.
	k = &fakeKernel{t: t, refuse: func(m netlink.Message) int {
		if m.Header.Type == tNewRule && hasExpr(t, m, "nat") {
			return int(unix.ENOENT)
		}
		return 0
	}}
	err = newBackend(k.conn(), Options{}).Install(ruleSet(t, intercept.TProxy, intercept.IPv4))
	if err == nil || errors.Is(err, ErrTProxyUnsupported) || !strings.Contains(err.Error(), "claim-nat") || !strings.Contains(err.Error(), "nft_nat") {
		t.Errorf("claim-nat rule refused: err = %v, want one naming the chain and nft_nat", err)
	}
}

// The kernel acks every message of a batch whose commit then fails; the
// failure arrives only on BATCH_BEGIN.
func TestInstallCommitFailureDespiteAcks(t *testing.T) {
	k := &fakeKernel{t: t, commitErr: int(unix.ENOMEM)}
	b := newBackend(k.conn(), Options{})
	err := b.Install(ruleSet(t, intercept.Redirect, intercept.IPv4))
	if !errors.Is(err, unix.ENOMEM) {
		t.Fatalf("err = %v, want the commit error", err)
	}
	if b.Owner() || len(b.rules) != 0 {
		t.Error("aborted batch recorded as installed")
	}
	if len(k.queue) != 0 {
		t.Errorf("%d replies left unread", len(k.queue))
	}
}

func TestExchangeIgnoresLateRepliesAndNeedsEveryAnswer(t *testing.T) {
	k := &fakeKernel{t: t}
	c := k.conn()
	// An answer to an earlier exchange that gave up waiting.
	k.queue = append(k.queue, ack(netlink.Message{Header: netlink.Header{Sequence: 7, Type: tNewRule}}, int(unix.EEXIST)))
	b := newBackend(c, Options{})
	if err := b.Install(ruleSet(t, intercept.Redirect, intercept.IPv4)); err != nil {
		t.Fatalf("late reply of another batch broke Install: %v", err)
	}

	// A kernel that answers some messages neither way leaves the result unknown.
	k2 := &fakeKernel{t: t}
	bt, err := installBatch(ruleSet(t, intercept.Redirect, intercept.IPv4), true)
	if err != nil {
		t.Fatal(err)
	}
	bt.msgs[3].Header.Flags &^= netlink.Acknowledge
	res, err := exchange(k2.conn(), bt)
	if err != nil {
		t.Fatal(err)
	}
	if err := batchError(res, true); err == nil || !strings.Contains(err.Error(), "did not answer") {
		t.Errorf("unanswered message: err = %v", err)
	}
}

func TestExchangeBoundedWhenKernelIsSilent(t *testing.T) {
	bt, err := installBatch(ruleSet(t, intercept.Redirect, intercept.IPv4), true)
	if err != nil {
		t.Fatal(err)
	}
	// Reads fail like a socket whose read deadline passed.
	silent := func(req []netlink.Message) ([]netlink.Message, error) {
		if req == nil {
			return nil, unix.EAGAIN
		}
		return nil, nil
	}
	if _, err := exchange(nltest.Dial(silent), bt); err == nil {
		t.Fatal("exchange with a silent kernel returned no error")
	}
}

func TestInstallLearnsHandlesWithoutEcho(t *testing.T) {
	k := &fakeKernel{t: t, noEcho: true}
	rs := ruleSet(t, intercept.TProxy, intercept.IPv4)
	k.get = func(req netlink.Message) []netlink.Message {
		if req.Header.Type != nftType(unix.NFT_MSG_GETRULE) || req.Header.Flags&netlink.Dump != netlink.Dump {
			t.Errorf("unexpected request %#x", req.Header.Type)
			return ack(req, int(unix.EOPNOTSUPP))
		}
		// The kernel dumps rules chain by chain: handles 10, 11 in
		// prerouting (guard, tproxy), 12 in claim-nat.
		var out []netlink.Message
		handle := uint64(10)
		for _, c := range rs.Tables[0].Chains {
			for _, r := range c.Rules {
				es, _ := ruleExprs(intercept.IPv4, r)
				out = append(out, ruleDumpMsg(t, req, c.Name, handle, es))
				handle++
			}
		}
		return dumpDone(req, out)
	}
	b := newBackend(k.conn(), Options{})
	if err := b.Install(rs); err != nil {
		t.Fatal(err)
	}
	if err := b.RemoveIntercept(); err != nil {
		t.Fatal(err)
	}
	checkMsgs(t, k.inner(1), []byte{2, 2}, []wantMsg{delRuleMsg("prerouting", 11), delRuleMsg("claim-nat", 12)})
}

func delRuleMsg(chain string, handle uint64) wantMsg {
	return wantMsg{tDelRule, fReq | fAck, map[uint16][]byte{
		1: name, 2: []byte(chain + "\x00"), 3: binary.BigEndian.AppendUint64(nil, handle),
	}}
}

func hasExpr(t *testing.T, m netlink.Message, name string) bool {
	p, err := parseRule(m)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range p.state.Exprs {
		if n == name {
			return true
		}
	}
	return false
}

func ruleDumpMsg(t *testing.T, req netlink.Message, chain string, handle uint64, es []expr.Any) netlink.Message {
	return netlink.Message{
		Header: netlink.Header{Type: nftType(unix.NFT_MSG_NEWRULE), Sequence: req.Header.Sequence, Flags: netlink.Multi},
		Data: append(nfgenmsg(req.Data[0], 0), marshal(t,
			netlink.Attribute{Type: unix.NFTA_RULE_TABLE, Data: name},
			netlink.Attribute{Type: unix.NFTA_RULE_CHAIN, Data: []byte(chain + "\x00")},
			netlink.Attribute{Type: unix.NFTA_RULE_HANDLE, Data: binary.BigEndian.AppendUint64(nil, handle)},
			netlink.Attribute{Type: unix.NLA_F_NESTED | unix.NFTA_RULE_EXPRESSIONS, Data: exprList(t, req.Data[0], es...)},
		)...),
	}
}

func dumpDone(req netlink.Message, msgs []netlink.Message) []netlink.Message {
	return append(msgs, netlink.Message{
		Header: netlink.Header{Type: netlink.Done, Flags: netlink.Multi, Sequence: req.Header.Sequence},
		Data:   make([]byte, 4),
	})
}

func TestRemoveIntercept(t *testing.T) {
	k := &fakeKernel{t: t}
	b := newBackend(k.conn(), Options{})
	if err := b.Install(ruleSet(t, intercept.Redirect, intercept.IPv4, intercept.IPv6)); err != nil {
		t.Fatal(err)
	}
	// Echo handles: ip rules 1 (redirect), 2 (guard); ip6 rules 3, 4.
	k.refuse = func(m netlink.Message) int {
		// Someone already deleted the ip6 redirect rule.
		if m.Header.Type == tDelRule && bytes.Equal(msgAttrs(t, m)[unix.NFTA_RULE_HANDLE], binary.BigEndian.AppendUint64(nil, 3)) {
			return int(unix.ENOENT)
		}
		return 0
	}
	if err := b.RemoveIntercept(); err != nil {
		t.Fatal(err)
	}
	if len(k.batches) != 3 {
		t.Fatalf("%d batches, want install, delete, delete without the vanished rule", len(k.batches))
	}
	first, retry := k.inner(1), k.inner(2)
	if len(first) != 2 || len(retry) != 1 {
		t.Fatalf("DELRULE batches of %d and %d messages, want 2 and 1", len(first), len(retry))
	}
	want := wantMsg{tDelRule, fReq | fAck, map[uint16][]byte{1: name, 2: []byte("prerouting\x00"), 3: {0, 0, 0, 0, 0, 0, 0, 1}}}
	checkMsgs(t, retry, []byte{2}, []wantMsg{want})
	if first[1].Data[0] != 10 {
		t.Errorf("second DELRULE for family %d, want ip6", first[1].Data[0])
	}
	// Nothing left to remove: no batch.
	if err := b.RemoveIntercept(); err != nil || len(k.batches) != 3 {
		t.Errorf("second RemoveIntercept: err %v, %d batches", err, len(k.batches))
	}
}

func TestRemoveInterceptTProxyDeletesClaimNATKeepsGuard(t *testing.T) {
	k := &fakeKernel{t: t}
	b := newBackend(k.conn(), Options{})
	if err := b.Install(ruleSet(t, intercept.TProxy, intercept.IPv4, intercept.IPv6)); err != nil {
		t.Fatal(err)
	}
	// Echo handles in batch order: ip guard 1, tproxy 2, claim-nat 3;
	// ip6 4, 5, 6.
	if err := b.RemoveIntercept(); err != nil {
		t.Fatal(err)
	}
	if len(k.batches) != 2 {
		t.Fatalf("%d batches, want install and one delete transaction", len(k.batches))
	}
	checkMsgs(t, k.inner(1), []byte{2, 2, 10, 10}, []wantMsg{
		delRuleMsg("prerouting", 2), delRuleMsg("claim-nat", 3),
		delRuleMsg("prerouting", 5), delRuleMsg("claim-nat", 6),
	})
	// The guards stay until Remove, which deletes the tables with them.
	if err := b.RemoveIntercept(); err != nil || len(k.batches) != 2 {
		t.Errorf("second RemoveIntercept: err %v, %d batches", err, len(k.batches))
	}
	if err := b.Remove(); err != nil {
		t.Fatal(err)
	}
	want := tableMsgs(t, false)[:2]
	checkMsgs(t, k.inner(2), []byte{2, 2, 10, 10}, append(want, want...))
}

func TestReinstallDropsFamilyNoLongerWanted(t *testing.T) {
	k := &fakeKernel{t: t}
	b := newBackend(k.conn(), Options{})
	if err := b.Install(ruleSet(t, intercept.TProxy, intercept.IPv4, intercept.IPv6)); err != nil {
		t.Fatal(err)
	}
	if err := b.Install(ruleSet(t, intercept.TProxy, intercept.IPv4)); err != nil {
		t.Fatal(err)
	}
	want := append(wantTProxy(t, 2), tableMsgs(t, false)[:2]...)
	checkMsgs(t, k.inner(1), append(repeat(2, 8), 10, 10), want)
}

func TestRemove(t *testing.T) {
	k := &fakeKernel{t: t}
	b := newBackend(k.conn(), Options{})
	if err := b.Remove(); err != nil || len(k.batches) != 0 {
		t.Fatalf("Remove before Install: err %v, %d batches", err, len(k.batches))
	}
	if err := b.Install(ruleSet(t, intercept.TProxy, intercept.IPv4, intercept.IPv6)); err != nil {
		t.Fatal(err)
	}
	if err := b.Remove(); err != nil {
		t.Fatal(err)
	}
	// Ensure-then-delete per family, so a table someone deleted does not
	// abort the batch with ENOENT.
	want := tableMsgs(t, false)[:2]
	checkMsgs(t, k.inner(1), []byte{2, 2, 10, 10}, append(want, want...))
	if b.Owner() {
		t.Error("Owner() true after Remove")
	}
	if err := b.Remove(); err != nil || len(k.batches) != 2 {
		t.Errorf("second Remove: err %v, %d batches", err, len(k.batches))
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if err := b.Install(ruleSet(t, intercept.TProxy, intercept.IPv4)); err == nil {
		t.Error("Install after Close succeeded")
	}
}

func TestDecodeRuleRoundTrip(t *testing.T) {
	for _, mode := range []intercept.Mode{intercept.Redirect, intercept.TProxy} {
		for _, tb := range ruleSet(t, mode, intercept.IPv4, intercept.IPv6).Tables {
			for _, c := range tb.Chains {
				for _, r := range c.Rules {
					es, err := ruleExprs(tb.Family, r)
					if err != nil {
						t.Fatal(err)
					}
					// Through the wire format, as a dump returns it.
					req := netlink.Message{Data: nfgenmsg(nfproto(tb.Family), 0)}
					m := ruleDumpMsg(t, req, c.Name, 5, es)
					m.Data = append(m.Data, marshal(t, netlink.Attribute{Type: unix.NFTA_RULE_USERDATA,
						Data: append(append([]byte{0, byte(len(r.Comment) + 1)}, r.Comment...), 0)})...)
					p, err := parseRule(m)
					if err != nil {
						t.Fatal(err)
					}
					if !p.state.Known || p.state.Rule != r || p.handle != 5 || p.chain != c.Name {
						t.Errorf("%s: decoded %+v, want %+v", tb.Family, p.state, r)
					}
				}
			}
		}
	}
	// A rule someone else wrote into our table is reported, not misread.
	foreign := cat(dport(443), []expr.Any{&expr.Counter{}, &expr.Verdict{Kind: expr.VerdictAccept}})
	p, err := parseRule(ruleDumpMsg(t, netlink.Message{Data: nfgenmsg(2, 0)}, "x", 1, foreign))
	if err != nil {
		t.Fatal(err)
	}
	if p.state.Known || strings.Join(p.state.Exprs, " ") != "meta cmp payload cmp counter immediate" {
		t.Errorf("foreign rule: %+v", p.state)
	}
	// DNATs that move the connection are not our identity DNAT.
	match := cat(notLo(), local(), dport(443), synOnly())
	for what, tail := range map[string][]expr.Any{
		"dnat to ip saddr": {
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 12, Len: 4},
			&expr.NAT{Type: expr.NATTypeDestNAT, Family: 2, RegAddrMin: 1, RegAddrMax: 1},
		},
		"dnat to ip daddr:8443": {
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4},
			&expr.Immediate{Register: 2, Data: []byte{0x20, 0xfb}},
			&expr.NAT{Type: expr.NATTypeDestNAT, Family: 2, RegAddrMin: 1, RegAddrMax: 1, RegProtoMin: 2, RegProtoMax: 2},
		},
		"dnat to 198.18.0.3": {
			&expr.Immediate{Register: 1, Data: []byte{198, 18, 0, 3}},
			&expr.NAT{Type: expr.NATTypeDestNAT, Family: 2, RegAddrMin: 1, RegAddrMax: 1},
		},
		"snat to ip daddr": {
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4},
			&expr.NAT{Type: expr.NATTypeSourceNAT, Family: 2, RegAddrMin: 1, RegAddrMax: 1},
		},
	} {
		p, err := parseRule(ruleDumpMsg(t, netlink.Message{Data: nfgenmsg(2, 0)}, "claim-nat", 1, cat(match, tail)))
		if err != nil {
			t.Fatal(err)
		}
		if p.state.Known {
			t.Errorf("%s decoded as our rule %s", what, p.state.Rule)
		}
	}
}

// fakeTables answers GETTABLE and the chain and rule dumps for our table
// holding the rules of rs that keep says to keep, as the kernel lists them.
func fakeTables(t *testing.T, rs intercept.RuleSet, keep func(intercept.Rule) bool) func(netlink.Message) []netlink.Message {
	return func(req netlink.Message) []netlink.Message {
		fam := req.Data[0]
		var tb *intercept.Table
		for i := range rs.Tables {
			if nfproto(rs.Tables[i].Family) == fam {
				tb = &rs.Tables[i]
			}
		}
		if tb == nil {
			return ack(req, int(unix.ENOENT))
		}
		reply := func(typ int, as ...netlink.Attribute) netlink.Message {
			return netlink.Message{
				Header: netlink.Header{Type: nftType(typ), Sequence: req.Header.Sequence, Flags: netlink.Multi},
				Data:   append(nfgenmsg(fam, 0), marshal(t, as...)...),
			}
		}
		var out []netlink.Message
		switch req.Header.Type {
		case nftType(unix.NFT_MSG_GETTABLE):
			m := reply(unix.NFT_MSG_NEWTABLE, netlink.Attribute{Type: unix.NFTA_TABLE_NAME, Data: name},
				netlink.Attribute{Type: unix.NFTA_TABLE_FLAGS, Data: []byte{0, 0, 0, 2}})
			m.Header.Flags = 0
			return []netlink.Message{m}
		case nftType(unix.NFT_MSG_GETCHAIN):
			for _, c := range tb.Chains {
				hook, _ := hookNum(c.Hook)
				out = append(out, reply(unix.NFT_MSG_NEWCHAIN,
					netlink.Attribute{Type: unix.NFTA_CHAIN_TABLE, Data: name},
					netlink.Attribute{Type: unix.NFTA_CHAIN_NAME, Data: []byte(c.Name + "\x00")},
					netlink.Attribute{Type: unix.NLA_F_NESTED | unix.NFTA_CHAIN_HOOK, Data: marshal(t,
						netlink.Attribute{Type: unix.NFTA_HOOK_HOOKNUM, Data: binary.BigEndian.AppendUint32(nil, hook)},
						netlink.Attribute{Type: unix.NFTA_HOOK_PRIORITY, Data: binary.BigEndian.AppendUint32(nil, uint32(c.Priority))})},
					netlink.Attribute{Type: unix.NFTA_CHAIN_TYPE, Data: []byte(string(c.Type) + "\x00")}))
			}
		case nftType(unix.NFT_MSG_GETRULE):
			handle := uint64(1)
			for _, c := range tb.Chains {
				for _, r := range c.Rules {
					if keep(r) {
						es, err := ruleExprs(tb.Family, r)
						if err != nil {
							t.Fatal(err)
						}
						m := ruleDumpMsg(t, req, c.Name, handle, es)
						m.Data = append(m.Data, marshal(t, netlink.Attribute{Type: unix.NFTA_RULE_USERDATA,
							Data: append(append([]byte{0, byte(len(r.Comment) + 1)}, r.Comment...), 0)})...)
						out = append(out, m)
					}
					handle++
				}
			}
		default:
			t.Errorf("unexpected request %#x", req.Header.Type)
			return nil
		}
		return dumpDone(req, out)
	}
}

func TestInspectModeOfEachRuleSet(t *testing.T) {
	all := func(intercept.Rule) bool { return true }
	guards := func(r intercept.Rule) bool { return r.Role == intercept.RoleGuard }
	for _, tc := range []struct {
		mode intercept.Mode
		keep func(intercept.Rule) bool
		want intercept.Mode
	}{
		{intercept.TProxy, all, intercept.TProxy},
		{intercept.Redirect, all, intercept.Redirect},
		// What RemoveIntercept leaves while connections drain.
		{intercept.TProxy, guards, ""},
		{intercept.Redirect, guards, ""},
	} {
		rs := ruleSet(t, tc.mode, intercept.IPv4, intercept.IPv6)
		k := &fakeKernel{t: t, get: fakeTables(t, rs, tc.keep)}
		s, err := inspect(k.conn())
		if err != nil {
			t.Fatal(err)
		}
		for i, ts := range s.Tables {
			if ts.Mode() != tc.want || ts.Intercepting() != (tc.want != "") {
				t.Errorf("%s %s: Mode() %q, Intercepting() %v; want %q", tc.mode, ts.Family, ts.Mode(), ts.Intercepting(), tc.want)
			}
			want := rs.Tables[i]
			if len(ts.Chains) != len(want.Chains) {
				t.Fatalf("%s %s: %d chains, want %d", tc.mode, ts.Family, len(ts.Chains), len(want.Chains))
			}
			for j, c := range ts.Chains {
				w := want.Chains[j]
				if c.Name != w.Name || c.Type != w.Type || c.Hook != w.Hook || c.Priority != w.Priority {
					t.Errorf("chain %+v, want %s %s %s %d", c, w.Name, w.Type, w.Hook, w.Priority)
				}
				var kept []intercept.Rule
				for _, r := range w.Rules {
					if tc.keep(r) {
						kept = append(kept, r)
					}
				}
				if len(c.Rules) != len(kept) {
					t.Fatalf("%s %s chain %s: %d rules, want %d", tc.mode, ts.Family, c.Name, len(c.Rules), len(kept))
				}
				for k, r := range c.Rules {
					if !r.Known || r.Rule != kept[k] {
						t.Errorf("%s %s chain %s: read back %+v, want %+v", tc.mode, ts.Family, c.Name, r, kept[k])
					}
				}
			}
		}
	}
}

func TestCommentOfBounded(t *testing.T) {
	for _, ud := range [][]byte{nil, {0}, {0, 5, 'a'}, {1, 200}, {1, 1, 'x', 0, 3, 'a', 'b', 0}} {
		_ = commentOf(ud) // must not panic on truncated TLVs
	}
	if got := commentOf([]byte{1, 1, 'x', 0, 3, 'a', 'b', 0}); got != "ab" {
		t.Errorf("comment %q, want ab", got)
	}
}

func FuzzParseRule(f *testing.F) {
	f.Add([]byte{2, 0, 0, 0, 4, 0, 1, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		_, _ = parseRule(netlink.Message{Data: data})
	})
}

func TestInspect(t *testing.T) {
	k := &fakeKernel{t: t}
	k.get = func(req netlink.Message) []netlink.Message {
		fam := req.Data[0]
		switch {
		case req.Header.Type == nftType(unix.NFT_MSG_GETTABLE) && fam == 2:
			return []netlink.Message{{
				Header: netlink.Header{Type: nftType(unix.NFT_MSG_NEWTABLE), Sequence: req.Header.Sequence},
				Data: append(nfgenmsg(2, 0), marshal(t,
					netlink.Attribute{Type: unix.NFTA_TABLE_NAME, Data: name},
					netlink.Attribute{Type: unix.NFTA_TABLE_FLAGS, Data: []byte{0, 0, 0, 2}},
					netlink.Attribute{Type: 7, Data: []byte{0, 0, 0x30, 0x39}},
				)...),
			}}
		case req.Header.Type == nftType(unix.NFT_MSG_GETTABLE):
			return ack(req, int(unix.ENOENT))
		case req.Header.Type == nftType(unix.NFT_MSG_GETCHAIN):
			return dumpDone(req, []netlink.Message{{
				Header: netlink.Header{Type: nftType(unix.NFT_MSG_NEWCHAIN), Sequence: req.Header.Sequence, Flags: netlink.Multi},
				Data: append(nfgenmsg(2, 0), marshal(t,
					netlink.Attribute{Type: unix.NFTA_CHAIN_TABLE, Data: name},
					netlink.Attribute{Type: unix.NFTA_CHAIN_NAME, Data: []byte("guard\x00")},
					netlink.Attribute{Type: unix.NLA_F_NESTED | unix.NFTA_CHAIN_HOOK, Data: marshal(t,
						netlink.Attribute{Type: 1, Data: []byte{0, 0, 0, 1}},
						netlink.Attribute{Type: 2, Data: binary.BigEndian.AppendUint32(nil, uint32(0xfffffff6))})},
					netlink.Attribute{Type: unix.NFTA_CHAIN_TYPE, Data: []byte("filter\x00")},
				)...),
			}})
		case req.Header.Type == nftType(unix.NFT_MSG_GETRULE):
			rs := ruleSet(t, intercept.Redirect, intercept.IPv4)
			es, _ := ruleExprs(intercept.IPv4, rs.Tables[0].Chains[1].Rules[0])
			return dumpDone(req, []netlink.Message{ruleDumpMsg(t, req, "guard", 4, es)})
		}
		t.Errorf("unexpected request %#x", req.Header.Type)
		return nil
	}
	s, err := inspect(k.conn())
	if err != nil {
		t.Fatal(err)
	}
	if len(s.Tables) != 2 || !s.Installed() {
		t.Fatalf("state %+v", s)
	}
	v4, v6 := s.Tables[0], s.Tables[1]
	if !v4.Exists || !v4.Owner || v4.OwnerPort != 12345 || v6.Exists {
		t.Errorf("tables: %+v / %+v", v4, v6)
	}
	if len(v4.Chains) != 1 || v4.Chains[0].Hook != intercept.HookInput || v4.Chains[0].Priority != -10 || len(v4.Chains[0].Rules) != 1 {
		t.Fatalf("chains: %+v", v4.Chains)
	}
	if v4.Intercepting() || v4.Chains[0].Rules[0].Rule.Action != intercept.ActionDrop {
		t.Errorf("guard only: Intercepting %v, rule %+v", v4.Intercepting(), v4.Chains[0].Rules[0])
	}
}

func TestProbeErrors(t *testing.T) {
	for errno, want := range map[unix.Errno]string{
		unix.EPERM:  "nf_tables not usable over netlink: operation not permitted (run as root or with CAP_NET_ADMIN)",
		unix.EINVAL: "load module nf_tables",
	} {
		k := &fakeKernel{t: t, get: func(req netlink.Message) []netlink.Message { return ack(req, int(errno)) }}
		err := probe(k.conn())
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%v: err = %v, want %q", errno, err, want)
		}
	}
	k := &fakeKernel{t: t, get: func(req netlink.Message) []netlink.Message {
		return []netlink.Message{{Header: netlink.Header{Type: nftType(unix.NFT_MSG_NEWGEN), Sequence: req.Header.Sequence}, Data: nfgenmsg(0, 0)}}
	}}
	if err := probe(k.conn()); err != nil {
		t.Errorf("probe: %v", err)
	}
}

func TestRemoveStaleLeavesOwnerTables(t *testing.T) {
	k := &fakeKernel{t: t}
	k.get = func(req netlink.Message) []netlink.Message {
		switch req.Header.Type {
		case nftType(unix.NFT_MSG_GETTABLE):
			flags := []byte{0, 0, 0, 0}
			if req.Data[0] == 10 {
				flags[3] = 2 // ip6 table owned by a live process
			}
			return []netlink.Message{{
				Header: netlink.Header{Type: nftType(unix.NFT_MSG_NEWTABLE), Sequence: req.Header.Sequence},
				Data: append(nfgenmsg(req.Data[0], 0), marshal(t,
					netlink.Attribute{Type: unix.NFTA_TABLE_NAME, Data: name},
					netlink.Attribute{Type: unix.NFTA_TABLE_FLAGS, Data: flags})...),
			}}
		default:
			return dumpDone(req, nil)
		}
	}
	removed, err := removeStale(k.conn(), "")
	if len(removed) != 1 || removed[0] != intercept.IPv4 {
		t.Errorf("removed %v, want [ip]", removed)
	}
	if !errors.Is(err, ErrOwnedByAnother) || !strings.Contains(err.Error(), "table ip6 acme-alpn-proxy") {
		t.Errorf("err = %v, want the ip6 table reported as owned", err)
	}
	if len(k.batches) != 1 {
		t.Fatalf("%d batches, want one for the ip table", len(k.batches))
	}
	checkMsgs(t, k.inner(0), []byte{2, 2}, tableMsgs(t, false)[:2])
}

func TestInstallRejectsBadRuleSets(t *testing.T) {
	rs := ruleSet(t, intercept.Redirect, intercept.IPv4)
	long := rs
	long.Tables = []intercept.Table{rs.Tables[0]}
	long.Tables[0].Chains = append([]intercept.Chain(nil), rs.Tables[0].Chains...)
	long.Tables[0].Chains[0].Rules = []intercept.Rule{rs.Tables[0].Chains[0].Rules[0]}
	long.Tables[0].Chains[0].Rules[0].Comment = strings.Repeat("x", 300)
	for name, bad := range map[string]intercept.RuleSet{
		"empty":        {},
		"long comment": long,
	} {
		k := &fakeKernel{t: t}
		if err := newBackend(k.conn(), Options{}).Install(bad); err == nil {
			t.Errorf("%s: Install accepted it", name)
		}
		if len(k.batches) != 0 {
			t.Errorf("%s: sent a batch", name)
		}
	}
}

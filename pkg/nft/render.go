package nft

import (
	"encoding/binary"
	"fmt"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/intercept"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Constants x/sys/unix does not have (include/uapi/linux/netfilter/nf_tables.h).
const (
	// tableFlagOwner is NFT_TABLE_F_OWNER (kernel ≥ 5.12): the table belongs
	// to the netlink socket that created it and dies with it.
	tableFlagOwner = 0x2
	// attrTableOwner is NFTA_TABLE_OWNER: the owning socket's netlink port id.
	attrTableOwner = 0x7
)

// msgKind says what a batch message does, so an error the kernel reports for
// it can be turned into a message that names the cause.
type msgKind int

const (
	kindBatchMarker msgKind = iota
	kindProbeTable          // NEWTABLE without flags, paired with a DELTABLE: ensures a stale table can be deleted
	kindDelTable
	kindNewTable // the table we keep; carries the owner flag when wanted
	kindNewChain
	kindNewRule
	kindDelRule
)

// msgInfo describes one message of a batch.
type msgInfo struct {
	kind   msgKind
	family intercept.Family
	chain  string
	rule   intercept.Rule // for kindNewRule
	handle uint64         // for kindDelRule
}

func (m msgInfo) String() string {
	switch m.kind {
	case kindProbeTable, kindDelTable:
		return fmt.Sprintf("replacing table %s %s", m.family, intercept.TableName)
	case kindNewTable:
		return fmt.Sprintf("creating table %s %s", m.family, intercept.TableName)
	case kindNewChain:
		return fmt.Sprintf("creating chain %s %s %s", m.family, intercept.TableName, m.chain)
	case kindNewRule:
		return fmt.Sprintf("adding rule to %s %s %s (%s)", m.family, intercept.TableName, m.chain, m.rule)
	case kindDelRule:
		return fmt.Sprintf("deleting rule handle %d from %s %s %s", m.handle, m.family, intercept.TableName, m.chain)
	}
	return "batch"
}

// batch is a list of nf_tables messages sent as one transaction.
type batch struct {
	msgs  []netlink.Message
	infos []msgInfo
}

func nftType(msg int) netlink.HeaderType {
	return netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | msg)
}

// nfgenmsg is the header every nfnetlink message starts with; res_id is
// big endian.
func nfgenmsg(family byte, resID uint16) []byte {
	return []byte{family, unix.NFNETLINK_V0, byte(resID >> 8), byte(resID)}
}

func nfproto(f intercept.Family) byte {
	if f == intercept.IPv6 {
		return unix.NFPROTO_IPV6
	}
	return unix.NFPROTO_IPV4
}

func familyOf(nfproto byte) (intercept.Family, bool) {
	switch nfproto {
	case unix.NFPROTO_IPV4:
		return intercept.IPv4, true
	case unix.NFPROTO_IPV6:
		return intercept.IPv6, true
	}
	return 0, false
}

func cstring(s string) []byte { return append([]byte(s), 0) }

func be32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }
func be64(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }

func (b *batch) add(typ netlink.HeaderType, flags netlink.HeaderFlags, family intercept.Family, attrs []netlink.Attribute, info msgInfo) error {
	data, err := netlink.MarshalAttributes(attrs)
	if err != nil {
		return err
	}
	b.msgs = append(b.msgs, netlink.Message{
		Header: netlink.Header{Type: typ, Flags: flags},
		Data:   append(nfgenmsg(nfproto(family), 0), data...),
	})
	b.infos = append(b.infos, info)
	return nil
}

// framed returns the messages between NFNL_MSG_BATCH_BEGIN and _END, which
// make the kernel apply all of them or none.
func (b *batch) framed() ([]netlink.Message, []msgInfo) {
	marker := func(t int) netlink.Message {
		return netlink.Message{
			Header: netlink.Header{Type: netlink.HeaderType(t), Flags: netlink.Request},
			Data:   nfgenmsg(unix.AF_UNSPEC, unix.NFNL_SUBSYS_NFTABLES),
		}
	}
	msgs := make([]netlink.Message, 0, len(b.msgs)+2)
	msgs = append(msgs, marker(unix.NFNL_MSG_BATCH_BEGIN))
	msgs = append(msgs, b.msgs...)
	msgs = append(msgs, marker(unix.NFNL_MSG_BATCH_END))
	infos := make([]msgInfo, 0, len(msgs))
	infos = append(infos, msgInfo{kind: kindBatchMarker})
	infos = append(infos, b.infos...)
	infos = append(infos, msgInfo{kind: kindBatchMarker})
	return msgs, infos
}

const (
	flagsCreate = netlink.Request | netlink.Acknowledge | netlink.Create
	// Echo makes the kernel send the new rule back with its handle, which
	// RemoveIntercept needs; Append keeps the rule order of the RuleSet.
	flagsNewRule = netlink.Request | netlink.Acknowledge | netlink.Create | netlink.Append | netlink.Echo
	flagsDelete  = netlink.Request | netlink.Acknowledge
)

// replaceTable adds "ensure the table exists, then delete it": a NEWTABLE
// without flags creates a missing table or leaves an existing one (stale
// plain or our own owner table) unchanged, so the DELTABLE never fails with
// ENOENT and aborts the batch. An owner table of another process makes the
// NEWTABLE fail with EPERM.
func (b *batch) replaceTable(f intercept.Family) error {
	name := netlink.Attribute{Type: unix.NFTA_TABLE_NAME, Data: cstring(intercept.TableName)}
	if err := b.add(nftType(unix.NFT_MSG_NEWTABLE), flagsCreate, f, []netlink.Attribute{name}, msgInfo{kind: kindProbeTable, family: f}); err != nil {
		return err
	}
	return b.add(nftType(unix.NFT_MSG_DELTABLE), flagsDelete, f, []netlink.Attribute{name}, msgInfo{kind: kindDelTable, family: f})
}

// installBatch renders rs as one transaction: each table is replaced, so a
// second Install swaps the rules atomically and a stale plain table left by
// a crashed run (which cannot become an owner table) goes away. Tables of
// the families in drop (installed before, not in rs) are deleted.
func installBatch(rs intercept.RuleSet, owner bool, drop ...intercept.Family) (*batch, error) {
	if len(rs.Tables) == 0 {
		return nil, fmt.Errorf("nftables: rule set has no table")
	}
	b := &batch{}
	seen := map[intercept.Family]bool{}
	for _, t := range rs.Tables {
		if t.Family != intercept.IPv4 && t.Family != intercept.IPv6 {
			return nil, fmt.Errorf("nftables: unknown address family %d", t.Family)
		}
		if seen[t.Family] {
			return nil, fmt.Errorf("nftables: two tables for family %s", t.Family)
		}
		seen[t.Family] = true
		if t.Name != intercept.TableName {
			return nil, fmt.Errorf("nftables: table name %q, want %q", t.Name, intercept.TableName)
		}
		if err := b.replaceTable(t.Family); err != nil {
			return nil, err
		}
		attrs := []netlink.Attribute{{Type: unix.NFTA_TABLE_NAME, Data: cstring(t.Name)}}
		if owner {
			attrs = append(attrs, netlink.Attribute{Type: unix.NFTA_TABLE_FLAGS, Data: be32(tableFlagOwner)})
		}
		if err := b.add(nftType(unix.NFT_MSG_NEWTABLE), flagsCreate|netlink.Excl, t.Family, attrs, msgInfo{kind: kindNewTable, family: t.Family}); err != nil {
			return nil, err
		}
		for _, c := range t.Chains {
			if err := b.addChain(t, c); err != nil {
				return nil, err
			}
		}
		for _, c := range t.Chains {
			for _, r := range c.Rules {
				if err := b.addRule(t, c, r); err != nil {
					return nil, err
				}
			}
		}
	}
	for _, f := range drop {
		if !seen[f] {
			if err := b.replaceTable(f); err != nil {
				return nil, err
			}
		}
	}
	return b, nil
}

func hookNum(h intercept.Hook) (uint32, error) {
	switch h {
	case intercept.HookPrerouting:
		return unix.NF_INET_PRE_ROUTING, nil
	case intercept.HookInput:
		return unix.NF_INET_LOCAL_IN, nil
	case intercept.HookOutput:
		return unix.NF_INET_LOCAL_OUT, nil
	}
	return 0, fmt.Errorf("nftables: unknown hook %q", h)
}

func (b *batch) addChain(t intercept.Table, c intercept.Chain) error {
	hook, err := hookNum(c.Hook)
	if err != nil {
		return err
	}
	if c.Type != intercept.ChainNAT && c.Type != intercept.ChainFilter && c.Type != intercept.ChainRoute {
		return fmt.Errorf("nftables: unknown chain type %q", c.Type)
	}
	if c.Name == "" || len(c.Name) >= unix.NFT_NAME_MAXLEN {
		return fmt.Errorf("nftables: bad chain name %q", c.Name)
	}
	hookAttrs, err := netlink.MarshalAttributes([]netlink.Attribute{
		{Type: unix.NFTA_HOOK_HOOKNUM, Data: be32(hook)},
		{Type: unix.NFTA_HOOK_PRIORITY, Data: be32(uint32(c.Priority))},
	})
	if err != nil {
		return err
	}
	return b.add(nftType(unix.NFT_MSG_NEWCHAIN), flagsCreate, t.Family, []netlink.Attribute{
		{Type: unix.NFTA_CHAIN_TABLE, Data: cstring(t.Name)},
		{Type: unix.NFTA_CHAIN_NAME, Data: cstring(c.Name)},
		{Type: unix.NLA_F_NESTED | unix.NFTA_CHAIN_HOOK, Data: hookAttrs},
		{Type: unix.NFTA_CHAIN_TYPE, Data: cstring(string(c.Type))},
	}, msgInfo{kind: kindNewChain, family: t.Family, chain: c.Name})
}

// maxComment keeps the comment within one userdata TLV (length is a byte,
// and the kernel caps userdata at NFT_USERDATA_MAXLEN = 256).
const maxComment = 250

func (b *batch) addRule(t intercept.Table, c intercept.Chain, r intercept.Rule) error {
	exprs, err := ruleExprs(t.Family, r)
	if err != nil {
		return fmt.Errorf("nftables: rule %q: %w", r, err)
	}
	if len(r.Comment) > maxComment {
		return fmt.Errorf("nftables: rule comment longer than %d bytes", maxComment)
	}
	list := make([]netlink.Attribute, len(exprs))
	for i, e := range exprs {
		data, err := expr.Marshal(nfproto(t.Family), e)
		if err != nil {
			return err
		}
		list[i] = netlink.Attribute{Type: unix.NLA_F_NESTED | unix.NFTA_LIST_ELEM, Data: data}
	}
	listData, err := netlink.MarshalAttributes(list)
	if err != nil {
		return err
	}
	attrs := []netlink.Attribute{
		{Type: unix.NFTA_RULE_TABLE, Data: cstring(t.Name)},
		{Type: unix.NFTA_RULE_CHAIN, Data: cstring(c.Name)},
		{Type: unix.NLA_F_NESTED | unix.NFTA_RULE_EXPRESSIONS, Data: listData},
	}
	if r.Comment != "" {
		// The TLV libnftables reads, so `nft list` shows comment "...".
		attrs = append(attrs, netlink.Attribute{Type: unix.NFTA_RULE_USERDATA,
			Data: userdata.AppendString(nil, userdata.TypeComment, r.Comment)})
	}
	return b.add(nftType(unix.NFT_MSG_NEWRULE), flagsNewRule, t.Family, attrs,
		msgInfo{kind: kindNewRule, family: t.Family, chain: c.Name, rule: r})
}

// Bit masks and values the matches compare against.
const (
	tcpFlagsMask   = 0x17 // fin|syn|rst|ack
	tcpFlagSyn     = 0x02
	ctStatusDstNAT = 0x20 // IPS_DST_NAT
	ctStateNew     = 0x08 // NF_CT_STATE_BIT(IP_CT_NEW)
)

// loName is "lo" as the 16-byte, NUL-padded interface name meta iifname loads.
var loName = func() []byte { b := make([]byte, unix.IFNAMSIZ); copy(b, "lo"); return b }()

// ruleExprs returns the expressions for r, in the order nft itself emits
// them, so `nft list` prints the rule the way the intercept package shows it.
func ruleExprs(f intercept.Family, r intercept.Rule) ([]expr.Any, error) {
	if r.IsMarkRule() {
		return markExprs(r)
	}
	var es []expr.Any
	if r.NotLoopback {
		es = append(es,
			&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: loName},
		)
	}
	if r.LocalOnly {
		es = append(es,
			&expr.Fib{Register: 1, FlagDADDR: true, ResultADDRTYPE: true},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binary.NativeEndian.AppendUint32(nil, unix.RTN_LOCAL)},
		)
	}
	if r.DPort == 0 {
		return nil, fmt.Errorf("no destination port")
	}
	es = append(es,
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binary.BigEndian.AppendUint16(nil, r.DPort)},
	)
	if r.SynOnly {
		es = append(es,
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 13, Len: 1},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 1, Mask: []byte{tcpFlagsMask}, Xor: []byte{0}},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{tcpFlagSyn}},
		)
	}
	if r.NotDNAT {
		// ct status is a host-endian u32 in the register.
		es = append(es,
			&expr.Ct{Register: 1, Key: expr.CtKeySTATUS},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
				Mask: binary.NativeEndian.AppendUint32(nil, ctStatusDstNAT), Xor: make([]byte, 4)},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: make([]byte, 4)},
		)
	}
	switch r.Action {
	case intercept.ActionRedirect, intercept.ActionTProxy:
		if r.ToPort == 0 {
			return nil, fmt.Errorf("no target port")
		}
		// The port is loaded big endian, 2 bytes, as nft does for `to :PORT`.
		es = append(es, &expr.Immediate{Register: 1, Data: binary.BigEndian.AppendUint16(nil, r.ToPort)})
		if r.Action == intercept.ActionRedirect {
			es = append(es, &expr.Redir{RegisterProtoMin: 1, Flags: unix.NF_NAT_RANGE_PROTO_SPECIFIED})
		} else {
			es = append(es, &expr.TProxy{Family: nfproto(f), TableFamily: nfproto(f), RegPort: 1})
		}
	case intercept.ActionDrop:
		es = append(es, &expr.Verdict{Kind: expr.VerdictDrop})
	case intercept.ActionClaimNAT:
		// dnat to ip daddr: an identity binding (the kernel adds the
		// map-ips flag itself when an address register is given).
		off, n := daddrOffset(f)
		es = append(es,
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: n},
			&expr.NAT{Type: expr.NATTypeDestNAT, Family: uint32(nfproto(f)), RegAddrMin: 1, RegAddrMax: 1},
		)
	default:
		return nil, fmt.Errorf("unknown action %d", r.Action)
	}
	return es, nil
}

// ctDirReply is IP_CT_DIR_REPLY, as ct direction loads it (one byte).
const ctDirReply = 1

// markExprs renders the return-path rules. Marks are host-endian u32s in
// the register; "x | M" and "x & ~M" are one bitwise each: (x & mask) ^ xor.
func markExprs(r intercept.Rule) ([]expr.Any, error) {
	m := r.Mark
	if m == 0 {
		return nil, fmt.Errorf("no mark")
	}
	ne := func(v uint32) []byte { return binary.NativeEndian.AppendUint32(nil, v) }
	hasBits := func(load expr.Any) []expr.Any {
		return []expr.Any{load,
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: ne(m), Xor: ne(0)},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ne(m)},
		}
	}
	var es []expr.Any
	switch r.Action {
	case intercept.ActionSaveMark:
		es = append(hasBits(&expr.Meta{Key: expr.MetaKeyMARK, Register: 1}),
			&expr.Ct{Register: 1, Key: expr.CtKeyMARK},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: ne(^m), Xor: ne(m)},
			&expr.Ct{Register: 1, SourceRegister: true, Key: expr.CtKeyMARK},
		)
	case intercept.ActionClearMark:
		es = hasBits(&expr.Meta{Key: expr.MetaKeyMARK, Register: 1})
		switch r.When {
		case intercept.WhenNew:
			es = append(es, ctBitSet(expr.CtKeySTATE, ctStateNew)...)
		case intercept.WhenDNAT:
			es = append(es, ctBitSet(expr.CtKeySTATUS, ctStatusDstNAT)...)
		}
		es = append(es,
			&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: ne(^m), Xor: ne(0)},
			&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 1},
		)
	case intercept.ActionRestoreMark:
		es = append(es,
			&expr.Ct{Register: 1, Key: expr.CtKeyDIRECTION},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{ctDirReply}},
		)
		es = append(es, hasBits(&expr.Ct{Register: 1, Key: expr.CtKeyMARK})...)
		es = append(es,
			&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: ne(^m), Xor: ne(m)},
			&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 1},
		)
	}
	return es, nil
}

// ctBitSet matches ct key & bit != 0 (ct state and ct status are
// host-endian u32s in the register), as nft renders `ct state new`.
func ctBitSet(key expr.CtKey, bit uint32) []expr.Any {
	return []expr.Any{
		&expr.Ct{Register: 1, Key: key},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binary.NativeEndian.AppendUint32(nil, bit), Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)},
	}
}

// daddrOffset is where the destination address sits in the network header.
func daddrOffset(f intercept.Family) (offset, length uint32) {
	if f == intercept.IPv6 {
		return 24, 16
	}
	return 16, 4
}

// deleteRulesBatch deletes rules by handle.
func deleteRulesBatch(refs []ruleRef) (*batch, error) {
	b := &batch{}
	for _, r := range refs {
		err := b.add(nftType(unix.NFT_MSG_DELRULE), flagsDelete, r.family, []netlink.Attribute{
			{Type: unix.NFTA_RULE_TABLE, Data: cstring(intercept.TableName)},
			{Type: unix.NFTA_RULE_CHAIN, Data: cstring(r.chain)},
			{Type: unix.NFTA_RULE_HANDLE, Data: be64(r.handle)},
		}, msgInfo{kind: kindDelRule, family: r.family, chain: r.chain, handle: r.handle})
		if err != nil {
			return nil, err
		}
	}
	return b, nil
}

// removeTablesBatch deletes our table of each family; a missing table is
// not an error (see replaceTable).
func removeTablesBatch(fams []intercept.Family) (*batch, error) {
	b := &batch{}
	for _, f := range fams {
		if err := b.replaceTable(f); err != nil {
			return nil, err
		}
	}
	return b, nil
}

// ruleRef identifies an installed rule.
type ruleRef struct {
	family intercept.Family
	chain  string
	handle uint64
	role   intercept.Role
}

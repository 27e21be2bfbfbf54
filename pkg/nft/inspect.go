package nft

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/intercept"
	"github.com/google/nftables/expr"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// State is what the kernel has of our tables, read by any process (owner
// tables are readable by every socket).
type State struct {
	Tables []TableState // IPv4, then IPv6
}

// Installed reports whether any of our tables exists.
func (s State) Installed() bool {
	for _, t := range s.Tables {
		if t.Exists {
			return true
		}
	}
	return false
}

// TableState describes our table of one family.
type TableState struct {
	Family intercept.Family
	Exists bool
	// Owner: the table has NFT_TABLE_F_OWNER, so a live process holds it
	// and the kernel deletes it when that process exits.
	Owner bool
	// OwnerPort is the owning socket's netlink port id; Open binds it to the
	// owner's PID when that id is free.
	OwnerPort uint32
	Chains    []ChainState
}

// Mode is the interception mode the table's rules implement: Redirect if a
// rule redirects, TProxy if one uses tproxy, "" if neither (e.g. after
// RemoveIntercept, while guards keep in-flight connections alive).
func (t TableState) Mode() intercept.Mode {
	for _, c := range t.Chains {
		for _, r := range c.Rules {
			if r.Known && r.Rule.Action == intercept.ActionRedirect {
				return intercept.Redirect
			}
			if r.Known && r.Rule.Action == intercept.ActionTProxy {
				return intercept.TProxy
			}
		}
	}
	return ""
}

// Intercepting reports whether the table takes new connections.
func (t TableState) Intercepting() bool { return t.Mode() != "" }

// Instance is the instance id the table's rules carry in their comments
// (intercept.Config.Instance): "" for untagged rules; ok is false if no
// rule of ours carries a comment of ours, or two carry different ids.
func (t TableState) Instance() (id string, ok bool) {
	for _, c := range t.Chains {
		for _, r := range c.Rules {
			rid, ours := intercept.ParseTag(r.Rule.Comment)
			if !r.Known || !ours || (ok && rid != id) {
				return "", false
			}
			id, ok = rid, true
		}
	}
	return id, ok
}

// ChainState is one base chain of our table.
type ChainState struct {
	Name     string
	Type     intercept.ChainType
	Hook     intercept.Hook // empty if the hook is not one we use
	Priority int32
	Rules    []RuleState
}

// RuleState is one rule as the kernel has it.
type RuleState struct {
	Handle uint64
	// Known: the expressions are ones this package writes, decoded into Rule
	// (whose String reads like the rule). Otherwise Exprs names them.
	Known bool
	Rule  intercept.Rule
	Exprs []string
}

// Inspect reads our tables of both families from the kernel in the current
// network namespace. It changes nothing.
func Inspect() (State, error) {
	c, err := dial()
	if err != nil {
		return State{}, err
	}
	defer c.Close()
	return inspect(c)
}

func inspect(c nlConn) (State, error) {
	var s State
	for _, f := range []intercept.Family{intercept.IPv4, intercept.IPv6} {
		t, err := inspectTable(c, f)
		if err != nil {
			return State{}, err
		}
		s.Tables = append(s.Tables, t)
	}
	return s, nil
}

func request(typ int, flags netlink.HeaderFlags, f intercept.Family, attrs []netlink.Attribute) (netlink.Message, error) {
	data, err := netlink.MarshalAttributes(attrs)
	if err != nil {
		return netlink.Message{}, err
	}
	return netlink.Message{
		Header: netlink.Header{Type: nftType(typ), Flags: flags},
		Data:   append(nfgenmsg(nfproto(f), 0), data...),
	}, nil
}

// nlError maps errors of read requests.
func nlError(what string, err error) error {
	err = cleanErr(err)
	if errors.Is(err, unix.EPERM) {
		return permissionError(err)
	}
	return fmt.Errorf("nftables: %s: %w", what, err)
}

func inspectTable(c nlConn, f intercept.Family) (TableState, error) {
	ts := TableState{Family: f}
	req, err := request(unix.NFT_MSG_GETTABLE, netlink.Request, f, []netlink.Attribute{
		{Type: unix.NFTA_TABLE_NAME, Data: cstring(intercept.TableName)},
	})
	if err != nil {
		return ts, err
	}
	replies, err := c.Execute(req)
	if errors.Is(err, unix.ENOENT) {
		return ts, nil
	}
	if err != nil {
		return ts, nlError("reading table "+f.String()+" "+intercept.TableName, err)
	}
	for _, m := range replies {
		if m.Header.Type != nftType(unix.NFT_MSG_NEWTABLE) || len(m.Data) < 4 {
			continue
		}
		ad, err := netlink.NewAttributeDecoder(m.Data[4:])
		if err != nil {
			return ts, err
		}
		ad.ByteOrder = binary.BigEndian
		for ad.Next() {
			switch ad.Type() {
			case unix.NFTA_TABLE_FLAGS:
				ts.Owner = ad.Uint32()&tableFlagOwner != 0
			case attrTableOwner:
				ts.OwnerPort = ad.Uint32()
			}
		}
		if err := ad.Err(); err != nil {
			return ts, fmt.Errorf("nftables: decoding table: %w", err)
		}
		ts.Exists = true
	}
	if !ts.Exists {
		return ts, nil
	}
	chains, err := dumpChains(c, f)
	if err != nil {
		return ts, err
	}
	rules, err := dumpRules(c, f)
	if err != nil {
		return ts, err
	}
	for _, ch := range chains {
		for _, r := range rules {
			if r.chain == ch.Name {
				ch.Rules = append(ch.Rules, r.state)
			}
		}
		ts.Chains = append(ts.Chains, ch)
	}
	return ts, nil
}

// dump runs a dump request for our table and returns the replies of type
// want, with their attributes after the nfgenmsg header.
func dump(c nlConn, typ, want int, f intercept.Family, tableAttr uint16) ([][]byte, error) {
	req, err := request(typ, netlink.Request|netlink.Dump, f, []netlink.Attribute{
		{Type: tableAttr, Data: cstring(intercept.TableName)},
	})
	if err != nil {
		return nil, err
	}
	replies, err := c.Execute(req)
	if errors.Is(err, unix.ENOENT) {
		return nil, nil
	}
	if err != nil {
		return nil, nlError("listing "+f.String()+" "+intercept.TableName, err)
	}
	var out [][]byte
	for _, m := range replies {
		if m.Header.Type == nftType(want) && len(m.Data) >= 4 && m.Data[0] == nfproto(f) {
			out = append(out, m.Data[4:])
		}
	}
	return out, nil
}

func dumpChains(c nlConn, f intercept.Family) ([]ChainState, error) {
	msgs, err := dump(c, unix.NFT_MSG_GETCHAIN, unix.NFT_MSG_NEWCHAIN, f, unix.NFTA_CHAIN_TABLE)
	if err != nil {
		return nil, err
	}
	var chains []ChainState
	for _, data := range msgs {
		ch, table, err := parseChain(data)
		if err != nil {
			return nil, fmt.Errorf("nftables: decoding chain: %w", err)
		}
		if table == intercept.TableName {
			chains = append(chains, ch)
		}
	}
	return chains, nil
}

func parseChain(data []byte) (ChainState, string, error) {
	var ch ChainState
	var table string
	ad, err := netlink.NewAttributeDecoder(data)
	if err != nil {
		return ch, "", err
	}
	ad.ByteOrder = binary.BigEndian
	for ad.Next() {
		switch ad.Type() {
		case unix.NFTA_CHAIN_TABLE:
			table = ad.String()
		case unix.NFTA_CHAIN_NAME:
			ch.Name = ad.String()
		case unix.NFTA_CHAIN_TYPE:
			ch.Type = intercept.ChainType(ad.String())
		case unix.NFTA_CHAIN_HOOK:
			ad.Nested(func(nad *netlink.AttributeDecoder) error {
				for nad.Next() {
					switch nad.Type() {
					case unix.NFTA_HOOK_HOOKNUM:
						switch nad.Uint32() {
						case unix.NF_INET_PRE_ROUTING:
							ch.Hook = intercept.HookPrerouting
						case unix.NF_INET_LOCAL_IN:
							ch.Hook = intercept.HookInput
						case unix.NF_INET_LOCAL_OUT:
							ch.Hook = intercept.HookOutput
						}
					case unix.NFTA_HOOK_PRIORITY:
						ch.Priority = int32(nad.Uint32())
					}
				}
				return nil
			})
		}
	}
	return ch, table, ad.Err()
}

// parsedRule is a rule from a NEWRULE message (dump reply or echo).
type parsedRule struct {
	table  string
	chain  string
	handle uint64
	state  RuleState
}

func dumpRules(c nlConn, f intercept.Family) ([]parsedRule, error) {
	msgs, err := dump(c, unix.NFT_MSG_GETRULE, unix.NFT_MSG_NEWRULE, f, unix.NFTA_RULE_TABLE)
	if err != nil {
		return nil, err
	}
	var rules []parsedRule
	for _, data := range msgs {
		r, err := parseRuleAttrs(nfproto(f), data)
		if err != nil {
			return nil, fmt.Errorf("nftables: decoding rule: %w", err)
		}
		if r.table == intercept.TableName {
			rules = append(rules, r)
		}
	}
	return rules, nil
}

func parseRule(m netlink.Message) (parsedRule, error) {
	if len(m.Data) < 4 {
		return parsedRule{}, fmt.Errorf("short rule message")
	}
	return parseRuleAttrs(m.Data[0], m.Data[4:])
}

func parseRuleAttrs(fam byte, data []byte) (parsedRule, error) {
	var r parsedRule
	var exprs []expr.Any
	var names []string
	var comment string
	ad, err := netlink.NewAttributeDecoder(data)
	if err != nil {
		return r, err
	}
	ad.ByteOrder = binary.BigEndian
	for ad.Next() {
		switch ad.Type() {
		case unix.NFTA_RULE_TABLE:
			r.table = ad.String()
		case unix.NFTA_RULE_CHAIN:
			r.chain = ad.String()
		case unix.NFTA_RULE_HANDLE:
			r.handle = ad.Uint64()
		case unix.NFTA_RULE_USERDATA:
			comment = commentOf(ad.Bytes())
		case unix.NFTA_RULE_EXPRESSIONS:
			ad.Nested(func(lad *netlink.AttributeDecoder) error {
				for lad.Next() {
					name, e, err := parseExpr(fam, lad.Bytes())
					if err != nil {
						return err
					}
					names = append(names, name)
					exprs = append(exprs, e)
				}
				return nil
			})
		}
	}
	if err := ad.Err(); err != nil {
		return r, err
	}
	r.state.Handle = r.handle
	r.state.Exprs = names
	if rule, ok := decodeRule(exprs); ok {
		rule.Comment = comment
		r.state.Known, r.state.Rule = true, rule
	}
	return r, nil
}

// parseExpr decodes one NFTA_LIST_ELEM; e is nil for expression types this
// package never writes.
func parseExpr(fam byte, data []byte) (string, expr.Any, error) {
	ad, err := netlink.NewAttributeDecoder(data)
	if err != nil {
		return "", nil, err
	}
	var name string
	var body []byte
	for ad.Next() {
		switch ad.Type() {
		case unix.NFTA_EXPR_NAME:
			name = ad.String()
		case unix.NFTA_EXPR_DATA:
			body = ad.Bytes()
		}
	}
	if err := ad.Err(); err != nil {
		return "", nil, err
	}
	var e expr.Any
	switch name {
	case "meta":
		e = &expr.Meta{}
	case "cmp":
		e = &expr.Cmp{}
	case "payload":
		e = &expr.Payload{}
	case "bitwise":
		e = &expr.Bitwise{}
	case "ct":
		e = &expr.Ct{}
	case "fib":
		e = &expr.Fib{}
	case "immediate":
		e = &expr.Immediate{}
	case "redir":
		e = &expr.Redir{}
	case "nat":
		e = &expr.NAT{}
	case "tproxy":
		// v0.3.0 decodes NFTA_TPROXY_FAMILY as a u8 but it is a u32.
		tp, err := parseTProxy(body)
		return name, tp, err
	default:
		return name, nil, nil
	}
	if err := expr.Unmarshal(fam, body, e); err != nil {
		return "", nil, fmt.Errorf("expression %s: %w", name, err)
	}
	// A verdict is an immediate into the verdict register.
	if imm, ok := e.(*expr.Immediate); ok && imm.Register == unix.NFT_REG_VERDICT {
		v := &expr.Verdict{}
		if err := expr.Unmarshal(fam, body, v); err != nil {
			return "", nil, fmt.Errorf("verdict: %w", err)
		}
		e = v
	}
	return name, e, nil
}

func parseTProxy(body []byte) (*expr.TProxy, error) {
	ad, err := netlink.NewAttributeDecoder(body)
	if err != nil {
		return nil, err
	}
	ad.ByteOrder = binary.BigEndian
	e := &expr.TProxy{}
	for ad.Next() {
		switch ad.Type() {
		case expr.NFTA_TPROXY_FAMILY:
			e.Family = byte(ad.Uint32())
		case expr.NFTA_TPROXY_REG_ADDR:
			e.RegAddr = ad.Uint32()
		case expr.NFTA_TPROXY_REG_PORT:
			e.RegPort = ad.Uint32()
		}
	}
	if err := ad.Err(); err != nil {
		return nil, fmt.Errorf("expression tproxy: %w", err)
	}
	return e, nil
}

// commentOf reads the comment TLV (type 0) libnftables stores in a rule's
// userdata; malformed data yields "".
func commentOf(ud []byte) string {
	for len(ud) >= 2 {
		typ, n := ud[0], int(ud[1])
		if len(ud) < 2+n {
			return ""
		}
		if typ == 0 {
			s, _, _ := bytes.Cut(ud[2:2+n], []byte{0})
			return string(s)
		}
		ud = ud[2+n:]
	}
	return ""
}

// decodeRule is the inverse of ruleExprs: it reads exprs back into a Rule
// if they are exactly what ruleExprs writes.
func decodeRule(es []expr.Any) (intercept.Rule, bool) {
	if r, ok := decodeMarkRule(es); ok {
		return r, true
	}
	var r intercept.Rule
	p := exprParser{es: es}
	if p.match(
		func(e expr.Any) bool { m, ok := e.(*expr.Meta); return ok && m.Key == expr.MetaKeyIIFNAME },
		func(e expr.Any) bool {
			c, ok := e.(*expr.Cmp)
			return ok && c.Op == expr.CmpOpNeq && bytes.Equal(c.Data, loName)
		},
	) {
		r.NotLoopback = true
	}
	if p.match(
		func(e expr.Any) bool {
			f, ok := e.(*expr.Fib)
			return ok && *f == expr.Fib{Register: 1, FlagDADDR: true, ResultADDRTYPE: true}
		},
		func(e expr.Any) bool { return cmpEq(e, binary.NativeEndian.AppendUint32(nil, unix.RTN_LOCAL)) },
	) {
		r.LocalOnly = true
	}
	var port uint16
	if !p.match(
		func(e expr.Any) bool { m, ok := e.(*expr.Meta); return ok && m.Key == expr.MetaKeyL4PROTO },
		func(e expr.Any) bool { return cmpEq(e, []byte{unix.IPPROTO_TCP}) },
		func(e expr.Any) bool { return payloadTH(e, 2, 2) },
		func(e expr.Any) bool { return cmpPort(e, &port) },
	) {
		return r, false
	}
	r.DPort = port
	if p.match(
		func(e expr.Any) bool { return payloadTH(e, 13, 1) },
		func(e expr.Any) bool { return bitwiseMask(e, []byte{tcpFlagsMask}) },
		func(e expr.Any) bool { return cmpEq(e, []byte{tcpFlagSyn}) },
	) {
		r.SynOnly = true
	}
	if p.match(
		func(e expr.Any) bool { c, ok := e.(*expr.Ct); return ok && c.Key == expr.CtKeySTATUS },
		func(e expr.Any) bool { return bitwiseMask(e, binary.NativeEndian.AppendUint32(nil, ctStatusDstNAT)) },
		func(e expr.Any) bool { return cmpEq(e, make([]byte, 4)) },
	) {
		r.NotDNAT = true
	}
	switch {
	case p.match(
		func(e expr.Any) bool { return immPort(e, &port) },
		func(e expr.Any) bool { x, ok := e.(*expr.Redir); return ok && x.RegisterProtoMin == 1 },
	):
		r.Action, r.ToPort, r.Role = intercept.ActionRedirect, port, intercept.RoleIntercept
	case p.match(
		func(e expr.Any) bool { return immPort(e, &port) },
		func(e expr.Any) bool { x, ok := e.(*expr.TProxy); return ok && x.RegPort == 1 && x.RegAddr == 0 },
	):
		r.Action, r.ToPort, r.Role = intercept.ActionTProxy, port, intercept.RoleIntercept
	case p.match(
		func(e expr.Any) bool { v, ok := e.(*expr.Verdict); return ok && v.Kind == expr.VerdictDrop },
	):
		r.Action, r.Role = intercept.ActionDrop, intercept.RoleGuard
	case p.match(
		func(e expr.Any) bool {
			x, ok := e.(*expr.Payload)
			return ok && x.Base == expr.PayloadBaseNetworkHeader && x.DestRegister == 1 &&
				((x.Offset == 16 && x.Len == 4) || (x.Offset == 24 && x.Len == 16))
		},
		func(e expr.Any) bool {
			x, ok := e.(*expr.NAT)
			return ok && x.Type == expr.NATTypeDestNAT && x.RegAddrMin == 1 && x.RegProtoMin == 0
		},
	):
		r.Action, r.Role = intercept.ActionClaimNAT, intercept.RoleIntercept
	default:
		return r, false
	}
	return r, p.done()
}

// decodeMarkRule recognizes the return-path rules by rendering each kind
// for the mark the rule tests (its first bitwise mask) and comparing.
func decodeMarkRule(es []expr.Any) (intercept.Rule, bool) {
	var mark uint32
	for _, e := range es {
		if b, ok := e.(*expr.Bitwise); ok && len(b.Mask) == 4 {
			mark = binary.NativeEndian.Uint32(b.Mask)
			break
		}
	}
	if mark == 0 {
		return intercept.Rule{}, false
	}
	for _, a := range []intercept.Action{intercept.ActionSaveMark, intercept.ActionClearMark, intercept.ActionRestoreMark} {
		for _, when := range []intercept.ConnCond{intercept.Always, intercept.WhenNew, intercept.WhenDNAT} {
			r := intercept.Rule{Role: intercept.RoleReturn, Action: a, Mark: mark, When: when}
			want, err := markExprs(r)
			if err == nil && sameExprs(es, want) {
				return r, true
			}
		}
	}
	return intercept.Rule{}, false
}

func sameExprs(a, b []expr.Any) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		// v0.3.0 decodes "ct set" as a load: compare what it keeps.
		if ca, ok := a[i].(*expr.Ct); ok {
			if cb, ok := b[i].(*expr.Ct); !ok || ca.Key != cb.Key {
				return false
			}
			continue
		}
		x, err1 := expr.Marshal(unix.NFPROTO_IPV4, a[i])
		y, err2 := expr.Marshal(unix.NFPROTO_IPV4, b[i])
		if err1 != nil || err2 != nil || !bytes.Equal(x, y) {
			return false
		}
	}
	return true
}

type exprParser struct {
	es  []expr.Any
	pos int
}

// match consumes len(preds) expressions if each satisfies its predicate.
func (p *exprParser) match(preds ...func(expr.Any) bool) bool {
	if p.pos+len(preds) > len(p.es) {
		return false
	}
	for i, pred := range preds {
		if p.es[p.pos+i] == nil || !pred(p.es[p.pos+i]) {
			return false
		}
	}
	p.pos += len(preds)
	return true
}

func (p *exprParser) done() bool { return p.pos == len(p.es) }

func cmpEq(e expr.Any, want []byte) bool {
	c, ok := e.(*expr.Cmp)
	return ok && c.Op == expr.CmpOpEq && bytes.Equal(c.Data, want)
}

func cmpPort(e expr.Any, port *uint16) bool {
	c, ok := e.(*expr.Cmp)
	if !ok || c.Op != expr.CmpOpEq || len(c.Data) != 2 {
		return false
	}
	*port = binary.BigEndian.Uint16(c.Data)
	return true
}

func payloadTH(e expr.Any, off, n uint32) bool {
	p, ok := e.(*expr.Payload)
	return ok && p.Base == expr.PayloadBaseTransportHeader && p.Offset == off && p.Len == n
}

func bitwiseMask(e expr.Any, mask []byte) bool {
	b, ok := e.(*expr.Bitwise)
	return ok && bytes.Equal(b.Mask, mask) && bytes.Equal(b.Xor, make([]byte, len(mask)))
}

func immPort(e expr.Any, port *uint16) bool {
	i, ok := e.(*expr.Immediate)
	if !ok || i.Register != 1 || len(i.Data) != 2 {
		return false
	}
	*port = binary.BigEndian.Uint16(i.Data)
	return true
}

// Probe checks that nf_tables can be driven over netlink here: the
// subsystem exists and we may use it. Used to pick a backend.
func Probe() error {
	c, err := dial()
	if err != nil {
		return err
	}
	defer c.Close()
	return probe(c)
}

func probe(c nlConn) error {
	req := netlink.Message{
		Header: netlink.Header{Type: nftType(unix.NFT_MSG_GETGEN), Flags: netlink.Request},
		Data:   nfgenmsg(unix.AF_UNSPEC, 0),
	}
	_, err := c.Execute(req)
	err = cleanErr(err)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.EPERM):
		return permissionError(err)
	case errors.Is(err, unix.EINVAL), errors.Is(err, unix.EOPNOTSUPP):
		return fmt.Errorf("nf_tables not usable over netlink: %w (kernel without nf_tables; load module nf_tables)", err)
	}
	return fmt.Errorf("nf_tables not usable over netlink: %w", err)
}

// RemoveStale deletes our plain (non-owner) tables, which a run on a kernel
// without owner tables leaves behind if it was killed. Owner tables belong
// to a live process and are left alone: the error then wraps
// ErrOwnedByAnother. It returns the families whose table it deleted.
//
// A non-empty instance deletes only tables whose rules all carry that
// instance's tag (intercept.Config.Instance): a guardian removing its dead
// proxy's tables leaves a newer instance's alone.
func RemoveStale(instance string) ([]intercept.Family, error) {
	c, err := dial()
	if err != nil {
		return nil, err
	}
	defer c.Close()
	return removeStale(c, instance)
}

func removeStale(c nlConn, instance string) ([]intercept.Family, error) {
	s, err := inspect(c)
	if err != nil {
		return nil, err
	}
	var removed []intercept.Family
	var errs []error
	for _, t := range s.Tables {
		id, tagged := t.Instance()
		switch {
		case !t.Exists:
		case instance != "" && (!tagged || id != instance):
		case t.Owner:
			errs = append(errs, ownedError(t.Family))
		default:
			// One batch per table, so an owner table appearing meanwhile
			// does not block deleting the other.
			bt, err := removeTablesBatch([]intercept.Family{t.Family})
			if err != nil {
				return removed, err
			}
			res, err := exchange(c, bt)
			if err == nil {
				err = batchError(res, false)
			}
			if err != nil {
				errs = append(errs, err)
				continue
			}
			removed = append(removed, t.Family)
		}
	}
	return removed, errors.Join(errs...)
}

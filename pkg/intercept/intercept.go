// Package intercept describes, as plain values, the netfilter rules that send
// new incoming TCP connections for the web server's port to the proxy.
//
// Both backends (pkg/nft over netlink, pkg/compat through iptables) render the
// same RuleSet, so unit tests can compare what each would install without
// root, and the lifecycle in cmd/ never needs to know which backend it has.
//
//	rs, err := intercept.Build(intercept.Config{
//		Mode: intercept.TProxy, Port: 443, ListenPort: 21443,
//		Families: []intercept.Family{intercept.IPv4, intercept.IPv6},
//	})
package intercept

import (
	"fmt"
	"strings"
)

// TableName names our dedicated nftables table, one per address family
// (`nft list table acme-alpn-proxy`, `nft list table ip6 acme-alpn-proxy`).
// It is also the comment on every iptables rule we own.
const TableName = "acme-alpn-proxy"

// Mode is how connections are taken from the web server's port.
type Mode string

const (
	// TProxy keeps the destination port, so host firewalls that allow only
	// the web server's port still let intercepted connections in, and it
	// needs no NAT and no conntrack. Needs an IP_TRANSPARENT listener.
	TProxy Mode = "tproxy"
	// Redirect rewrites the destination port with NAT. Works everywhere NAT
	// does, but a firewall that allows only the web server's port drops the
	// rewritten packets in its input chain.
	Redirect Mode = "redirect"
)

// ParseMode accepts "tproxy" or "redirect".
func ParseMode(s string) (Mode, error) {
	switch m := Mode(s); m {
	case TProxy, Redirect:
		return m, nil
	}
	return "", fmt.Errorf("unknown interception mode %q (want tproxy or redirect)", s)
}

// Family is an address family; its String is the nftables family name.
type Family int

const (
	IPv4 Family = 4
	IPv6 Family = 6
)

func (f Family) String() string {
	if f == IPv6 {
		return "ip6"
	}
	return "ip"
}

// ChainType is the nftables base chain type.
type ChainType string

const (
	ChainNAT    ChainType = "nat"
	ChainFilter ChainType = "filter"
	// ChainRoute is a filter chain on the output hook whose mark changes
	// make the kernel route the packet again (iptables: mangle OUTPUT).
	ChainRoute ChainType = "route"
)

// Hook is the netfilter hook a base chain is attached to.
type Hook string

const (
	HookPrerouting Hook = "prerouting"
	HookInput      Hook = "input"
	HookOutput     Hook = "output"
)

// Standard netfilter priorities (include/uapi/linux/netfilter_ipv4.h).
const (
	PriorityMangle int32 = -150
	PriorityDstNAT int32 = -100
	PriorityFilter int32 = 0
)

// Role says when a rule is removed. Intercept rules go first at stop, so no
// new connection reaches the proxy; Guard rules stay until the drain is over.
type Role int

const (
	RoleIntercept Role = iota
	RoleGuard
	// RoleReturn rules carry the return path of connections dialed from
	// the client's address; like guards they stay until the drain is over.
	RoleReturn
)

func (r Role) String() string {
	switch r {
	case RoleGuard:
		return "guard"
	case RoleReturn:
		return "return"
	}
	return "intercept"
}

// Action is a rule's terminal statement.
type Action int

const (
	ActionRedirect Action = iota // NAT to ToPort on the local address
	ActionTProxy                 // assign to the transparent listener on ToPort
	ActionDrop
	// ActionClaimNAT is an identity DNAT (nft: dnat to ip daddr; iptables:
	// ACCEPT in the nat table). The first NAT chain that binds a new
	// connection ends NAT chain traversal, so claiming it at dstnat - 10
	// keeps a later DNAT of the port (Docker publishing 443 to a
	// container) off connections we took with TPROXY: that DNAT would make
	// the destination non-local, and the kernel drops a forwarded packet
	// that already has our socket attached.
	ActionClaimNAT
	// The return path of connections the proxy dials from the client's
	// address (see Config.ReturnMark). They match on Rule.Mark, not on ports.
	ActionSaveMark    // meta mark & M == M: ct mark set ct mark | M
	ActionClearMark   // meta mark & M == M: meta mark set meta mark & ~M
	ActionRestoreMark // ct direction reply ct mark & M == M: meta mark set meta mark | M
)

func (a Action) String() string {
	switch a {
	case ActionRedirect:
		return "redirect"
	case ActionTProxy:
		return "tproxy"
	case ActionClaimNAT:
		return "claim-nat"
	case ActionSaveMark:
		return "save-mark"
	case ActionClearMark:
		return "clear-mark"
	case ActionRestoreMark:
		return "restore-mark"
	}
	return "drop"
}

// Rule is one rule: all set matches must hold, then Action applies.
type Rule struct {
	Role Role
	// LocalOnly: fib daddr type local. Only connections addressed to this
	// host are ours; traffic the host forwards (containers, VMs, routing)
	// to some other server's port 443 or 21443 must pass untouched.
	LocalOnly bool
	// NotLoopback: iifname != "lo". Keeps the proxy's own dials to the web
	// server (which loop back through prerouting) and local diagnostics out.
	NotLoopback bool
	DPort       uint16
	// SynOnly: tcp flags & (fin|syn|rst|ack) == syn. Only connection-opening
	// packets are taken, so connections that predate the rule (and that
	// conntrack picks up mid-stream) are never hijacked.
	SynOnly bool
	// NotDNAT: ct status & dnat == 0, i.e. not redirected by us. Besides
	// matching, it makes the rule a conntrack user, which keeps tracking on
	// (and so reverse NAT of in-flight connections) until the table goes.
	NotDNAT bool
	Action  Action
	ToPort  uint16 // for ActionRedirect and ActionTProxy
	// Mark is the mark bit(s) the mark actions test and set; they touch
	// no other bit. DPort is 0 for them.
	Mark uint32
	// When narrows a mark rule to some packets of a connection.
	When    ConnCond
	Comment string
}

// ConnCond is a conntrack condition on a mark rule.
type ConnCond uint8

const (
	Always   ConnCond = iota
	WhenNew           // ct state new: the connection's first packets
	WhenDNAT          // ct status dnat: a DNAT (e.g. Docker's) rewrote it
)

// match is c in nft syntax, with a trailing space; "" for Always.
func (c ConnCond) match() string {
	switch c {
	case WhenNew:
		return "ct state new "
	case WhenDNAT:
		return "ct status dnat "
	}
	return ""
}

// IsMarkRule reports whether r is a return-path rule, which matches on
// marks instead of ports.
func (r Rule) IsMarkRule() bool {
	return r.Action == ActionSaveMark || r.Action == ActionClearMark || r.Action == ActionRestoreMark
}

// Chain is a base chain of our table.
type Chain struct {
	Name     string
	Type     ChainType
	Hook     Hook
	Priority int32
	Rules    []Rule
}

// Table is our table for one address family.
type Table struct {
	Family Family
	Name   string
	Chains []Chain
}

// RuleSet is everything we install: one table per family, identical chains.
type RuleSet struct {
	Mode       Mode
	Port       uint16
	ListenPort uint16
	Instance   string // see Config.Instance
	Tables     []Table
}

// Config selects the rule set.
type Config struct {
	Mode       Mode
	Port       uint16 // the web server's port, usually 443
	ListenPort uint16 // the proxy's listener port, usually 21443
	Families   []Family
	// Instance, if set, ties the rules to one run of the proxy: every
	// comment starts with Tag(Instance) instead of TableName, so a
	// guardian removing a dead instance's rules can tell them from a newer
	// instance's. Lower-case hex, at most MaxInstanceLen characters.
	Instance string
	// ReturnMark, when not 0, adds the return path for connections the
	// proxy dials from the client's own address with SO_MARK ReturnMark:
	// the mark is saved on the connection (and cleared from our own
	// packets, so that a DNAT to a container routes them normally) and
	// restored on the replies, which policy routing for the mark then
	// delivers locally. Only the bits of ReturnMark are touched.
	ReturnMark uint32
}

// returnChains are the return path for mark m:
//
//	chain return-out { type route hook output priority mangle
//	  meta mark & M == M ct mark set ct mark | M
//	  meta mark & M == M ct state new meta mark set meta mark & ~M
//	  meta mark & M == M ct status dnat meta mark set meta mark & ~M
//	  ct direction reply ct mark & M == M meta mark set meta mark | M }
//	chain return-in { type filter hook prerouting priority mangle
//	  ct direction reply ct mark & M == M meta mark set meta mark | M }
//
// The output chain restores the mark on replies of a web server on this
// host (a route chain routes a packet again when its mark changes); the
// prerouting chain on replies that come back over a bridge from a web
// server in a container behind DNAT.
func returnChains(m uint32) []Chain {
	rule := func(a Action, what string) Rule {
		return Rule{Role: RoleReturn, Action: a, Mark: m, Comment: TableName + ": " + what}
	}
	// Our packets keep the mark where it changes nothing: the kernel's
	// local table (rule priority 0) routes them to a web server on this
	// host before our fwmark rule is consulted. Only a DNAT to another
	// address (Docker publishing the port) needs it gone, so it is
	// cleared on a connection's first packets, before DNAT is known, and
	// on DNATed connections: clearing it on every packet made the kernel
	// route each one again (a route chain does when a mark changes), 3–7 %
	// of the connection rate.
	clearWhen := func(c ConnCond) Rule {
		r := rule(ActionClearMark, "our own packets route normally")
		r.When = c
		return r
	}
	return []Chain{{
		Name: "return-out", Type: ChainRoute, Hook: HookOutput, Priority: PriorityMangle,
		Rules: []Rule{
			rule(ActionSaveMark, "dialed from the client's address"),
			clearWhen(WhenNew),
			clearWhen(WhenDNAT),
			rule(ActionRestoreMark, "replies to the proxy"),
		},
	}, {
		Name: "return-in", Type: ChainFilter, Hook: HookPrerouting, Priority: PriorityMangle,
		Rules: []Rule{rule(ActionRestoreMark, "replies to the proxy")},
	}}
}

// ReturnOnly is rs with only its return-path chains: what must be in
// place to prove the return path before intercepting.
func (rs RuleSet) ReturnOnly() RuleSet {
	return rs.filterChains(func(c Chain) bool { return len(c.Rules) > 0 && c.Rules[0].Role == RoleReturn })
}

// WithoutReturn is rs without its return-path chains.
func (rs RuleSet) WithoutReturn() RuleSet {
	return rs.filterChains(func(c Chain) bool { return len(c.Rules) == 0 || c.Rules[0].Role != RoleReturn })
}

// HasReturn reports whether rs carries the return path.
func (rs RuleSet) HasReturn() bool {
	for _, t := range rs.Tables {
		for _, c := range t.Chains {
			if len(c.Rules) > 0 && c.Rules[0].Role == RoleReturn {
				return true
			}
		}
	}
	return false
}

func (rs RuleSet) filterChains(keep func(Chain) bool) RuleSet {
	out := rs
	out.Tables = nil
	for _, t := range rs.Tables {
		var cs []Chain
		for _, c := range t.Chains {
			if keep(c) {
				cs = append(cs, c)
			}
		}
		t.Chains = cloneChains(cs)
		out.Tables = append(out.Tables, t)
	}
	return out
}

// MaxInstanceLen bounds an instance id (iptables comments hold 255 bytes).
const MaxInstanceLen = 32

// Tag is the comment prefix of an instance's rules: TableName, or
// TableName + "-" + instance. Only letters, digits and '-', so iptables
// prints it unquoted.
func Tag(instance string) string {
	if instance == "" {
		return TableName
	}
	return TableName + "-" + instance
}

// ParseTag reads a comment of ours ("acme-alpn-proxy", "acme-alpn-proxy-ID"
// or either followed by ": text") and returns the instance id, "" for an
// untagged rule; ok is false for a comment that is not ours.
func ParseTag(comment string) (instance string, ok bool) {
	tag, _, _ := strings.Cut(comment, ":")
	if tag == TableName {
		return "", true
	}
	id, found := strings.CutPrefix(tag, TableName+"-")
	if !found || validInstance(id) != nil || id == "" {
		return "", false
	}
	return id, true
}

func validInstance(id string) error {
	if len(id) > MaxInstanceLen {
		return fmt.Errorf("intercept: instance id longer than %d characters", MaxInstanceLen)
	}
	for _, c := range id {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return fmt.Errorf("intercept: instance id %q: want lower-case hex", id)
		}
	}
	return nil
}

// Build returns the rule set for cfg.
//
// redirect:
//
//	chain prerouting { type nat hook prerouting priority dstnat - 10
//	  fib daddr type local tcp dport 443 tcp flags & (fin|syn|rst|ack) == syn redirect to :21443 }
//	chain guard { type filter hook input priority filter - 10
//	  iifname != "lo" fib daddr type local tcp dport 21443 ct status & dnat == 0 drop }
//
// tproxy:
//
//	chain prerouting { type filter hook prerouting priority mangle - 10
//	  iifname != "lo" fib daddr type local tcp dport 21443 drop
//	  iifname != "lo" fib daddr type local tcp dport 443 tcp flags & (fin|syn|rst|ack) == syn tproxy to :21443 }
//	chain claim-nat { type nat hook prerouting priority dstnat - 10
//	  iifname != "lo" fib daddr type local tcp dport 443 tcp flags & (fin|syn|rst|ack) == syn dnat to daddr }
//
// dstnat - 10 wins over other NAT on the host (Docker's DNAT) whatever the
// registration order; mangle - 10 runs before any DNAT at all.
func Build(cfg Config) (RuleSet, error) {
	if cfg.Port == 0 || cfg.ListenPort == 0 {
		return RuleSet{}, fmt.Errorf("intercept: port and listen port must be non-zero")
	}
	if cfg.Port == cfg.ListenPort {
		return RuleSet{}, fmt.Errorf("intercept: listen port %d equals the intercepted port", cfg.Port)
	}
	if len(cfg.Families) == 0 {
		return RuleSet{}, fmt.Errorf("intercept: no address family to intercept")
	}
	if err := validInstance(cfg.Instance); err != nil {
		return RuleSet{}, err
	}
	var chains []Chain
	switch cfg.Mode {
	case Redirect:
		chains = []Chain{{
			Name: "prerouting", Type: ChainNAT, Hook: HookPrerouting, Priority: PriorityDstNAT - 10,
			Rules: []Rule{{
				Role: RoleIntercept, LocalOnly: true, DPort: cfg.Port, SynOnly: true,
				Action: ActionRedirect, ToPort: cfg.ListenPort,
				Comment: TableName + ": new connections to the proxy",
			}},
		}, {
			Name: "guard", Type: ChainFilter, Hook: HookInput, Priority: PriorityFilter - 10,
			Rules: []Rule{{
				Role: RoleGuard, NotLoopback: true, LocalOnly: true, DPort: cfg.ListenPort, NotDNAT: true,
				Action:  ActionDrop,
				Comment: TableName + ": listener only through the redirect",
			}},
		}}
	case TProxy:
		chains = []Chain{{
			Name: "prerouting", Type: ChainFilter, Hook: HookPrerouting, Priority: PriorityMangle - 10,
			Rules: []Rule{{
				Role: RoleGuard, NotLoopback: true, LocalOnly: true, DPort: cfg.ListenPort,
				Action:  ActionDrop,
				Comment: TableName + ": listener only through tproxy",
			}, {
				Role: RoleIntercept, NotLoopback: true, LocalOnly: true, DPort: cfg.Port, SynOnly: true,
				Action: ActionTProxy, ToPort: cfg.ListenPort,
				Comment: TableName + ": new connections to the proxy",
			}},
		}, {
			Name: "claim-nat", Type: ChainNAT, Hook: HookPrerouting, Priority: PriorityDstNAT - 10,
			Rules: []Rule{{
				Role: RoleIntercept, NotLoopback: true, LocalOnly: true, DPort: cfg.Port, SynOnly: true,
				Action:  ActionClaimNAT,
				Comment: TableName + ": no other DNAT for proxied connections",
			}},
		}}
	default:
		return RuleSet{}, fmt.Errorf("intercept: unknown mode %q", cfg.Mode)
	}
	if cfg.ReturnMark != 0 {
		// First: a backend that installs rule by rule (iptables) must have
		// the return path before it intercepts, or the first dials from a
		// client's address lose their SYN-ACK (a retransmit, 1 s later).
		chains = append(returnChains(cfg.ReturnMark), chains...)
	}
	tagRules(chains, cfg.Instance)
	rs := RuleSet{Mode: cfg.Mode, Port: cfg.Port, ListenPort: cfg.ListenPort, Instance: cfg.Instance}
	seen := map[Family]bool{}
	for _, f := range cfg.Families {
		if f != IPv4 && f != IPv6 {
			return RuleSet{}, fmt.Errorf("intercept: unknown address family %d", f)
		}
		if seen[f] {
			continue
		}
		seen[f] = true
		rs.Tables = append(rs.Tables, Table{Family: f, Name: TableName, Chains: cloneChains(chains)})
	}
	return rs, nil
}

// tagRules puts the instance's Tag in place of TableName at the start of
// each comment.
func tagRules(chains []Chain, instance string) {
	for i := range chains {
		for j := range chains[i].Rules {
			r := &chains[i].Rules[j]
			if rest, ok := strings.CutPrefix(r.Comment, TableName); ok {
				r.Comment = Tag(instance) + rest
			}
		}
	}
}

func cloneChains(cs []Chain) []Chain {
	out := make([]Chain, len(cs))
	for i, c := range cs {
		c.Rules = append([]Rule(nil), c.Rules...)
		out[i] = c
	}
	return out
}

// String renders the rule in nft syntax; it is what `nft list table` shows
// (modulo the kernel's canonical spelling) and what logs and status print.
func (r Rule) String() string {
	var b strings.Builder
	if r.IsMarkRule() {
		m := fmt.Sprintf("%#x", r.Mark)
		switch r.Action {
		case ActionSaveMark:
			fmt.Fprintf(&b, "meta mark & %s == %s ct mark set ct mark | %s", m, m, m)
		case ActionClearMark:
			fmt.Fprintf(&b, "meta mark & %s == %s %smeta mark set meta mark & %#x", m, m, r.When.match(), ^r.Mark)
		default:
			fmt.Fprintf(&b, "ct direction reply ct mark & %s == %s meta mark set meta mark | %s", m, m, m)
		}
		if r.Comment != "" {
			fmt.Fprintf(&b, " comment %q", r.Comment)
		}
		return b.String()
	}
	if r.NotLoopback {
		b.WriteString(`iifname != "lo" `)
	}
	if r.LocalOnly {
		b.WriteString("fib daddr type local ")
	}
	fmt.Fprintf(&b, "tcp dport %d ", r.DPort)
	if r.SynOnly {
		b.WriteString("tcp flags & (fin|syn|rst|ack) == syn ")
	}
	if r.NotDNAT {
		b.WriteString("ct status & dnat == 0 ")
	}
	switch r.Action {
	case ActionRedirect:
		fmt.Fprintf(&b, "redirect to :%d", r.ToPort)
	case ActionTProxy:
		fmt.Fprintf(&b, "tproxy to :%d", r.ToPort)
	case ActionClaimNAT:
		b.WriteString("dnat to daddr")
	default:
		b.WriteString("drop")
	}
	if r.Comment != "" {
		fmt.Fprintf(&b, " comment %q", r.Comment)
	}
	return b.String()
}

// String renders the whole rule set in nft syntax.
func (rs RuleSet) String() string {
	var b strings.Builder
	for _, t := range rs.Tables {
		fmt.Fprintf(&b, "table %s %s {\n", t.Family, t.Name)
		for _, c := range t.Chains {
			fmt.Fprintf(&b, "\tchain %s {\n\t\ttype %s hook %s priority %d;\n", c.Name, c.Type, c.Hook, c.Priority)
			for _, r := range c.Rules {
				fmt.Fprintf(&b, "\t\t%s\n", r)
			}
			b.WriteString("\t}\n")
		}
		b.WriteString("}\n")
	}
	return b.String()
}

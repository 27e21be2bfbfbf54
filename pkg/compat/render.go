package compat

import (
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/intercept"
)

// Comment marks every rule we own; a rule set with an instance id uses
// intercept.Tag(id) ("acme-alpn-proxy-ID") instead. Both contain only characters iptables
// never quotes, so `-S` prints it verbatim and the rule is found by token.
const Comment = intercept.TableName

// lockWaitSeconds is how long iptables waits for the xtables lock (-w)
// before giving up; firewall managers and Docker hold it briefly.
const lockWaitSeconds = "30"

// maxRuleSpecLen bounds ACME_ALPN_PROXY_RULESPEC; a real rule is far shorter.
const maxRuleSpecLen = 4096

// Binaries names the executables for each family.
type Binaries struct {
	IPv4, IPv6 string
}

// DefaultBinaries are the names looked up in PATH: whichever variant
// (legacy or nf_tables) the host's alternatives select.
var DefaultBinaries = Binaries{IPv4: "iptables", IPv6: "ip6tables"}

func (b Binaries) forFamily(f intercept.Family) string {
	if f == intercept.IPv6 {
		return b.IPv6
	}
	return b.IPv4
}

// location is an iptables table and built-in chain.
type location struct {
	Table, Chain string
}

// ourLocations are the only chains we ever insert into, so the only ones
// scanned for our rules; a rule with our comment elsewhere is not ours.
var ourLocations = []location{
	{"nat", "PREROUTING"},
	{"mangle", "PREROUTING"},
	{"filter", "INPUT"},
	{"mangle", "OUTPUT"},
}

// step is one rendered rule: the argv that inserts it and the one that
// deletes exactly it.
type step struct {
	Family intercept.Family
	Loc    location
	Role   intercept.Role
	Insert []string
	Delete []string
}

// Args renders rs for the default binaries: install holds one argv per
// rule in installation order, remove the argvs that delete exactly those
// rules, in reverse order. ruleSpec is ACME_ALPN_PROXY_RULESPEC (or "").
func Args(rs intercept.RuleSet, ruleSpec string) (install, remove [][]string, err error) {
	steps, err := render(rs, ruleSpec, DefaultBinaries)
	if err != nil {
		return nil, nil, err
	}
	for _, s := range steps {
		install = append(install, s.Insert)
	}
	for i := len(steps) - 1; i >= 0; i-- {
		remove = append(remove, steps[i].Delete)
	}
	return install, remove, nil
}

// render maps every rule of rs to an iptables rule. Rules of one iptables
// chain keep the RuleSet's order and go before every other rule of that
// chain: the n-th of ours is inserted at position n.
func render(rs intercept.RuleSet, ruleSpec string, bins Binaries) ([]step, error) {
	spec, err := parseRuleSpec(ruleSpec)
	if err != nil {
		return nil, err
	}
	if spec != nil && rs.Mode != intercept.Redirect {
		return nil, fmt.Errorf("compat: ACME_ALPN_PROXY_RULESPEC replaces the redirect rule and only works with -mode redirect (mode is %s); unset it or use -mode redirect", rs.Mode)
	}
	if len(rs.Tables) == 0 {
		return nil, fmt.Errorf("compat: rule set has no tables")
	}
	var steps []step
	for _, t := range rs.Tables {
		if t.Family != intercept.IPv4 && t.Family != intercept.IPv6 {
			return nil, fmt.Errorf("compat: unknown address family %d", t.Family)
		}
		bin := bins.forFamily(t.Family)
		position := map[location]int{}
		for _, c := range t.Chains {
			loc, err := chainLocation(c)
			if err != nil {
				return nil, err
			}
			for _, r := range c.Rules {
				ruleArgs, err := ruleArgv(loc, r, intercept.Tag(rs.Instance))
				if err != nil {
					return nil, fmt.Errorf("compat: chain %s: %w", c.Name, err)
				}
				if spec != nil && r.Role == intercept.RoleIntercept && r.Action == intercept.ActionRedirect {
					ruleArgs = spec
				}
				position[loc]++
				steps = append(steps, step{
					Family: t.Family,
					Loc:    loc,
					Role:   r.Role,
					Insert: command(bin, loc.Table, "-I", loc.Chain, []string{strconv.Itoa(position[loc])}, ruleArgs),
					Delete: command(bin, loc.Table, "-D", loc.Chain, nil, ruleArgs),
				})
			}
		}
	}
	return steps, nil
}

// command builds `BIN -w SECS -t TABLE OP CHAIN [POS] RULE...`.
func command(bin, table, op, chain string, pos, rule []string) []string {
	argv := []string{bin, "-w", lockWaitSeconds, "-t", table, op, chain}
	argv = append(argv, pos...)
	return append(argv, rule...)
}

// chainLocation maps an nftables base chain to the iptables table whose
// hook and priority it mirrors (filter at mangle priority is mangle).
func chainLocation(c intercept.Chain) (location, error) {
	switch {
	case c.Type == intercept.ChainNAT && c.Hook == intercept.HookPrerouting:
		return location{"nat", "PREROUTING"}, nil
	case c.Type == intercept.ChainFilter && c.Hook == intercept.HookPrerouting:
		return location{"mangle", "PREROUTING"}, nil
	case c.Type == intercept.ChainFilter && c.Hook == intercept.HookInput:
		return location{"filter", "INPUT"}, nil
	case c.Type == intercept.ChainRoute && c.Hook == intercept.HookOutput:
		// mangle OUTPUT routes a packet again when its mark changes.
		return location{"mangle", "OUTPUT"}, nil
	}
	return location{}, fmt.Errorf("compat: no iptables equivalent for chain %s (type %s hook %s)", c.Name, c.Type, c.Hook)
}

// ruleArgv renders the match and target part of one rule, in the order
// `iptables -S` prints it (matches, comment, target).
// LocalOnly (nft `fib daddr type local`) is `-m addrtype --dst-type LOCAL`.
func ruleArgv(loc location, r intercept.Rule, comment string) ([]string, error) {
	if r.IsMarkRule() {
		return markArgv(loc, r, comment)
	}
	if r.DPort == 0 {
		return nil, fmt.Errorf("rule without destination port")
	}
	var a []string
	if r.NotLoopback {
		a = append(a, "!", "-i", "lo")
	}
	a = append(a, "-p", "tcp", "--dport", strconv.Itoa(int(r.DPort)))
	if r.SynOnly {
		a = append(a, "--syn")
	}
	// After the port match: the cheap compare rejects most packets before
	// the route lookup addrtype does.
	if r.LocalOnly {
		a = append(a, "-m", "addrtype", "--dst-type", "LOCAL")
	}
	if r.NotDNAT {
		a = append(a, "-m", "conntrack", "!", "--ctstate", "DNAT")
	}
	a = append(a, "-m", "comment", "--comment", comment)
	switch r.Action {
	case intercept.ActionRedirect:
		if loc.Table != "nat" || r.ToPort == 0 {
			return nil, fmt.Errorf("REDIRECT needs the nat table and a port")
		}
		a = append(a, "-j", "REDIRECT", "--to-ports", strconv.Itoa(int(r.ToPort)))
	case intercept.ActionTProxy:
		if loc.Table != "mangle" || r.ToPort == 0 {
			return nil, fmt.Errorf("TPROXY needs the mangle table and a port")
		}
		a = append(a, "-j", "TPROXY", "--on-port", strconv.Itoa(int(r.ToPort)))
	case intercept.ActionDrop:
		a = append(a, "-j", "DROP")
	case intercept.ActionClaimNAT:
		// ACCEPT ends the nat table's PREROUTING, where Docker's DNAT
		// lives, with the connection bound to its own destination.
		if loc.Table != "nat" {
			return nil, fmt.Errorf("claiming NAT needs the nat table")
		}
		a = append(a, "-j", "ACCEPT")
	default:
		return nil, fmt.Errorf("unknown action %v", r.Action)
	}
	return a, nil
}

// markArgv renders the return-path rules with mark, connmark and
// CONNMARK/MARK, touching only the bits of r.Mark.
func markArgv(loc location, r intercept.Rule, tag string) ([]string, error) {
	if loc.Table != "mangle" || r.Mark == 0 {
		return nil, fmt.Errorf("mark rules need the mangle table and a mark")
	}
	m := fmt.Sprintf("%#x", r.Mark)
	comment := []string{"-m", "comment", "--comment", tag}
	switch r.Action {
	case intercept.ActionSaveMark:
		return slices.Concat([]string{"-m", "mark", "--mark", m + "/" + m}, comment, []string{"-j", "CONNMARK", "--or-mark", m}), nil
	case intercept.ActionClearMark:
		var when []string
		switch r.When {
		case intercept.WhenNew:
			when = []string{"-m", "conntrack", "--ctstate", "NEW"}
		case intercept.WhenDNAT:
			when = []string{"-m", "conntrack", "--ctstate", "DNAT"}
		}
		return slices.Concat([]string{"-m", "mark", "--mark", m + "/" + m}, when, comment, []string{"-j", "MARK", "--and-mark", fmt.Sprintf("%#x", ^r.Mark)}), nil
	default:
		return slices.Concat([]string{"-m", "conntrack", "--ctdir", "REPLY", "-m", "connmark", "--mark", m + "/" + m}, comment,
			[]string{"-j", "MARK", "--or-mark", m}), nil
	}
}

// parseRuleSpec splits ACME_ALPN_PROXY_RULESPEC on whitespace, as the old
// shell script's unquoted expansion did (quotes are not interpreted there
// either). Blank means unset.
func parseRuleSpec(s string) ([]string, error) {
	if s == "" {
		return nil, nil
	}
	if len(s) > maxRuleSpecLen {
		return nil, fmt.Errorf("compat: ACME_ALPN_PROXY_RULESPEC is %d bytes, longer than %d", len(s), maxRuleSpecLen)
	}
	f := strings.Fields(s)
	if len(f) == 0 {
		return nil, fmt.Errorf("compat: ACME_ALPN_PROXY_RULESPEC is set but blank; unset it or give the rule, e.g. \"-p tcp --dport 443 -j REDIRECT --to-ports 21443\"")
	}
	return f, nil
}

// hasOurComment reports whether rule tokens carry exactly our comment,
// with or without an instance id.
func hasOurComment(tokens []string) bool {
	_, ok := instanceOf(tokens)
	return ok
}

// instanceOf returns the instance id in our comment ("" if untagged).
func instanceOf(tokens []string) (string, bool) {
	for i := 0; i+1 < len(tokens); i++ {
		if tokens[i] != "--comment" {
			continue
		}
		if id, ok := intercept.ParseTag(tokens[i+1]); ok && tokens[i+1] == intercept.Tag(id) {
			return id, true
		}
	}
	return "", false
}

// roleOf classifies one of our rules by its target: DROP is the guard,
// MARK and CONNMARK the return path, anything that takes connections
// (REDIRECT, TPROXY, nat ACCEPT) intercepts.
func roleOf(tokens []string) intercept.Role {
	for i := 0; i+1 < len(tokens); i++ {
		if tokens[i] == "-j" || tokens[i] == "--jump" {
			switch tokens[i+1] {
			case "DROP":
				return intercept.RoleGuard
			case "MARK", "CONNMARK":
				return intercept.RoleReturn
			}
			return intercept.RoleIntercept
		}
	}
	return intercept.RoleIntercept
}

// ownRule is one of our rules as found in `iptables -S CHAIN` output.
type ownRule struct {
	Loc    location
	Line   string   // as printed, e.g. "-A PREROUTING -p tcp ..."
	Tokens []string // after "-A CHAIN", unquoted
	Role   intercept.Role
	// Instance is the id in the comment; "" for an untagged rule.
	Instance string
}

// parseOwnRules returns the rules of chain loc.Chain in `-S` output that
// carry our comment. Policy lines, warnings, other chains and lines that
// do not tokenize are skipped: they are never ours to delete.
func parseOwnRules(loc location, out string) []ownRule {
	var rules []ownRule
	for _, line := range strings.Split(out, "\n") {
		line = strings.TrimSpace(line)
		if !strings.HasPrefix(line, "-A ") {
			continue
		}
		tok, err := splitSaved(line)
		if err != nil || len(tok) < 3 || tok[1] != loc.Chain {
			continue
		}
		rest := tok[2:]
		id, ours := instanceOf(rest)
		if !ours {
			continue
		}
		rules = append(rules, ownRule{Loc: loc, Line: line, Tokens: rest, Role: roleOf(rest), Instance: id})
	}
	return rules
}

// deleteArgv turns a found rule back into the argv that deletes it by
// specification (not by number, which shifts if others insert meanwhile).
func (r ownRule) deleteArgv(bin string) []string {
	return command(bin, r.Loc.Table, "-D", r.Loc.Chain, nil, r.Tokens)
}

// splitSaved tokenizes one line of iptables -S / iptables-save output.
// iptables quotes a value with double quotes and escapes `"`, `'` and `\`
// inside with a backslash (xtables_save_string); nothing else is special.
func splitSaved(line string) ([]string, error) {
	var (
		tokens []string
		cur    strings.Builder
		inTok  bool
		quoted bool
	)
	for i := 0; i < len(line); i++ {
		c := line[i]
		switch {
		case quoted && c == '\\':
			if i+1 >= len(line) {
				return nil, fmt.Errorf("dangling backslash")
			}
			i++
			cur.WriteByte(line[i])
		case quoted && c == '"':
			quoted = false
		case quoted:
			cur.WriteByte(c)
		case c == '"':
			quoted, inTok = true, true
		case c == ' ' || c == '\t':
			if inTok {
				tokens = append(tokens, cur.String())
				cur.Reset()
				inTok = false
			}
		default:
			cur.WriteByte(c)
			inTok = true
		}
	}
	if quoted {
		return nil, fmt.Errorf("unterminated quote")
	}
	if inTok {
		tokens = append(tokens, cur.String())
	}
	return tokens, nil
}

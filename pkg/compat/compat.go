// Package compat installs the interception rule set through the iptables
// and ip6tables binaries, for hosts where nf_tables cannot be driven over
// netlink or when the user asks for it (-backend iptables).
//
// It renders the same intercept.RuleSet as pkg/nft, one iptables rule per
// intercept.Rule, each tagged with the comment "acme-alpn-proxy" (or
// "acme-alpn-proxy-ID" for a rule set with an instance id, so a guardian
// can tell a dead instance's rules from a newer one's) so that every copy
// can be found again in `iptables -S` output, also after a killed
// instance, and nothing else is ever touched:
//
//	redirect: -t nat    -I PREROUTING 1 -p tcp --dport 443 --syn -m addrtype --dst-type LOCAL
//	                    -m comment --comment acme-alpn-proxy -j REDIRECT --to-ports 21443
//	          -t filter -I INPUT 1 ! -i lo -p tcp --dport 21443 -m addrtype --dst-type LOCAL
//	                    -m conntrack ! --ctstate DNAT -m comment --comment acme-alpn-proxy -j DROP
//	tproxy:   -t mangle -I PREROUTING 1 ! -i lo -p tcp --dport 21443 -m addrtype --dst-type LOCAL
//	                    -m comment --comment acme-alpn-proxy -j DROP
//	          -t mangle -I PREROUTING 2 ! -i lo -p tcp --dport 443 --syn -m addrtype --dst-type LOCAL
//	                    -m comment --comment acme-alpn-proxy -j TPROXY --on-port 21443
//	          -t nat    -I PREROUTING 1 ! -i lo -p tcp --dport 443 --syn -m addrtype --dst-type LOCAL
//	                    -m comment --comment acme-alpn-proxy -j ACCEPT
//
// (The nat ACCEPT keeps Docker's DNAT, later in the same chain, off the
// connections TPROXY took; see intercept.ActionClaimNAT.)
//
// Rules are inserted at the head of their chain so they precede Docker's
// and any other DNAT (NETFILTER-NOTES fact 2).
//
// ACME_ALPN_PROXY_RULESPEC (Options.RuleSpec), kept for compatibility with
// the older shell script, replaces the redirect rule's text after
// `-t nat -I PREROUTING 1` (and `-t nat -D PREROUTING`) for both families.
// It is split on whitespace like the script's unquoted expansion; quotes
// are not interpreted and no shell runs. It is valid only in redirect
// mode. A spec without our comment is found again by `-C`/`-D` with the
// same spec, so stop must see the same variable.
//
// The binaries are run with argv (never a shell), with -w so a held
// xtables lock is waited for instead of failing.
package compat

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/intercept"
)

// Runner runs one command given as argv.
type Runner interface {
	Run(ctx context.Context, argv []string) (stdout, stderr []byte, err error)
}

// defaultMaxOutput bounds what is read from one command; -S of one chain
// on a busy Kubernetes node is well below it.
const defaultMaxOutput = 32 << 20

// ExecRunner runs commands with os/exec. Prefix is prepended to every argv,
// e.g. {"ip", "netns", "exec", "NAME"} to act inside a network namespace.
type ExecRunner struct {
	Prefix    []string
	MaxOutput int // bytes of stdout kept; default 32 MiB, beyond is an error
}

// Run executes argv under LC_ALL=C, so messages can be classified.
func (r ExecRunner) Run(ctx context.Context, argv []string) ([]byte, []byte, error) {
	full := append(append([]string(nil), r.Prefix...), argv...)
	if len(full) == 0 {
		return nil, nil, errors.New("compat: empty command")
	}
	cmd := exec.CommandContext(ctx, full[0], full[1:]...)
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	cmd.WaitDelay = 5 * time.Second
	max := r.MaxOutput
	if max <= 0 {
		max = defaultMaxOutput
	}
	stdout := &limitedBuffer{max: max}
	stderr := &limitedBuffer{max: 64 << 10}
	cmd.Stdout, cmd.Stderr = stdout, stderr
	err := cmd.Run()
	if err == nil && stdout.overflow {
		err = fmt.Errorf("compat: output of %s exceeds %d bytes", full[0], max)
	}
	return stdout.buf.Bytes(), stderr.buf.Bytes(), err
}

// limitedBuffer keeps the first max bytes and drops the rest, so a runaway
// command cannot exhaust memory; the command still runs to completion.
// It has only Write (no ReadFrom), so io.Copy cannot bypass the limit.
type limitedBuffer struct {
	buf      bytes.Buffer
	max      int
	overflow bool
}

func (b *limitedBuffer) Write(p []byte) (int, error) {
	room := b.max - b.buf.Len()
	if len(p) > room {
		b.overflow = true
		if room > 0 {
			b.buf.Write(p[:room])
		}
		return len(p), nil
	}
	return b.buf.Write(p)
}

// Options configure a Backend. The zero value runs "iptables" and
// "ip6tables" from PATH.
type Options struct {
	Runner   Runner // default ExecRunner{}
	RuleSpec string // ACME_ALPN_PROXY_RULESPEC; "" for the built-in rule
	Logf     func(format string, args ...any)
	// IPTables and IP6Tables name the binaries, e.g. "iptables-legacy".
	IPTables, IP6Tables string
	// Timeout bounds one command; it must exceed the -w lock wait.
	Timeout time.Duration // default 60s
	// Instance, if set, limits Remove to the rules of that instance
	// (intercept.Config.Instance): a guardian cleaning up after its dead
	// proxy leaves a newer instance's rules alone. Install still replaces
	// the rules of every instance.
	Instance string
}

// Backend installs and removes our rules with iptables and ip6tables.
// Its methods are safe for concurrent use; they run one at a time.
type Backend struct {
	mu       sync.Mutex
	run      Runner
	ruleSpec string
	spec     []string // parsed RuleSpec, nil when unset
	bins     Binaries
	logf     func(string, ...any)
	timeout  time.Duration
	instance string
	warned   atomic.Bool
}

// New checks opts; it runs nothing, so it is cheap for `status` and `stop`.
func New(opts Options) (*Backend, error) {
	spec, err := parseRuleSpec(opts.RuleSpec)
	if err != nil {
		return nil, err
	}
	b := &Backend{
		run:      opts.Runner,
		ruleSpec: opts.RuleSpec,
		spec:     spec,
		bins:     DefaultBinaries,
		logf:     opts.Logf,
		timeout:  opts.Timeout,
		instance: opts.Instance,
	}
	if b.run == nil {
		b.run = ExecRunner{}
	}
	if opts.IPTables != "" {
		b.bins.IPv4 = opts.IPTables
	}
	if opts.IP6Tables != "" {
		b.bins.IPv6 = opts.IP6Tables
	}
	if b.logf == nil {
		b.logf = func(string, ...any) {}
	}
	if b.timeout <= 0 {
		b.timeout = 60 * time.Second
	}
	return b, nil
}

var allFamilies = []intercept.Family{intercept.IPv4, intercept.IPv6}

// Install removes every copy of our rules (a killed instance may have left
// some, for other ports or modes), then inserts rs. If any insert fails,
// the rules already inserted are deleted again and the error says why.
func (b *Backend) Install(rs intercept.RuleSet) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	steps, err := render(rs, b.ruleSpec, b.bins)
	if err != nil {
		return err
	}
	wanted := map[intercept.Family]bool{}
	for _, t := range rs.Tables {
		wanted[t.Family] = true
	}
	for _, f := range allFamilies {
		err := b.removeOurs(f, nil, true)
		switch {
		case err != nil && wanted[f]:
			return fmt.Errorf("compat: removing stale rules before install: %w", err)
		case err != nil:
			// Not asked for, maybe unusable here (IPv6 disabled): best effort.
			b.logf("compat: cleaning stale %s rules: %v", b.bins.forFamily(f), err)
		}
	}
	for i, s := range steps {
		if _, cerr := b.exec(s.Insert); cerr != nil {
			return errors.Join(cerr, b.rollback(steps[:i]))
		}
		b.logf("compat: %s", strings.Join(s.Insert, " "))
	}
	return nil
}

// rollback deletes already inserted steps, newest first.
func (b *Backend) rollback(done []step) error {
	var errs []error
	for i := len(done) - 1; i >= 0; i-- {
		if _, cerr := b.exec(done[i].Delete); cerr != nil && !absent(cerr) && !unavailable(cerr) {
			errs = append(errs, cerr)
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("compat: rolling back the partial install failed, run stop to remove what is left: %w", errors.Join(errs...))
	}
	return nil
}

// RemoveIntercept deletes every intercept rule of ours (REDIRECT, TPROXY, nat ACCEPT)
// in both families and keeps the guards, so no new connection reaches the
// proxy while established ones drain.
func (b *Backend) RemoveIntercept() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	only := intercept.RoleIntercept
	var errs []error
	for _, f := range allFamilies {
		errs = append(errs, b.removeOurs(f, &only, false))
	}
	return errors.Join(errs...)
}

// Remove deletes every rule of ours in both families, whether or not this
// process installed it, so `stop` cleans up after a killed instance (only
// those of Options.Instance, if set).
//
// The families are cleaned concurrently: each command costs milliseconds
// to tens of them, and a guardian removing a dead proxy's rules is racing
// every new connection to port 443.
func (b *Backend) Remove() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	errs := make([]error, len(allFamilies))
	var wg sync.WaitGroup
	for i, f := range allFamilies {
		wg.Go(func() { errs[i] = b.removeOurs(f, nil, false) })
	}
	wg.Wait()
	return errors.Join(errs...)
}

// RemoveRuleSet deletes exactly the rules rs renders, by specification,
// without listing the chains first: one command per rule, intercept rules
// first, each table and family concurrently. It is the guardian's first
// move after a crash, when every command's latency keeps port 443 pointed
// at a dead listener; Remove then catches whatever it missed and checks.
// Rules already gone are not an error.
func (b *Backend) RemoveRuleSet(rs intercept.RuleSet) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	steps, err := render(rs, b.ruleSpec, b.bins)
	if err != nil {
		return err
	}
	type group struct {
		f   intercept.Family
		loc location
	}
	var order []group
	byGroup := map[group][]step{}
	for _, s := range steps {
		g := group{s.Family, s.Loc}
		if _, ok := byGroup[g]; !ok {
			order = append(order, g)
		}
		byGroup[g] = append(byGroup[g], s)
	}
	errs := make([]error, len(order))
	var wg sync.WaitGroup
	for i, g := range order {
		wg.Go(func() {
			group := byGroup[g]
			slices.SortStableFunc(group, func(a, b step) int { return cmp.Compare(a.Role, b.Role) })
			for _, s := range group {
				switch _, cerr := b.exec(s.Delete); {
				case cerr == nil:
					b.logf("compat: %s", strings.Join(s.Delete, " "))
				case !absent(cerr) && !unavailable(cerr):
					errs[i] = cerr
				}
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// Close releases nothing: iptables rules outlive the process, so Remove
// must be called to delete them. It exists so Backend has the same
// lifecycle methods as the nftables backend.
func (b *Backend) Close() error { return nil }

// maxDeletes bounds deleting copies of a RuleSpec rule one by one.
const maxDeletes = 64

// removeOurs deletes our rules of family f (only those of role *only, if
// set; only those of Options.Instance unless anyInstance) and then checks
// that none is left. A table the kernel does not provide cannot hold our
// rules and counts as clean.
func (b *Backend) removeOurs(f intercept.Family, only *intercept.Role, anyInstance bool) error {
	bin := b.bins.forFamily(f)
	wanted := func(r ownRule) bool {
		return (only == nil || r.Role == *only) && (anyInstance || b.instance == "" || r.Instance == b.instance)
	}
	// The chains are independent; cleaning them concurrently makes the
	// rules go in the time of one chain's commands.
	var deleted atomic.Int32
	errs := make([]error, len(ourLocations))
	var wg sync.WaitGroup
	for i, loc := range ourLocations {
		wg.Go(func() {
			rules, err := b.list(f, loc)
			if err != nil {
				errs[i] = err
				return
			}
			// Intercept rules first: once they are gone, new connections
			// reach the web server.
			slices.SortStableFunc(rules, func(a, b ownRule) int { return cmp.Compare(a.Role, b.Role) })
			for _, r := range rules {
				if !wanted(r) {
					continue
				}
				// Another instance may have deleted it meanwhile: absent is fine.
				if _, cerr := b.exec(r.deleteArgv(bin)); cerr != nil && !absent(cerr) {
					errs[i] = cerr
					return
				}
				deleted.Add(1)
				b.logf("compat: removed %s -t %s %s", bin, loc.Table, r.Line)
			}
		})
	}
	wg.Wait()
	for _, err := range errs { // the first: they often share one cause
		if err != nil {
			return err
		}
	}
	if b.specUncommented() && (only == nil || *only == intercept.RoleIntercept) {
		del := command(bin, "nat", "-D", "PREROUTING", nil, b.spec)
		for i := 0; ; i++ {
			if i == maxDeletes {
				return fmt.Errorf("compat: %s: more than %d copies of the ACME_ALPN_PROXY_RULESPEC rule", bin, maxDeletes)
			}
			_, cerr := b.exec(del)
			if cerr != nil && (absent(cerr) || unavailable(cerr)) {
				break
			}
			if cerr != nil {
				return cerr
			}
			b.logf("compat: %s", strings.Join(del, " "))
		}
	}
	if deleted.Load() == 0 {
		return nil
	}
	// A line that -S prints but -D does not accept back would otherwise be
	// reported as deleted; check instead of trusting.
	for _, loc := range ourLocations {
		rules, err := b.list(f, loc)
		if err != nil {
			return err
		}
		for _, r := range rules {
			if wanted(r) {
				return fmt.Errorf("compat: %s -t %s: rule still present after deleting it: %s", bin, loc.Table, r.Line)
			}
		}
	}
	return nil
}

// specUncommented reports whether the RuleSpec rule lacks our comment, so
// only its exact text finds it again.
func (b *Backend) specUncommented() bool {
	return b.spec != nil && !hasOurComment(b.spec)
}

// list returns our rules in one chain. A missing table or a disabled
// address family means there is nothing of ours.
func (b *Backend) list(f intercept.Family, loc location) ([]ownRule, error) {
	argv := []string{b.bins.forFamily(f), "-w", lockWaitSeconds, "-t", loc.Table, "-S", loc.Chain}
	out, cerr := b.exec(argv)
	if cerr != nil {
		if unavailable(cerr) {
			return nil, nil
		}
		return nil, cerr
	}
	return parseOwnRules(loc, string(out)), nil
}

// unavailable reports a table or family the kernel does not provide.
func unavailable(e *CommandError) bool {
	return tableMissing.MatchString(e.Output) ||
		strings.Contains(e.Output, "Address family not supported") ||
		strings.Contains(e.Output, "Protocol not supported")
}

// exec runs argv with the per-command timeout and classifies failures.
func (b *Backend) exec(argv []string) ([]byte, *CommandError) {
	ctx, cancel := context.WithTimeout(context.Background(), b.timeout)
	defer cancel()
	stdout, stderr, err := b.run.Run(ctx, argv)
	if strings.Contains(string(stderr), "legacy tables present") && !b.warned.Swap(true) {
		b.logf("compat: %s: %s: rules made by the other iptables variant are invisible here and are not cleaned up", argv[0], strings.TrimSpace(string(stderr)))
	}
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("%w after %v", ctx.Err(), b.timeout)
		}
		return stdout, classify(argv, append(append([]byte(nil), stderr...), stdout...), err)
	}
	return stdout, nil
}

// probeSource is a source and destination no TCP packet carries, so the
// probe rule never matches anything while it briefly exists.
var probeAddr = map[intercept.Family]string{intercept.IPv4: "0.0.0.0/32", intercept.IPv6: "::/128"}

// TProxySupported reports whether the TPROXY target works for each given
// family (IPv4 if none): it appends a rule that can match no packet and
// deletes it again. Only the kernel's check of a real rule is reliable for
// both legacy and nf_tables variants (the help text needs only the
// userspace library). The rule carries our comment, so a crash in between
// leaves nothing Remove would not find.
func (b *Backend) TProxySupported(families ...intercept.Family) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(families) == 0 {
		families = []intercept.Family{intercept.IPv4}
	}
	for _, f := range families {
		addr, ok := probeAddr[f]
		if !ok {
			return false
		}
		rule := []string{"-s", addr, "-d", addr, "-p", "tcp", "--dport", "9",
			"-m", "comment", "--comment", Comment, "-j", "TPROXY", "--on-port", "9"}
		bin := b.bins.forFamily(f)
		if _, cerr := b.exec(command(bin, "mangle", "-A", "PREROUTING", nil, rule)); cerr != nil {
			b.logf("compat: TPROXY unusable: %v", cerr)
			return false
		}
		if _, cerr := b.exec(command(bin, "mangle", "-D", "PREROUTING", nil, rule)); cerr != nil && !absent(cerr) {
			b.logf("compat: deleting the TPROXY probe rule: %v", cerr)
		}
	}
	return true
}

// Variant is "legacy" or "nf_tables" (what `iptables -V` says), for logs.
func (b *Backend) Variant(f intercept.Family) (string, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.variant(f)
}

func (b *Backend) variant(f intercept.Family) (string, error) {
	out, cerr := b.exec([]string{b.bins.forFamily(f), "-V"})
	if cerr != nil {
		return "", cerr
	}
	return parseVariant(string(out))
}

// parseVariant reads `iptables -V`; releases before 1.8 had only the
// legacy variant and print no suffix.
func parseVariant(out string) (string, error) {
	out = strings.TrimSpace(out)
	switch {
	case strings.Contains(out, "(nf_tables)"):
		return "nf_tables", nil
	case strings.Contains(out, "(legacy)"):
		return "legacy", nil
	case strings.HasPrefix(out, "iptables v") || strings.HasPrefix(out, "ip6tables v"):
		return "legacy", nil
	}
	return "", fmt.Errorf("compat: unrecognised version output %q", oneLine([]byte(out)))
}

// Present is one of our rules found on the host.
type Present struct {
	Family intercept.Family
	Table  string
	Chain  string
	Role   intercept.Role
	Rule   string // as `iptables -S` prints it
}

// State is what Inspect found.
type State struct {
	Variants map[intercept.Family]string // "legacy" or "nf_tables"; absent if unknown
	Rules    []Present
}

// Intercepting reports whether any intercept rule of ours is present.
func (s State) Intercepting() bool {
	for _, r := range s.Rules {
		if r.Role == intercept.RoleIntercept {
			return true
		}
	}
	return false
}

// Inspect lists our rules in both families. On an error in one family it
// still reports what it found in the other, and returns the error too.
func (b *Backend) Inspect() (State, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	st := State{Variants: map[intercept.Family]string{}}
	var errs []error
	for _, f := range allFamilies {
		v, err := b.variant(f)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		st.Variants[f] = v
		for _, loc := range ourLocations {
			rules, err := b.list(f, loc)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			for _, r := range rules {
				st.Rules = append(st.Rules, Present{Family: f, Table: loc.Table, Chain: loc.Chain, Role: r.Role, Rule: r.Line})
			}
		}
		if b.specUncommented() {
			_, cerr := b.exec(command(b.bins.forFamily(f), "nat", "-C", "PREROUTING", nil, b.spec))
			switch {
			case cerr == nil:
				st.Rules = append(st.Rules, Present{Family: f, Table: "nat", Chain: "PREROUTING", Role: intercept.RoleIntercept,
					Rule: "-A PREROUTING " + strings.Join(b.spec, " ")})
			case !absent(cerr) && !unavailable(cerr):
				errs = append(errs, cerr)
			}
		}
	}
	return st, errors.Join(errs...)
}

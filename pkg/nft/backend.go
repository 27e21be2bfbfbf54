// Package nft installs the interception rules (an intercept.RuleSet) as
// nftables tables over netlink, without the nft binary.
//
// The tables are owner tables (NFT_TABLE_F_OWNER, Linux ≥ 5.12): they
// belong to the netlink socket a Backend holds, and the kernel deletes them
// when that socket closes — on Close, on exit, and when the process is
// killed or crashes — so a dead proxy never leaves port 443 redirected to
// nothing. Every change is one nf_tables transaction: it applies fully or
// not at all.
//
// google/nftables v0.3.0 cannot set table flags, so the package builds the
// batches itself with mdlayher/netlink and uses google/nftables only to
// encode and decode expressions.
package nft

import (
	"errors"
	"fmt"
	"os"
	"sync"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/intercept"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Options configures a Backend.
type Options struct {
	// Logf reports decisions the caller should know about (falling back to
	// plain tables). Nil discards them.
	Logf func(format string, args ...any)
	// PlainTables installs plain tables even where the kernel has owner
	// tables, as on a kernel older than 5.12. For tests of what runs there
	// (the guardian that removes plain tables after a crash); never needed
	// in production.
	PlainTables bool
}

// Backend owns our nftables tables through one netlink socket.
//
// The Backend must stay referenced for as long as the interception should
// last: if it becomes unreachable, Go's garbage collector closes its socket
// and the kernel deletes the owner tables with it.
type Backend struct {
	mu     sync.Mutex
	conn   nlConn
	logf   func(format string, args ...any)
	closed bool

	ownerUnsupported bool // learned from the kernel; never retried
	owner            bool
	installed        []intercept.Family
	rules            []ruleRef
}

// Open opens the backend's netlink socket in the caller's current network
// namespace (lock the OS thread to use another one while calling Open).
func Open(opts Options) (*Backend, error) {
	c, err := dial()
	if err != nil {
		return nil, err
	}
	return newBackend(c, opts), nil
}

func newBackend(c nlConn, opts Options) *Backend {
	logf := opts.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}
	return &Backend{conn: c, logf: logf, ownerUnsupported: opts.PlainTables}
}

// dial opens a NETLINK_NETFILTER socket. It binds the port id to our PID
// when that is free, so the NFTA_TABLE_OWNER a `status` process reads names
// this process.
func dial() (*netlink.Conn, error) {
	c, err := netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{PID: uint32(os.Getpid())})
	if errors.Is(err, unix.EADDRINUSE) {
		c, err = netlink.Dial(unix.NETLINK_NETFILTER, nil)
	}
	if err != nil {
		if errors.Is(err, unix.EPROTONOSUPPORT) {
			return nil, fmt.Errorf("nf_tables not usable over netlink: %w (kernel without nfnetlink; load module nfnetlink)", err)
		}
		return nil, fmt.Errorf("nf_tables not usable over netlink: %w", err)
	}
	// Kernel error strings make refusals easier to diagnose; optional.
	_ = c.SetOption(netlink.ExtendedAcknowledge, true)
	return c, nil
}

var errClosed = errors.New("nftables: backend closed")

// Install replaces our tables with rs in one transaction: on error the
// kernel keeps what was there before (nothing, or the previous Install).
//
// It returns an error wrapping ErrTProxyUnsupported if the kernel cannot
// load the tproxy expression, and one wrapping ErrOwnedByAnother if a live
// process owns a table of the same name. If the kernel refuses owner tables
// (Linux < 5.12), Install uses plain tables, logs that, and Owner reports
// false.
func (b *Backend) Install(rs intercept.RuleSet) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return errClosed
	}
	owner := !b.ownerUnsupported
	refs, err := b.install(rs, owner)
	if owner && errors.Is(err, errOwnerUnsupported) {
		b.ownerUnsupported = true
		owner = false
		b.logf("nftables: %v; using plain tables, which stay if this process is killed ('stop' removes them)", err)
		refs, err = b.install(rs, false)
	}
	if err != nil {
		return err
	}
	b.owner = owner
	b.installed = b.installed[:0]
	for _, t := range rs.Tables {
		b.installed = append(b.installed, t.Family)
	}
	b.rules = refs
	return nil
}

func (b *Backend) install(rs intercept.RuleSet, owner bool) ([]ruleRef, error) {
	bt, err := installBatch(rs, owner, b.installed...)
	if err != nil {
		return nil, err
	}
	res, err := exchange(b.conn, bt)
	if err != nil {
		return nil, err
	}
	if err := batchError(res, owner); err != nil {
		return nil, err
	}
	refs, complete := echoedRules(res)
	if !complete {
		// Committed, but the kernel did not echo every rule: read the
		// handles back instead.
		refs, err = b.listRules(rs)
		if err != nil {
			return nil, fmt.Errorf("nftables: rules installed but their handles are unknown: %w", err)
		}
	}
	return refs, nil
}

// echoedRules reads the rule handles from the kernel's echoes of our
// NEWRULE messages.
func echoedRules(res *result) ([]ruleRef, bool) {
	var refs []ruleRef
	complete := true
	for i, seq := range res.seqs {
		info := res.infos[i]
		if info.kind != kindNewRule {
			continue
		}
		handle := uint64(0)
		for _, m := range res.echoes[seq] {
			if m.Header.Type != nftType(unix.NFT_MSG_NEWRULE) {
				continue
			}
			if r, err := parseRule(m); err == nil && r.chain == info.chain {
				handle = r.handle
			}
		}
		if handle == 0 {
			complete = false
			continue
		}
		refs = append(refs, ruleRef{family: info.family, chain: info.chain, handle: handle, role: info.rule.Role})
	}
	return refs, complete
}

// listRules finds the handles of rs's rules by dumping our tables; rules
// are matched to rs by chain and position.
func (b *Backend) listRules(rs intercept.RuleSet) ([]ruleRef, error) {
	var refs []ruleRef
	for _, t := range rs.Tables {
		rules, err := dumpRules(b.conn, t.Family)
		if err != nil {
			return nil, err
		}
		for _, c := range t.Chains {
			var inChain []parsedRule
			for _, r := range rules {
				if r.chain == c.Name {
					inChain = append(inChain, r)
				}
			}
			if len(inChain) != len(c.Rules) {
				return nil, fmt.Errorf("chain %s %s has %d rules, want %d", t.Family, c.Name, len(inChain), len(c.Rules))
			}
			for i, r := range inChain {
				refs = append(refs, ruleRef{family: t.Family, chain: c.Name, handle: r.handle, role: c.Rules[i].Role})
			}
		}
	}
	return refs, nil
}

// RemoveIntercept deletes the rules with Role intercept in one transaction,
// so no new connection reaches the proxy, and keeps the chains and guard
// rules (which keep conntrack and reverse NAT alive for connections in
// flight). Rules someone else already deleted are skipped.
func (b *Backend) RemoveIntercept() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return errClosed
	}
	var todo, keep []ruleRef
	for _, r := range b.rules {
		if r.role == intercept.RoleIntercept {
			todo = append(todo, r)
		} else {
			keep = append(keep, r)
		}
	}
	// The kernel reports every failed message of a batch, so one retry
	// without the already-deleted rules suffices.
	for attempt := 0; len(todo) > 0; attempt++ {
		bt, err := deleteRulesBatch(todo)
		if err != nil {
			return err
		}
		res, err := exchange(b.conn, bt)
		if err != nil {
			return err
		}
		err = batchError(res, false)
		if err == nil {
			break
		}
		gone := goneRules(res)
		if attempt > 0 || len(gone) == 0 {
			return err
		}
		var rest []ruleRef
		for _, r := range todo {
			if !gone[r.handle] {
				rest = append(rest, r)
			}
		}
		todo = rest
	}
	b.rules = keep
	return nil
}

// goneRules returns the handles of DELRULE messages that failed with ENOENT.
func goneRules(res *result) map[uint64]bool {
	gone := map[uint64]bool{}
	for i, seq := range res.seqs {
		if err, ok := res.errs[seq]; ok && res.infos[i].kind == kindDelRule && errors.Is(err, unix.ENOENT) {
			gone[res.infos[i].handle] = true
		}
	}
	return gone
}

// Remove deletes our tables in one transaction. A table that is already
// gone is fine.
func (b *Backend) Remove() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return errClosed
	}
	if len(b.installed) == 0 {
		return nil
	}
	bt, err := removeTablesBatch(b.installed)
	if err != nil {
		return err
	}
	res, err := exchange(b.conn, bt)
	if err != nil {
		return err
	}
	if err := batchError(res, false); err != nil {
		return err
	}
	b.installed, b.rules, b.owner = nil, nil, false
	return nil
}

// Owner reports whether the installed tables are owner tables, which the
// kernel deletes when this process exits. False before Install, after
// Remove, and on kernels that refuse the owner flag.
func (b *Backend) Owner() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.owner
}

// Close closes the netlink socket; the kernel then deletes owner tables.
// Plain tables (Owner false) stay: call Remove first.
func (b *Backend) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return nil
	}
	b.closed = true
	b.installed, b.rules, b.owner = nil, nil, false
	return b.conn.Close()
}

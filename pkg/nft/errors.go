package nft

import (
	"errors"
	"fmt"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/intercept"
	"github.com/google/nftables/expr"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

var (
	// ErrTProxyUnsupported means the kernel has no tproxy expression
	// (nft_tproxy not built or not loadable); redirect mode still works.
	ErrTProxyUnsupported = errors.New("kernel does not support nftables tproxy (module nft_tproxy missing); use redirect mode")

	// ErrOwnedByAnother means a live process owns our table (it created it
	// with the owner flag), normally another acme-alpn-proxy.
	ErrOwnedByAnother = errors.New("owned by another process")

	// errOwnerUnsupported means the kernel refused NFT_TABLE_F_OWNER
	// (before Linux 5.12); Install falls back to a plain table.
	errOwnerUnsupported = errors.New("kernel does not support owner tables (NFT_TABLE_F_OWNER, Linux ≥ 5.12)")
)

// kernelError is an errno the kernel answered, without netlink.OpError's
// "netlink receive:" prefix, with the kernel's extended-ack text if any.
type kernelError struct {
	errno error
	msg   string
}

func (e kernelError) Error() string {
	if e.msg != "" {
		return fmt.Sprintf("%v (%s)", e.errno, e.msg)
	}
	return e.errno.Error()
}

func (e kernelError) Unwrap() error { return e.errno }

// cleanErr turns a netlink answer's *netlink.OpError into a kernelError.
func cleanErr(err error) error {
	var oe *netlink.OpError
	if errors.As(err, &oe) && oe.Op == "receive" && oe.Sequence != 0 {
		return kernelError{errno: oe.Err, msg: oe.Message}
	}
	return err
}

func ownedError(f intercept.Family) error {
	return fmt.Errorf("table %s %s is %w — is another acme-alpn-proxy running?", f, intercept.TableName, ErrOwnedByAnother)
}

// permissionError explains EPERM on the whole batch or socket.
func permissionError(err error) error {
	return fmt.Errorf("nf_tables not usable over netlink: %w (run as root or with CAP_NET_ADMIN)", err)
}

// batchError turns the kernel's answer into an error naming the cause, or
// nil if every message was applied.
func batchError(r *result, ownerWanted bool) error {
	info, err := r.firstError()
	if err == nil {
		if m, missing := r.unanswered(); missing {
			return fmt.Errorf("nftables: kernel did not answer %s", m)
		}
		return nil
	}
	switch info.kind {
	case kindBatchMarker:
		// nfnetlink checks CAP_NET_ADMIN and the subsystem on the first
		// message; a failed commit is also reported there.
		switch {
		case errors.Is(err, unix.EPERM):
			return permissionError(err)
		case errors.Is(err, unix.EOPNOTSUPP):
			return fmt.Errorf("nf_tables not usable over netlink: %w (kernel without nf_tables; load module nf_tables)", err)
		}
		return fmt.Errorf("nftables: kernel refused the batch: %w", err)
	case kindProbeTable, kindDelTable, kindNewTable, kindNewChain, kindNewRule, kindDelRule:
		if errors.Is(err, unix.EPERM) {
			// Only the owner's socket may touch an owner table; a missing
			// capability is reported on the batch begin instead.
			return ownedError(info.family)
		}
	}
	switch info.kind {
	case kindNewTable:
		if ownerWanted && (errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP)) {
			return fmt.Errorf("%w: %v", errOwnerUnsupported, err)
		}
	case kindNewRule:
		if info.rule.Action == intercept.ActionTProxy && (errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EOPNOTSUPP)) {
			return fmt.Errorf("nftables: %s: %w: %w", info, ErrTProxyUnsupported, err)
		}
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EOPNOTSUPP) {
			return fmt.Errorf("nftables: %s: %w (kernel lacks an nftables expression this rule needs: %s)", info, err, exprModules(info))
		}
	}
	return fmt.Errorf("nftables: %s: %w", info, err)
}

// exprModules names the kernel modules a rule's expressions need, for the
// error message when one is missing.
func exprModules(info msgInfo) string {
	es, err := ruleExprs(info.family, info.rule)
	if err != nil {
		return "unknown"
	}
	seen := map[string]bool{}
	var s string
	for _, e := range es {
		var m string
		switch e.(type) {
		case *expr.Redir:
			m = "nft_redir"
		case *expr.TProxy:
			m = "nft_tproxy"
		case *expr.NAT:
			m = "nft_nat"
		case *expr.Ct:
			m = "nft_ct"
		case *expr.Fib:
			m = "nft_fib_ipv4/nft_fib_ipv6"
		default:
			continue
		}
		if !seen[m] {
			seen[m] = true
			if s != "" {
				s += ", "
			}
			s += m
		}
	}
	if s == "" {
		return "nf_tables core"
	}
	return s
}

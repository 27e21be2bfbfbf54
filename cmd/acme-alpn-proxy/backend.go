package main

import (
	"errors"
	"fmt"
	"log/slog"

	"golang.org/x/sys/unix"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/compat"
	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/intercept"
	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/nft"
)

// interceptor is what the lifecycle needs from a netfilter backend.
type interceptor interface {
	// Install atomically replaces any rules of ours with rs; on error
	// nothing of rs remains.
	Install(rs intercept.RuleSet) error
	// RemoveIntercept removes the rules that take new connections; guard
	// rules stay so in-flight connections keep working through the drain.
	RemoveIntercept() error
	// Remove removes every rule and table of ours.
	Remove() error
	Close() error
}

// chooseBackend opens the backend the flags ask for. auto takes nftables
// when nf_tables answers over netlink, and iptables otherwise (or when the
// iptables-only ACME_ALPN_PROXY_RULESPEC is set).
func chooseBackend(cfg config, log *slog.Logger) (interceptor, string, error) {
	name, why := cfg.backend, "chosen by -backend"
	if name == "auto" {
		switch err := nft.Probe(); {
		case cfg.ruleSpec != "":
			name, why = "iptables", "ACME_ALPN_PROXY_RULESPEC is set"
		case err == nil:
			name, why = "nft", "nf_tables answers over netlink"
		case errors.Is(err, unix.EPERM):
			// iptables would fail the same way; say the real cause.
			return nil, "nft", err
		default:
			name, why = "iptables", fmt.Sprintf("nf_tables unusable: %v", err)
		}
	}
	logf := func(format string, args ...any) { log.Info(fmt.Sprintf(format, args...), "backend", name) }
	var ic interceptor
	var err error
	switch name {
	case "nft":
		var b *nft.Backend
		b, err = nft.Open(nft.Options{Logf: logf, PlainTables: cfg.plainTables})
		ic = b
	case "iptables":
		var b *compat.Backend
		b, err = compat.New(compat.Options{RuleSpec: cfg.ruleSpec, Logf: logf})
		ic = b
	}
	if err != nil {
		return nil, name, err
	}
	log.Info("backend chosen", "backend", name, "why", why)
	return ic, name, nil
}

// install installs the rule set for the requested mode. auto tries tproxy
// and falls back to redirect when the kernel or iptables lacks TPROXY.
// returnMark, when not 0, adds the return path (setupReturnPath proved it).
func install(ic interceptor, cfg config, families []intercept.Family, instance string, returnMark uint32, log *slog.Logger) (intercept.RuleSet, error) {
	modes := []intercept.Mode{intercept.TProxy, intercept.Redirect}
	switch {
	case cfg.mode == "redirect" || cfg.ruleSpec != "":
		modes = modes[1:]
	case cfg.mode == "tproxy":
		modes = modes[:1]
	}
	var lastErr error
	for _, mode := range modes {
		rs, err := intercept.Build(intercept.Config{Mode: mode, Port: cfg.port, ListenPort: cfg.listenPort, Families: families, ReturnMark: returnMark, Instance: instance})
		if err != nil {
			return rs, err
		}
		if b, ok := ic.(*compat.Backend); ok && mode == intercept.TProxy && !b.TProxySupported(families...) {
			lastErr = errors.New("iptables has no TPROXY target (modprobe xt_TPROXY, or use -mode redirect)")
			log.Info("tproxy unavailable; trying redirect", "why", lastErr)
			continue
		}
		err = ic.Install(rs)
		if err == nil {
			why := "chosen by -mode"
			if cfg.mode == "auto" {
				why = "tproxy: the kernel accepted it"
				if mode == intercept.Redirect {
					why = fmt.Sprintf("redirect: tproxy unavailable (%v)", lastErr)
				}
			}
			log.Info("interception installed", "mode", mode, "why", why)
			for _, t := range rs.Tables {
				for _, c := range t.Chains {
					for _, r := range c.Rules {
						log.Info("rule", "table", t.Family.String()+" "+t.Name, "chain", c.Name, "rule", r.String())
					}
				}
			}
			return rs, nil
		}
		lastErr = err
		if cfg.mode == "auto" && mode == intercept.TProxy && errors.Is(err, nft.ErrTProxyUnsupported) {
			log.Info("tproxy unavailable; trying redirect", "why", err)
			continue
		}
		return rs, err
	}
	return intercept.RuleSet{}, lastErr
}

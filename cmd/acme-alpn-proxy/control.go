package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/compat"
	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/intercept"
	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/nft"
	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/policyroute"
)

// stop signals the running instance and waits until it has exited, so a
// `start` right after never meets a draining instance. With none running it
// removes rules a killed instance left behind (iptables rules, plain
// nftables tables; owner tables died with their process).
func stop(cfg config, stdout, stderr io.Writer) int {
	running, st, err := probePidfile(cfg.pidfile)
	if err != nil && !running {
		fmt.Fprintf(stderr, "acme-alpn-proxy: %v\n", err)
		return exitFailure
	}
	if !running {
		if es, err := removeStaleRoutes(cfg); err != nil {
			fmt.Fprintf(stderr, "acme-alpn-proxy: not running; removing stale policy routing failed: %v\n", err)
		} else if len(es) > 0 {
			fmt.Fprintf(stdout, "removed policy routing a killed instance left:\n%s", policyroute.Describe(es))
		}
		removed, err := removeStale()
		if err != nil {
			fmt.Fprintf(stderr, "acme-alpn-proxy: not running; removing stale rules failed: %v\n", err)
			return exitFailure
		}
		if removed != "" {
			fmt.Fprintf(stdout, "acme-alpn-proxy was not running; removed stale rules: %s\n", removed)
		} else {
			fmt.Fprintln(stdout, "acme-alpn-proxy is not running")
		}
		if n := deleteStaleConntrack(cfg); n > 0 {
			fmt.Fprintf(stdout, "deleted %d conntrack entries of redirected connections a killed instance left\n", n)
		}
		return exitOK
	}
	if err != nil {
		fmt.Fprintf(stderr, "acme-alpn-proxy: running, but %v\n", err)
		return exitFailure
	}
	// ESRCH: the holder is a guardian removing a killed instance's rules;
	// wait below until it is done.
	if err := syscall.Kill(st.pid, syscall.SIGTERM); err != nil && !errors.Is(err, syscall.ESRCH) {
		fmt.Fprintf(stderr, "acme-alpn-proxy: signalling pid %d: %v\n", st.pid, err)
		return exitFailure
	}
	// A suspended instance (SIGSTOP) acts on SIGTERM only once resumed.
	syscall.Kill(st.pid, syscall.SIGCONT)
	deadline := time.Now().Add(cfg.drainTimeout + 30*time.Second)
	for time.Now().Before(deadline) {
		if still, _, _ := probePidfile(cfg.pidfile); !still {
			fmt.Fprintf(stdout, "acme-alpn-proxy stopped (pid %d)\n", st.pid)
			return exitOK
		}
		time.Sleep(50 * time.Millisecond)
	}
	fmt.Fprintf(stderr, "acme-alpn-proxy: pid %d still draining after %v; its interception is removed (send another SIGTERM to cut in-flight connections)\n", st.pid, cfg.drainTimeout+30*time.Second)
	return exitFailure
}

// status prints the state; exit codes are documented in usage.
func status(cfg config, stdout, stderr io.Writer) int {
	running, st, err := probePidfile(cfg.pidfile)
	if !running {
		if err != nil {
			fmt.Fprintf(stderr, "acme-alpn-proxy: %v\n", err)
		}
		stale := staleRules()
		if routes := describeRoutes(cfg); routes != "" {
			// Inert: only our rules set the mark, and they are gone.
			fmt.Fprintf(stdout, "policy routing a killed instance left (inert; `acme-alpn-proxy stop` or the next start removes it):\n%s", routes)
		}
		if stale != "" {
			fmt.Fprintf(stdout, "not running, but stale rules of ours are installed: %s\n(new connections to port %d are sent to a proxy that is gone: run `acme-alpn-proxy stop` to remove them)\n", stale, cfg.port)
			return exitStale
		}
		fmt.Fprintln(stdout, "not running")
		return exitNotRunning
	}
	if err != nil {
		fmt.Fprintf(stdout, "running, state unknown: %v\n", err)
		return exitFailure
	}
	if suspended(st.pid) {
		fmt.Fprintf(stdout, "running (pid %d) but suspended (SIGSTOP): connections sent to it wait until it gets SIGCONT; `acme-alpn-proxy stop` resumes and stops it\n", st.pid)
		return exitFailure
	}
	if st.backend == "none" {
		fmt.Fprintf(stdout, "running (pid %d), no interception (-no-redirect)\n", st.pid)
		return exitOK
	}
	families, desc, err := interceptedFamilies(st.backend)
	active := len(families) > 0
	if err != nil {
		fmt.Fprintf(stdout, "running (pid %d), backend %s, mode %s; cannot read rules: %v\n", st.pid, st.backend, st.mode, err)
		return exitFailure
	}
	if !active {
		fmt.Fprintf(stdout, "running (pid %d), backend %s, mode %s, interception NOT active (draining after stop?)\n%s", st.pid, st.backend, st.mode, desc)
		return exitFailure
	}
	fmt.Fprintf(stdout, "running (pid %d), backend %s, mode %s, interception active for %s\n%s", st.pid, st.backend, st.mode, describeFamilies(families), desc)
	fmt.Fprint(stdout, describeGuardian(st))
	if routes := describeRoutes(cfg); routes != "" {
		fmt.Fprintf(stdout, "  return path (the web server sees clients' addresses):\n%s", strings.ReplaceAll(routes, "  ", "    "))
	}
	if ct := readConntrackTable(); ct.loaded {
		fmt.Fprintf(stdout, "  %v\n", ct)
	}
	return exitOK
}

// suspended reports whether pid is stopped by a signal or a tracer.
func suspended(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// "pid (comm) S ...": comm may hold spaces and parentheses.
	i := bytes.LastIndexByte(b, ')')
	return i >= 0 && i+2 < len(b) && (b[i+2] == 'T' || b[i+2] == 't')
}

// interceptedFamilies reads the kernel's (or iptables') view of our rules:
// the families whose new connections they take.
func interceptedFamilies(backend string) ([]intercept.Family, string, error) {
	var families []intercept.Family
	add := func(f intercept.Family) {
		if !slices.Contains(families, f) {
			families = append(families, f)
		}
	}
	if backend == "iptables" {
		b, err := compat.New(compat.Options{})
		if err != nil {
			return nil, "", err
		}
		s, err := b.Inspect()
		for _, r := range s.Rules {
			if r.Role == intercept.RoleIntercept {
				add(r.Family)
			}
		}
		slices.Sort(families)
		return families, describeIPTables(s), err
	}
	s, err := nft.Inspect()
	for _, t := range s.Tables {
		if t.Intercepting() {
			add(t.Family)
		}
	}
	slices.Sort(families)
	return families, describeNFT(s), err
}

// describeFamilies is "IPv4 and IPv6", or "IPv4 only (IPv6 not
// intercepted)": a family start left alone has no web server.
func describeFamilies(fs []intercept.Family) string {
	s := familyList(fs, " and ")
	for _, f := range []intercept.Family{intercept.IPv4, intercept.IPv6} {
		if !slices.Contains(fs, f) {
			s += fmt.Sprintf(" only (%s not intercepted)", familyName(f))
		}
	}
	return s
}

// describeGuardian is status's line on who removes the rules if the proxy
// is killed.
func describeGuardian(st instanceState) string {
	switch {
	case st.guardian > 0 && guardianAlive(st.guardian):
		return fmt.Sprintf("  guardian: pid %d, alive (removes the rules if the proxy dies)\n", st.guardian)
	case st.guardian > 0:
		return fmt.Sprintf("  guardian: pid %d, NOT running: if the proxy is killed, its rules stay until `acme-alpn-proxy stop`\n", st.guardian)
	case st.backend == "nft":
		return "  guardian: none needed (the kernel removes owner tables)\n"
	}
	return ""
}

func describeNFT(s nft.State) string {
	var b strings.Builder
	for _, t := range s.Tables {
		if !t.Exists {
			continue
		}
		flags := "plain table: stays if the process dies"
		if t.Owner {
			flags = "owner table: the kernel removes it when the process dies"
		}
		fmt.Fprintf(&b, "  nft table %s %s (%s), mode %s, intercepting: %v\n", t.Family, intercept.TableName, flags, t.Mode(), t.Intercepting())
	}
	return b.String()
}

func describeIPTables(s compat.State) string {
	var b strings.Builder
	for _, r := range s.Rules {
		bin := "iptables"
		if r.Family == intercept.IPv6 {
			bin = "ip6tables"
		}
		fmt.Fprintf(&b, "  %s -t %s %s (%s)\n", bin, r.Table, r.Rule, r.Role)
	}
	return b.String()
}

// staleRules describes rules of ours that exist with no instance of this
// pid file running. Owner tables are never stale: they die with their
// process, so one that exists belongs to a live instance.
func staleRules() string {
	var found []string
	if s, err := nft.Inspect(); err == nil {
		for _, t := range s.Tables {
			if t.Exists && !t.Owner {
				found = append(found, fmt.Sprintf("nft table %s %s", t.Family, intercept.TableName))
			}
		}
	}
	if _, err := exec.LookPath("iptables"); err == nil {
		if b, err := compat.New(compat.Options{}); err == nil {
			if s, err := b.Inspect(); err == nil && len(s.Rules) > 0 {
				found = append(found, fmt.Sprintf("%d iptables rules commented %s", len(s.Rules), compat.Comment))
			}
		}
	}
	return strings.Join(found, "; ")
}

// deleteStaleConntrack deletes the conntrack entries that a redirect to our
// listen port created, when no instance of ours runs to own them (after
// kill -9): a new connection reusing such a 4-tuple would be sent to a
// listener that is gone. Errors are not fatal: the entries expire anyway.
func deleteStaleConntrack(cfg config) int {
	n, _ := nft.DeleteConntrack(cfg.listenPort)
	return n
}

// removeStale removes what staleRules finds: every instance's rules in both
// backends (stop with none running).
func removeStale() (string, error) {
	stale := staleRules()
	if stale == "" {
		return "", nil
	}
	return stale, removeStaleOf(staleSelector{}, nil)
}

// staleSelector narrows stale-rule removal to one backend and one
// instance's rules, as the guardian needs; the zero value selects all.
type staleSelector struct {
	backend  string // "nft", "iptables" or "" for both
	instance string // intercept.Config.Instance; "" for every instance
	ruleSpec string // ACME_ALPN_PROXY_RULESPEC the instance ran with
}

// removeStaleOf removes the stale rules sel selects; logf, if set, hears
// each removal.
func removeStaleOf(sel staleSelector, logf func(string, ...any)) error {
	var errs []string
	if sel.backend != "iptables" {
		removed, err := nft.RemoveStale(sel.instance)
		if err != nil {
			errs = append(errs, "nftables: "+err.Error())
		}
		if logf != nil {
			for _, f := range removed {
				logf("removed nft table %s %s", f, intercept.TableName)
			}
		}
	}
	if sel.backend != "nft" {
		if _, err := exec.LookPath("iptables"); err == nil {
			if b, err := compat.New(compat.Options{Instance: sel.instance, RuleSpec: sel.ruleSpec, Logf: logf}); err == nil {
				if err := b.Remove(); err != nil {
					errs = append(errs, "iptables: "+err.Error())
				}
			}
		}
	}
	if len(errs) > 0 {
		return errors.New(strings.Join(errs, "; "))
	}
	return nil
}

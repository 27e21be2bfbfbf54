package compat

import (
	"errors"
	"os/exec"
	"regexp"
	"strings"
)

// Causes a failed iptables command is classified into; test with errors.Is.
var (
	ErrNotFound    = errors.New("iptables binary not found")
	ErrPermission  = errors.New("permission denied")
	ErrUnsupported = errors.New("table, match or target unavailable")
	ErrLocked      = errors.New("xtables lock held by another program")
)

// CommandError is a failed iptables invocation, with the cause named and
// the fix suggested on one line.
type CommandError struct {
	Argv   []string
	Output string // the tool's own message, joined to one line
	Kind   error  // one of the Err* causes, or nil if unrecognised
	Hint   string // what to do about it
	Err    error  // from the Runner (exit status, exec failure)
}

func (e *CommandError) Error() string {
	var b strings.Builder
	b.WriteString("compat: ")
	b.WriteString(strings.Join(e.Argv, " "))
	b.WriteString(": ")
	switch {
	case e.Output != "":
		b.WriteString(e.Output)
	case e.Err != nil:
		b.WriteString(e.Err.Error())
	default:
		b.WriteString("failed")
	}
	if e.Hint != "" {
		b.WriteString(" -- ")
		b.WriteString(e.Hint)
	}
	return b.String()
}

// Unwrap exposes both the cause and the Runner's error to errors.Is/As.
func (e *CommandError) Unwrap() []error {
	var errs []error
	if e.Kind != nil {
		errs = append(errs, e.Kind)
	}
	if e.Err != nil {
		errs = append(errs, e.Err)
	}
	return errs
}

var (
	loadFailure  = regexp.MustCompile("Couldn't load (target|match) `([^']*)'")
	tableMissing = regexp.MustCompile("table `?'?([a-z0-9_]+)'?:? ?(Table )?does not exist")
)

// kernelModules names the module behind each extension and table we use,
// so the hint says exactly what to load.
var kernelModules = map[string]string{
	"TPROXY":    "xt_TPROXY",
	"REDIRECT":  "xt_REDIRECT",
	"comment":   "xt_comment",
	"addrtype":  "xt_addrtype",
	"conntrack": "xt_conntrack",
	"tcp":       "xt_tcpudp",
	"nat":       "iptable_nat / ip6table_nat",
	"mangle":    "iptable_mangle / ip6table_mangle",
	"filter":    "iptable_filter / ip6table_filter",
}

// classify turns a failed run into a CommandError naming cause and fix.
// iptables prints its reasons in English under LC_ALL=C (the ExecRunner
// sets it); unknown messages are passed through unchanged.
func classify(argv []string, out []byte, err error) *CommandError {
	msg := oneLine(out)
	e := &CommandError{Argv: argv, Output: msg, Err: err}
	bin := "iptables"
	if len(argv) > 0 {
		bin = argv[0]
	}
	switch {
	case errors.Is(err, exec.ErrNotFound) || (strings.Contains(msg, "exec of") && strings.Contains(msg, "No such file or directory")):
		e.Kind = ErrNotFound
		e.Hint = bin + " is not installed or not in PATH: install the iptables package, or use -backend nft"
	case strings.Contains(msg, "Permission denied") || strings.Contains(msg, "you must be root") || strings.Contains(msg, "Operation not permitted"):
		e.Kind = ErrPermission
		e.Hint = "run as root (CAP_NET_ADMIN is needed to change firewall rules)"
	case strings.Contains(msg, "holding the xtables lock") || strings.Contains(msg, "xtables lock"):
		e.Kind = ErrLocked
		e.Hint = "another program (a firewall manager, Docker) held the xtables lock for " + lockWaitSeconds + "s; retry when it is done"
	case loadFailure.MatchString(msg):
		m := loadFailure.FindStringSubmatch(msg)
		e.Kind = ErrUnsupported
		e.Hint = "the " + m[2] + " " + m[1] + " is unavailable: " + moduleAdvice(m[2])
	case tableMissing.MatchString(msg):
		m := tableMissing.FindStringSubmatch(msg)
		e.Kind = ErrUnsupported
		e.Hint = "the " + m[1] + " table is unavailable: " + moduleAdvice(m[1])
	case strings.Contains(msg, "Address family not supported") || strings.Contains(msg, "Protocol not supported"):
		e.Kind = ErrUnsupported
		e.Hint = "this address family is disabled in the kernel: intercept IPv4 only"
	case strings.Contains(msg, "No chain/target/match by that name") || strings.Contains(msg, "missing kernel module") ||
		strings.Contains(msg, "not supported") || strings.Contains(msg, "(No such file or directory)"):
		e.Kind = ErrUnsupported
		e.Hint = "the kernel lacks an extension this rule uses: " + extensionAdvice(argv)
	}
	return e
}

func moduleAdvice(ext string) string {
	advice := "install the iptables extensions"
	if mod, ok := kernelModules[ext]; ok {
		advice = "load kernel module " + mod + " (modprobe)"
	}
	if ext == "TPROXY" {
		advice += ", or use -mode redirect"
	}
	return advice
}

// extensionAdvice lists the modules behind the matches and target in argv
// when iptables does not say which one is missing.
func extensionAdvice(argv []string) string {
	var mods []string
	tproxy := false
	for i := 0; i+1 < len(argv); i++ {
		if argv[i] == "-m" || argv[i] == "-j" {
			if mod, ok := kernelModules[argv[i+1]]; ok {
				mods = append(mods, mod)
			}
			tproxy = tproxy || argv[i+1] == "TPROXY"
		}
	}
	advice := "check that kernel modules " + strings.Join(mods, ", ") + " load (modprobe)"
	if len(mods) == 0 {
		advice = "see dmesg"
	}
	if tproxy {
		advice += ", or use -mode redirect"
	}
	return advice
}

// oneLine joins the meaningful lines of iptables' output, dropping the
// usage boilerplate, so a failure reads as one log line.
func oneLine(out []byte) string {
	const max = 512
	var parts []string
	for _, l := range strings.Split(string(out), "\n") {
		l = strings.TrimSpace(l)
		if l == "" || strings.HasPrefix(l, "Try `") || strings.HasPrefix(l, "# Warning") {
			continue
		}
		parts = append(parts, l)
	}
	s := strings.Join(parts, "; ")
	if len(s) > max {
		s = s[:max] + "..."
	}
	return s
}

// absent reports whether a -D or -C failed only because the rule is not
// there (exit status 1 with iptables' "no such rule" wording).
func absent(e *CommandError) bool {
	var exit interface{ ExitCode() int }
	if !errors.As(e.Err, &exit) || exit.ExitCode() != 1 {
		return false
	}
	return strings.Contains(e.Output, "Bad rule (does a matching rule exist") ||
		strings.Contains(e.Output, "No chain/target/match by that name")
}

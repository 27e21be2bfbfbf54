// Command acme-alpn-proxy lets an ACME client's TLS-ALPN-01 responder answer
// on port 443 while the web server keeps serving it.
//
//	acme-alpn-proxy [flags] start [-d]          # intercept new tcp/443 connections
//	acme-alpn-proxy [flags] stop                # remove the interception, drain, exit
//	acme-alpn-proxy [flags] status              # 0 active, 3 not running, 4 stale rules
//	acme-alpn-proxy [flags] run -- CMD [ARGS]   # start, run CMD, stop
//	acme-alpn-proxy version                     # module version, commit, Go version
//	acme-alpn-proxy -alpn-certs DIR hook METHOD TYPE IDENT TOKEN AUTH
//
// Every new connection to the web server's port is taken (nftables or
// iptables, TPROXY or NAT redirect) to our listener; its ClientHello is read
// whole, and the connection is relayed to the ACME responder when its ALPN
// list offers acme-tls/1, to the web server otherwise.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/proxyproto"
)

// Exit codes of the status command; scripts depend on them.
const (
	exitOK         = 0
	exitFailure    = 1
	exitUsage      = 2
	exitNotRunning = 3
	exitStale      = 4
)

// config is everything the flags and environment select.
type config struct {
	alpn          string
	alpnCerts     string // "" = relay acme-tls/1 to -alpn; else answer it from this directory
	fallback      string // "" = the original destination, port `port`
	source        fallbackSource
	alpnHeader    proxyproto.Version // PROXY header to the ACME responder; 0 = none
	listen        string
	port          uint16
	listenPort    uint16
	helloTimeout  time.Duration
	drainTimeout  time.Duration
	dialTimeout   time.Duration
	pidfile       string
	logPath       string // "" = default by terminal, "-" = stderr
	backend       string
	mode          string
	noRedirect    bool
	skipPreflight bool
	daemon        bool
	cpuProfile    string
	disableV6     bool
	ruleSpec      string
	plainTables   bool // test only: nftables without owner tables
	returnMark    uint32
	returnTable   uint32
}

func main() {
	os.Exit(realMain(os.Args[1:], os.Stdout, os.Stderr))
}

func usage(w io.Writer, fs *flag.FlagSet) {
	fmt.Fprintf(w, `usage: acme-alpn-proxy [flags] start [-d] | stop | status | run -- COMMAND [ARGS...] | version | hook ...

  start   intercept new connections to -port and route them by ALPN (foreground;
          -d: background, returns once ready)
  stop    remove the interception, let in-flight connections finish, exit
          (exit 0 also when none runs; then removes stale rules)
  status  exit 0: running with interception active; 3: not running;
          4: stale rules of ours with no running proxy; 1: other problem
  run     start, wait until ready, run COMMAND, stop; exits with COMMAND's status
  version module version, VCS revision and time, Go version (also -version)
  hook METHOD TYPE IDENT TOKEN AUTH
          uacme's hook protocol: begin writes IDENT's TLS-ALPN-01 certificate into
          -alpn-certs (or $ACME_ALPN_PROXY_ALPN_CERTS), done/failed removes it;
          exit 1 for challenge types other than tls-alpn-01. uacme runs its -h
          PROGRAM without arguments: give it this binary's path; run sets the
          variable for its COMMAND

start intercepts each address family (IPv4, IPv6) on which a web server
listens on -port, warns about a family without one and leaves it alone,
and refuses when neither has one.

flags (before or after the command):
`)
	fs.SetOutput(w)
	fs.PrintDefaults()
	fmt.Fprint(w, `
environment:
  ACME_ALPN_PROXY_PIDFILE   default for -pidfile
  ACME_ALPN_PROXY_DISABLEV6 =y: do not intercept IPv6 (and do not warn about it)
  JOURNAL_STREAM            set by systemd: when it names our stderr, the log
                            goes there by default, with syslog priorities
  ACME_ALPN_PROXY_ALPN_CERTS the hook's directory when -alpn-certs is not given
  ACME_ALPN_PROXY_RULESPEC  iptables rule text after "-t nat -I PREROUTING 1"
                            (redirect mode; selects the iptables backend under auto)
  ACME_ALPN_PROXY_TEST_PLAIN_TABLES
                            =y: for tests only: nftables plain tables, as on a
                            kernel < 5.12 (the guardian then removes them after a crash)
`)
}

func realMain(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 && args[0] == guardianCommand {
		return guardianMain(args[1:], stderr)
	}
	if isBareHookCall(args) {
		return runHook(os.Getenv(alpnCertsEnv), args, stderr)
	}
	cfg, cmd, cmdArgs, err := parseArgs(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return exitOK
	}
	if err != nil {
		fmt.Fprintf(stderr, "acme-alpn-proxy: %v\n", err)
		return exitUsage
	}
	switch cmd {
	case "start":
		if cfg.daemon {
			return startDaemon(cfg, stdout, stderr)
		}
		return startForeground(cfg, stdout, stderr)
	case "stop":
		return stop(cfg, stdout, stderr)
	case "status":
		return status(cfg, stdout, stderr)
	case "run":
		return runWrapped(cfg, cmdArgs, stderr)
	case "version":
		return printVersion(stdout)
	case "hook":
		dir := cfg.alpnCerts
		if dir == "" {
			dir = os.Getenv(alpnCertsEnv)
		}
		return runHook(dir, cmdArgs, stderr)
	}
	panic("unreachable: parseArgs returned unknown command " + cmd)
}

// parseArgs parses flags given before and after the command word.
func parseArgs(args []string, stderr io.Writer) (cfg config, cmd string, rest []string, err error) {
	fs := flag.NewFlagSet("acme-alpn-proxy", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	pidDefault := "/run/acme-alpn-proxy.pid"
	if p := os.Getenv("ACME_ALPN_PROXY_PIDFILE"); p != "" {
		pidDefault = p
	}
	port := fs.Uint("port", 443, "incoming `port` to intercept")
	fs.StringVar(&cfg.alpn, "alpn", "127.0.0.1:31443", "ACME TLS-ALPN-01 responder `host:port`")
	fs.StringVar(&cfg.alpnCerts, "alpn-certs", "", "answer acme-tls/1 in the proxy with the challenge certificates in `dir`\n"+
		"(<name>.crt.pem and <name>.key.pem, as dehydrated writes them); excludes -alpn")
	fs.StringVar(&cfg.fallback, "fallback", "", "web server `host:port` (default: the address the client dialed, port -port;\n"+
		"note: a loopback fallback makes every client look like localhost to the web server)")
	source := fs.String("fallback-source", "client", "how the web server learns the client's address: client (connections come from\n"+
		"the client's own address, where the return path works; else host, with a log line saying why),\n"+
		"host (from this host's), proxy-v1 or proxy-v2 (a PROXY protocol header; the web server must expect one)")
	alpnHeader := fs.String("alpn-proxy-protocol", "off", "PROXY protocol header to the ACME responder: off, v1 or v2")
	fs.StringVar(&cfg.listen, "listen", ":21443", "proxy listener `address` (host empty: each family start intercepts)")
	fs.DurationVar(&cfg.helloTimeout, "hello-timeout", 10*time.Second, "max `time` to receive a whole ClientHello")
	fs.DurationVar(&cfg.drainTimeout, "drain-timeout", 180*time.Second, "max `time` to wait for in-flight connections at stop")
	fs.DurationVar(&cfg.dialTimeout, "dial-timeout", 5*time.Second, "max `time` to connect to a backend")
	fs.StringVar(&cfg.pidfile, "pidfile", pidDefault, "pid file `path` (env ACME_ALPN_PROXY_PIDFILE)")
	fs.StringVar(&cfg.logPath, "log", "", "log file `path` (\"-\" = stderr; default stderr on a terminal,\n"+
		"or the journal (systemd), else /var/log/acme-alpn-proxy.log)")
	fs.StringVar(&cfg.backend, "backend", "auto", "netfilter backend: auto, nft or iptables")
	fs.StringVar(&cfg.mode, "mode", "auto", "interception: auto (tproxy where the kernel has it), tproxy or redirect")
	fs.BoolVar(&cfg.noRedirect, "no-redirect", false, "listen, sniff and relay only: install no rule, need no privileges")
	fs.BoolVar(&cfg.skipPreflight, "skip-preflight", false, "intercept every family without checking that a web server listens")
	fs.StringVar(&cfg.cpuProfile, "cpuprofile", "", "write a CPU profile (pprof) from ready until stop to `path`")
	fs.BoolVar(&cfg.daemon, "d", false, "with start: run in the background, return once ready")
	showVersion := fs.Bool("version", false, "print the version (as the version command) and exit")
	mark := fs.String("return-mark", fmt.Sprintf("%#x", defaultReturnMark), returnMarkFlagUsage)
	table := fs.Uint("return-table", defaultReturnTable, returnTableFlagUsage)

	if err = fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			usage(stderr, fs)
		}
		return cfg, "", nil, err
	}
	if *showVersion {
		return cfg, "version", nil, nil
	}
	if fs.NArg() == 0 {
		usage(stderr, fs)
		return cfg, "", nil, errors.New("missing command: start, stop, status, run, version or hook")
	}
	cmd = fs.Arg(0)
	switch cmd {
	case "start", "stop", "status", "run", "version", "hook":
	default:
		return cfg, "", nil, fmt.Errorf("unknown command %q (want start, stop, status, run, version or hook)", cmd)
	}
	if cmd == "hook" {
		// Flags end at METHOD, so an AUTH beginning with "-" is no flag.
		if err = fs.Parse(fs.Args()[1:]); err != nil {
			return cfg, "", nil, err
		}
		return cfg, cmd, fs.Args(), checkAlpnCerts(fs, &cfg)
	}
	if err = fs.Parse(fs.Args()[1:]); err != nil {
		return cfg, "", nil, err
	}
	rest = fs.Args()
	if cmd == "run" && len(rest) == 0 {
		return cfg, "", nil, errors.New("run needs a command: run -- COMMAND [ARGS...]")
	}
	if cmd != "run" && len(rest) > 0 {
		return cfg, "", nil, fmt.Errorf("unexpected arguments after %s: %q", cmd, rest)
	}
	if cfg.daemon && cmd != "start" {
		return cfg, "", nil, errors.New("-d goes with start")
	}

	if *port == 0 || *port > 65535 {
		return cfg, "", nil, fmt.Errorf("-port %d: want 1-65535", *port)
	}
	cfg.port = uint16(*port)
	if cfg.listenPort, err = listenPort(cfg.listen); err != nil {
		return cfg, "", nil, err
	}
	if cfg.listenPort == cfg.port {
		return cfg, "", nil, fmt.Errorf("-listen port %d equals -port: the proxy would intercept itself", cfg.port)
	}
	if err = checkHostPort("-alpn", cfg.alpn); err != nil {
		return cfg, "", nil, err
	}
	if err = checkAlpnCerts(fs, &cfg); err != nil {
		return cfg, "", nil, err
	}
	if cfg.fallback != "" {
		if err = checkHostPort("-fallback", cfg.fallback); err != nil {
			return cfg, "", nil, err
		}
	}
	if cfg.source, err = parseFallbackSource(*source); err != nil {
		return cfg, "", nil, err
	}
	if cfg.alpnHeader, err = parseHeaderVersion("-alpn-proxy-protocol", *alpnHeader); err != nil {
		return cfg, "", nil, err
	}
	for name, d := range map[string]time.Duration{"-hello-timeout": cfg.helloTimeout, "-drain-timeout": cfg.drainTimeout, "-dial-timeout": cfg.dialTimeout} {
		if d <= 0 {
			return cfg, "", nil, fmt.Errorf("%s %v: want a positive duration", name, d)
		}
	}
	switch cfg.backend {
	case "auto", "nft", "iptables":
	default:
		return cfg, "", nil, fmt.Errorf("-backend %q: want auto, nft or iptables", cfg.backend)
	}
	switch cfg.mode {
	case "auto", "tproxy", "redirect":
	default:
		return cfg, "", nil, fmt.Errorf("-mode %q: want auto, tproxy or redirect", cfg.mode)
	}
	if cfg.returnMark, err = parseMark(*mark); err != nil {
		return cfg, "", nil, err
	}
	if *table == 0 || *table > 0xffffffff || *table >= 253 && *table <= 255 {
		return cfg, "", nil, fmt.Errorf("-return-table %d: want 1-4294967295 other than 253-255 (the kernel's own tables)", *table)
	}
	cfg.returnTable = uint32(*table)
	cfg.disableV6 = envYes(os.Getenv("ACME_ALPN_PROXY_DISABLEV6"))
	cfg.ruleSpec = strings.TrimSpace(os.Getenv("ACME_ALPN_PROXY_RULESPEC"))
	cfg.plainTables = envYes(os.Getenv("ACME_ALPN_PROXY_TEST_PLAIN_TABLES"))
	if cfg.ruleSpec != "" {
		if cfg.backend == "nft" {
			return cfg, "", nil, errors.New("ACME_ALPN_PROXY_RULESPEC is iptables rule text: it cannot be used with -backend nft (unset it, or use -backend iptables)")
		}
		if cfg.mode == "tproxy" {
			return cfg, "", nil, errors.New("ACME_ALPN_PROXY_RULESPEC replaces the NAT redirect rule: it cannot be used with -mode tproxy")
		}
	}
	return cfg, cmd, rest, nil
}

func envYes(v string) bool {
	switch strings.ToLower(strings.TrimSpace(v)) {
	case "y", "yes", "1", "true", "on":
		return true
	}
	return false
}

func listenPort(listen string) (uint16, error) {
	_, p, err := net.SplitHostPort(listen)
	if err != nil {
		return 0, fmt.Errorf("-listen %q: %v (want host:port, e.g. :21443)", listen, err)
	}
	n, err := strconv.ParseUint(p, 10, 16)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("-listen %q: port must be 1-65535", listen)
	}
	return uint16(n), nil
}

func checkHostPort(flagName, v string) error {
	h, p, err := net.SplitHostPort(v)
	if err != nil {
		return fmt.Errorf("%s %q: %v (want host:port)", flagName, v, err)
	}
	if h == "" {
		return fmt.Errorf("%s %q: host is empty (want e.g. 127.0.0.1:%s)", flagName, v, p)
	}
	if n, err := strconv.ParseUint(p, 10, 16); err != nil || n == 0 {
		return fmt.Errorf("%s %q: port must be 1-65535", flagName, v)
	}
	return nil
}

package e2e

// Harness: the proxy binary, privilege checks, the (backend, mode) matrix,
// network namespaces and the proxy process. Servers, clients and the load
// generator are in servers_test.go.

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TableName is the nftables table (and iptables comment) the proxy owns.
const TableName = "acme-alpn-proxy"

// ListenPort is the proxy's default listener port.
const ListenPort = 21443

// proxyBin is the acme-alpn-proxy binary built by TestMain; buildErr says
// why there is none. Tests needing it fail through requireBinary, so tests
// of the harness itself still run when the binary does not build.
var (
	proxyBin string
	buildErr error
)

// TestMain builds the binary once from the repository root (the parent of
// this directory), so every test runs exactly the code under test, unless
// ACME_ALPN_PROXY_E2E_BIN names a binary to test instead.
func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "acme-alpn-proxy-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		os.Exit(1)
	}
	if bin := os.Getenv("ACME_ALPN_PROXY_E2E_BIN"); bin != "" {
		// A prebuilt binary: CI artifacts, or mutants when checking that
		// these tests catch a broken proxy.
		proxyBin, buildErr = filepath.Abs(bin)
	} else {
		proxyBin, buildErr = buildProxy(dir)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func buildProxy(dir string) (string, error) {
	root, err := filepath.Abs("..")
	if err != nil {
		return "", err
	}
	if _, err := os.Stat(filepath.Join(root, "go.mod")); err != nil {
		return "", fmt.Errorf("repository root not found at %s: %w", root, err)
	}
	bin := filepath.Join(dir, "acme-alpn-proxy")
	build := exec.Command("go", "build", "-o", bin, "./cmd/acme-alpn-proxy")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build ./cmd/acme-alpn-proxy: %w\n%s", err, out)
	}
	return bin, nil
}

// requireBinary fails the test if TestMain could not build the proxy.
func requireBinary(t testing.TB) {
	t.Helper()
	if buildErr != nil {
		t.Fatal(buildErr)
	}
}

// inCI reports whether privileged tests must run rather than skip.
func inCI() bool { return os.Getenv("CI") == "true" }

// skipOrFail skips the test, or fails it in CI, where the privileged e2e
// tests are required to run.
func skipOrFail(t testing.TB, why string) {
	t.Helper()
	if inCI() {
		t.Fatalf("%s (CI=true: privileged e2e tests must run)", why)
	}
	t.Skip(why)
}

// requireRoot skips (fails in CI) unless the test runs as root.
func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		skipOrFail(t, "e2e tests need root")
	}
}

// requireTools skips (fails in CI) unless every tool is on PATH.
func requireTools(t testing.TB, tools ...string) {
	t.Helper()
	var missing []string
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			missing = append(missing, tool)
		}
	}
	if len(missing) > 0 {
		skipOrFail(t, "e2e tests need "+strings.Join(missing, ", ")+" on PATH")
	}
}

// requirePrivileges is what every namespace test needs: root, ip and nft.
func requirePrivileges(t testing.TB) {
	t.Helper()
	requireRoot(t)
	requireTools(t, "ip", "nft")
}

// Variant is one (backend, mode) combination the proxy is tested in.
type Variant struct {
	Backend string // "nft" or "iptables" (the -backend flag)
	Mode    string // "redirect" or "tproxy" (the -mode flag)
	// Iptables is, for Backend "iptables", which iptables the proxy finds
	// on PATH: "legacy" or "nft" (see iptablesShim).
	Iptables string
}

// Name is the subtest name, e.g. "nft-tproxy" or "iptables-legacy-redirect".
func (v Variant) Name() string {
	if v.Backend == "iptables" {
		return "iptables-" + v.Iptables + "-" + v.Mode
	}
	return v.Backend + "-" + v.Mode
}

// variants is the matrix every core test runs over. It is one list so a
// backend is added in one place, e.g.
//
//	{Backend: "iptables", Mode: "redirect", Iptables: "legacy"},
//	{Backend: "iptables", Mode: "tproxy", Iptables: "nft"},
var variants = []Variant{
	{Backend: "nft", Mode: "redirect"},
	{Backend: "nft", Mode: "tproxy"},
	{Backend: "iptables", Mode: "redirect", Iptables: "legacy"},
	{Backend: "iptables", Mode: "tproxy", Iptables: "legacy"},
	{Backend: "iptables", Mode: "redirect", Iptables: "nft"},
	{Backend: "iptables", Mode: "tproxy", Iptables: "nft"},
}

// forEachVariant runs fn as a parallel subtest per variant. Each subtest
// builds its own namespaces, so they are independent.
func forEachVariant(t *testing.T, fn func(t *testing.T, v Variant)) {
	t.Helper()
	forEachVariantWhere(t, func(Variant) bool { return true }, fn)
}

// forEachVariantWhere is forEachVariant over the variants keep accepts,
// for behaviour that differs by mode or backend.
func forEachVariantWhere(t *testing.T, keep func(Variant) bool, fn func(t *testing.T, v Variant)) {
	t.Helper()
	for _, v := range variants {
		if !keep(v) {
			continue
		}
		t.Run(v.Name(), func(t *testing.T) {
			t.Parallel()
			requirePrivileges(t)
			fn(t, v)
		})
	}
}

// iptablesTools are the names a program may run for iptables.
var iptablesTools = []string{
	"iptables", "iptables-save", "iptables-restore",
	"ip6tables", "ip6tables-save", "ip6tables-restore",
}

// iptablesShim returns a directory for the front of PATH in which
// iptables, ip6tables and their -save/-restore point at the given flavour
// ("legacy" or "nft"), whatever the host's alternatives say. The
// xtables multi-binaries dispatch on the link's own name.
func iptablesShim(t testing.TB, flavor string) string {
	t.Helper()
	dir := t.TempDir()
	for _, name := range iptablesTools {
		real := strings.Replace(name, "tables", "tables-"+flavor, 1) // iptables-save → iptables-legacy-save
		path, err := exec.LookPath(real)
		if err != nil {
			skipOrFail(t, fmt.Sprintf("iptables %s variant needs %s: %v", flavor, real, err))
		}
		if err := os.Symlink(path, filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// randomTag returns a short random hex string for namespace names.
func randomTag() string {
	b := make([]byte, 3)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}

// Netns is a named network namespace (/run/netns/NAME) created by a test.
type Netns struct {
	Name string
	fd   int
}

// newNetns creates the namespace with lo up; t.Cleanup deletes it.
func newNetns(t testing.TB, name string) *Netns {
	t.Helper()
	mustRun(t, "ip", "netns", "add", name)
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", name, err, out)
		}
	})
	fd, err := unix.Open("/run/netns/"+name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("open netns %s: %v", name, err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	ns := &Netns{Name: name, fd: fd}
	ns.MustExec(t, "ip", "link", "set", "lo", "up")
	return ns
}

// Do runs fn on an OS thread that has entered the namespace. Sockets fn
// creates stay in the namespace for their whole life, wherever they are
// used afterwards. fn must not start goroutines that create sockets.
func (n *Netns) Do(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		// If the thread cannot return to its namespace it is left locked:
		// the runtime then ends the thread with this goroutine.
		runtime.LockOSThread()
		orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open own netns: %w", err)
			return
		}
		defer unix.Close(orig)
		if err := unix.Setns(n.fd, unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("setns %s: %w", n.Name, err)
			return
		}
		fnErr := fn()
		if err := unix.Setns(orig, unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns back from %s: %w", n.Name, err)
			return
		}
		runtime.UnlockOSThread()
		errc <- fnErr
	}()
	return <-errc
}

// Listen is net.Listen inside the namespace.
func (n *Netns) Listen(network, addr string) (net.Listener, error) {
	var ln net.Listener
	err := n.Do(func() (err error) {
		ln, err = net.Listen(network, addr)
		return err
	})
	return ln, err
}

// DialContext dials from inside the namespace. Use IP literals only, so no
// resolver goroutine opens sockets outside it.
func (n *Netns) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := n.Do(func() (err error) {
		var d net.Dialer
		c, err = d.DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

// Dial dials addr (an IP literal with port) over TCP from the namespace.
func (n *Netns) Dial(ctx context.Context, addr netip.AddrPort) (net.Conn, error) {
	return n.DialContext(ctx, "tcp", addr.String())
}

// Exec runs a command inside the namespace and returns its combined output.
func (n *Netns) Exec(ctx context.Context, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.Name, name}, args...)...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// MustExec is Exec that fails the test on error.
func (n *Netns) MustExec(t testing.TB, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := n.Exec(ctx, name, args...)
	if err != nil {
		t.Fatalf("in %s: %s %s: %v\n%s", n.Name, name, strings.Join(args, " "), err, out)
	}
	return out
}

func mustRun(t testing.TB, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// Family is an IP address family for subtests.
type Family int

const (
	IPv4 Family = 4
	IPv6 Family = 6
)

func (f Family) String() string {
	if f == IPv6 {
		return "ipv6"
	}
	return "ipv4"
}

// families are the address families tests run over.
var families = []Family{IPv4, IPv6}

// Env is a server namespace (where the proxy and web server run) and a
// client namespace, joined by a veth pair, with IPv4 and IPv6 addresses.
type Env struct {
	Srv, Cli *Netns
	SrvV4    netip.Addr // 198.18.0.1
	CliV4    netip.Addr // 198.18.0.2
	SrvV6    netip.Addr // fd00:e2::1
	CliV6    netip.Addr // fd00:e2::2
}

// NewEnv creates the two namespaces; t.Cleanup deletes them.
func NewEnv(t testing.TB) *Env {
	t.Helper()
	return NewEnvTagged(t, "e2")
}

// NewEnvTagged is NewEnv with namespace names starting with tag, so the
// namespaces of a group of tests can be told apart (and traced) in
// `ip netns list`.
func NewEnvTagged(t testing.TB, tag string) *Env {
	t.Helper()
	requirePrivileges(t)
	tag += "-" + randomTag()
	e := &Env{
		Srv:   newNetns(t, tag+"-srv"),
		Cli:   newNetns(t, tag+"-cli"),
		SrvV4: netip.MustParseAddr("198.18.0.1"),
		CliV4: netip.MustParseAddr("198.18.0.2"),
		SrvV6: netip.MustParseAddr("fd00:e2::1"),
		CliV6: netip.MustParseAddr("fd00:e2::2"),
	}
	// Created inside the server namespace with its peer moved straight to
	// the client one, so no name is ever taken in the host namespace.
	e.Srv.MustExec(t, "ip", "link", "add", "e2v", "type", "veth", "peer", "name", "e2v", "netns", e.Cli.Name)
	for _, side := range []struct {
		ns     *Netns
		v4, v6 netip.Addr
	}{{e.Srv, e.SrvV4, e.SrvV6}, {e.Cli, e.CliV4, e.CliV6}} {
		side.ns.MustExec(t, "ip", "addr", "add", side.v4.String()+"/24", "dev", "e2v")
		// nodad: usable at once instead of after duplicate detection.
		side.ns.MustExec(t, "ip", "-6", "addr", "add", side.v6.String()+"/64", "dev", "e2v", "nodad")
		side.ns.MustExec(t, "ip", "link", "set", "e2v", "up")
	}
	// The server's default gateway is the client namespace, as a host has
	// one: the web server's first reply to an address of no connected
	// network (the proxy's start-time check dials from 192.0.2.1) needs a
	// route before our mark sends it back to the proxy. The client
	// namespace forwards nothing, so no packet leaves the two namespaces.
	e.Srv.MustExec(t, "ip", "route", "add", "default", "via", e.CliV4.String())
	e.Srv.MustExec(t, "ip", "-6", "route", "add", "default", "via", e.CliV6.String())
	return e
}

// ServerAddr is the server namespace's address of family f with port.
func (e *Env) ServerAddr(f Family, port uint16) netip.AddrPort {
	if f == IPv6 {
		return netip.AddrPortFrom(e.SrvV6, port)
	}
	return netip.AddrPortFrom(e.SrvV4, port)
}

// ClientAddr is the client namespace's address of family f.
func (e *Env) ClientAddr(f Family) netip.Addr {
	if f == IPv6 {
		return e.CliV6
	}
	return e.CliV4
}

// OurRules returns every line of the server namespace's rule set that
// belongs to the proxy: nftables (our tables, and iptables-nft rules with
// our comment) and, for iptables variants, the rules iptables-save shows.
// Empty means nothing of ours is installed.
func (e *Env) OurRules(t testing.TB, v Variant) []string {
	t.Helper()
	var lines []string
	collect := func(out string) {
		for _, l := range strings.Split(out, "\n") {
			if strings.Contains(l, TableName) {
				lines = append(lines, strings.TrimSpace(l))
			}
		}
	}
	collect(e.Srv.MustExec(t, "nft", "list", "ruleset"))
	if v.Backend == "iptables" {
		// Only the flavour the proxy uses: listing legacy tables that do
		// not exist yet is harmless, but keep the namespace as the proxy
		// left it.
		for _, save := range []string{"iptables-" + v.Iptables + "-save", "ip6tables-" + v.Iptables + "-save"} {
			collect(e.Srv.MustExec(t, save))
		}
	}
	return lines
}

// syncBuffer is a bytes.Buffer safe for a child's output and the test.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func (b *syncBuffer) Len() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Len()
}

// Proxy runs the acme-alpn-proxy binary in the server namespace: one
// foreground `start` child at a time, plus CLI invocations (stop, status…)
// sharing its flags and pidfile.
type Proxy struct {
	t       testing.TB
	env     *Env
	Variant Variant
	PidFile string
	flags   []string // before the subcommand on every invocation
	environ []string
	// Wrapper, if set, runs the binary inside the namespace: its argv,
	// then the binary's (e.g. a shell that sets signal dispositions).
	Wrapper []string
	log     syncBuffer // stderr of every start child, in order

	mu       sync.Mutex
	cmd      *exec.Cmd     // current start child, nil if none
	done     chan struct{} // closed when cmd has exited
	waitErr  error
	logStart int // offset in log where the current child's output begins
}

// NewProxy prepares a proxy for variant v with extra flags (e.g.
// "-hello-timeout", "2s"). It gets its own pidfile. t.Cleanup kills a
// child still running and logs everything the proxy wrote if t failed.
func (e *Env) NewProxy(t testing.TB, v Variant, extra ...string) *Proxy {
	t.Helper()
	requireBinary(t)
	dir := t.TempDir()
	p := &Proxy{
		t: t, env: e, Variant: v,
		PidFile: filepath.Join(dir, "pid"),
		environ: os.Environ(),
	}
	p.flags = append([]string{"-log", "-", "-pidfile", p.PidFile, "-backend", v.Backend, "-mode", v.Mode}, extra...)
	if v.Backend == "iptables" {
		requireTools(t, "iptables-"+v.Iptables)
		p.environ = append(p.environ, "PATH="+iptablesShim(t, v.Iptables)+string(os.PathListSeparator)+os.Getenv("PATH"))
	}
	t.Cleanup(func() {
		p.killChild()
		if t.Failed() {
			t.Logf("proxy %s output:\n%s", v.Name(), p.log.String())
		}
	})
	return p
}

func (p *Proxy) command(ctx context.Context, args ...string) *exec.Cmd {
	argv := append(append([]string{"netns", "exec", p.env.Srv.Name}, p.Wrapper...), proxyBin)
	argv = append(argv, p.flags...)
	cmd := exec.CommandContext(ctx, "ip", append(argv, args...)...)
	cmd.Env = p.environ
	// Own process group: a terminal's or the test runner's signals do not
	// reach it, and it can be killed as a group.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// Result is the outcome of one CLI invocation.
type Result struct {
	Args   []string
	Code   int // exit status; -1 if it did not run or was killed
	Output string
	Err    error // set when it did not run or was killed
}

func (r Result) String() string {
	return fmt.Sprintf("acme-alpn-proxy %s: exit %d\n%s", strings.Join(r.Args, " "), r.Code, r.Output)
}

// Run runs one CLI invocation (e.g. "stop", "status") to completion,
// bounded by ctx. Safe from any goroutine; never fails the test itself.
func (p *Proxy) Run(ctx context.Context, args ...string) Result {
	cmd := p.command(ctx, args...)
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	// ExitCode is -1 when it did not start or was killed by a signal.
	r := Result{Args: args, Code: cmd.ProcessState.ExitCode(), Output: out.String()}
	var exitErr *exec.ExitError
	if err != nil && !errors.As(err, &exitErr) {
		r.Err = err
	} else if ctx.Err() != nil {
		r.Err = ctx.Err()
	}
	return r
}

// RunT is Run with a 60 s bound, failing the test if it could not run.
func (p *Proxy) RunT(args ...string) Result {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	r := p.Run(ctx, args...)
	if r.Err != nil {
		p.t.Fatalf("%v: %v", r, r.Err)
	}
	return r
}

// Status returns the exit code of `status`.
func (p *Proxy) Status() int {
	p.t.Helper()
	return p.RunT("status").Code
}

// Start launches `start` in the foreground as a child and waits (bounded)
// until `status` exits 0 and the log says msg=ready. Fails the test if the
// child exits first or readiness does not come.
func (p *Proxy) Start() {
	p.t.Helper()
	if err := p.Launch(); err != nil {
		p.t.Fatal(err)
	}
	if err := p.WaitReady(20 * time.Second); err != nil {
		p.t.Fatal(err)
	}
}

// Launch starts the foreground `start` child without waiting for it.
func (p *Proxy) Launch(args ...string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd != nil {
		select {
		case <-p.done:
		default:
			return fmt.Errorf("proxy child %d still running", p.cmd.Process.Pid)
		}
	}
	fmt.Fprintf(&p.log, "----- start %s\n", strings.Join(args, " "))
	p.logStart = p.log.Len()
	cmd := p.command(context.Background(), append([]string{"start"}, args...)...)
	cmd.Stdout, cmd.Stderr = &p.log, &p.log
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start proxy: %w", err)
	}
	done := make(chan struct{})
	p.cmd, p.done = cmd, done
	go func() {
		err := cmd.Wait()
		p.mu.Lock()
		p.waitErr = err
		p.mu.Unlock()
		close(done)
	}()
	return nil
}

// RunLog is what the current (or last) start child has written so far.
func (p *Proxy) RunLog() string {
	p.mu.Lock()
	start := p.logStart
	p.mu.Unlock()
	s := p.log.String()
	if start > len(s) {
		return ""
	}
	return s[start:]
}

// Log is everything every start child has written.
func (p *Proxy) Log() string { return p.log.String() }

// Done is closed when the current start child has exited.
func (p *Proxy) Done() <-chan struct{} {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.done
}

// ExitErr is the current child's Wait result, once Done is closed.
func (p *Proxy) ExitErr() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.waitErr
}

// WaitReady polls until status exits 0 and msg=ready is logged.
func (p *Proxy) WaitReady(limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		select {
		case <-p.Done():
			return fmt.Errorf("proxy exited before ready: %v\n%s", p.ExitErr(), p.RunLog())
		default:
		}
		if strings.Contains(p.RunLog(), "msg=ready") {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			r := p.Run(ctx, "status")
			cancel()
			if r.Code == 0 {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("proxy not ready after %v (status 0 and msg=ready expected)\n%s", limit, p.RunLog())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// WaitExit waits (bounded) for the start child to exit.
func (p *Proxy) WaitExit(limit time.Duration) error {
	done := p.Done()
	if done == nil {
		return nil
	}
	select {
	case <-done:
		return nil
	case <-time.After(limit):
		return fmt.Errorf("proxy still running %v later", limit)
	}
}

// Stop runs `stop`, requires exit 0, and requires the start child to have
// exited, with status 0, by the time stop returns (stop waits for the
// instance to exit).
func (p *Proxy) Stop() {
	p.t.Helper()
	r := p.RunT("stop")
	if r.Code != 0 {
		p.t.Fatalf("stop failed: %v", r)
	}
	if err := p.WaitExit(2 * time.Second); err != nil {
		p.t.Fatalf("stop returned 0 but the instance did not exit: %v\n%v", err, r)
	}
	if err := p.ExitErr(); err != nil {
		p.t.Errorf("foreground start ended with %v after a clean stop, want exit 0", err)
	}
}

// Kill9 sends SIGKILL to the start child (by the PID we started) and waits
// for it to exit.
func (p *Proxy) Kill9() {
	p.t.Helper()
	p.mu.Lock()
	cmd := p.cmd
	p.mu.Unlock()
	if cmd == nil {
		p.t.Fatal("Kill9: no proxy child")
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		p.t.Fatalf("kill -9 %d: %v", cmd.Process.Pid, err)
	}
	if err := p.WaitExit(10 * time.Second); err != nil {
		p.t.Fatal(err)
	}
}

// Signal sends sig to the start child (by the PID we started), e.g. the
// SIGINT of a Ctrl-C, without waiting.
func (p *Proxy) Signal(sig syscall.Signal) {
	p.t.Helper()
	p.mu.Lock()
	cmd := p.cmd
	p.mu.Unlock()
	if cmd == nil {
		p.t.Fatal("Signal: no proxy child")
	}
	if err := cmd.Process.Signal(sig); err != nil {
		p.t.Fatalf("kill -%d %d: %v", sig, cmd.Process.Pid, err)
	}
}

// Pid is the running start child's PID.
func (p *Proxy) Pid() int {
	p.t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil {
		p.t.Fatal("Pid: no proxy child")
	}
	return p.cmd.Process.Pid
}

// killChild kills the running start child's process group, if any.
func (p *Proxy) killChild() {
	p.mu.Lock()
	cmd, done := p.cmd, p.done
	p.mu.Unlock()
	if cmd == nil {
		return
	}
	select {
	case <-done:
		return
	default:
	}
	syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		p.t.Errorf("proxy child %d did not die after SIGKILL", cmd.Process.Pid)
	}
}

package main

// The guardian removes our rules when the proxy dies without removing them
// itself (kill -9, the OOM killer, a panic) on hosts where the kernel does
// not: the iptables backend, and nftables plain tables (kernels < 5.12).
// Owner tables need none: the kernel deletes them with the proxy's socket.
//
// It is this binary re-executed with a hidden command, started before the
// interception is installed, so no moment exists in which rules are
// installed and nobody would remove them. It knows the proxy by a pipe whose
// write end only the proxy holds (close-on-exec, so not even `run`'s
// command inherits it): end of file on it means every descriptor of the
// proxy is closed, i.e. the proxy has exited, whatever the cause; a PID
// could be reused. Before exiting cleanly the proxy writes "clean" on it.
//
// It survives what the proxy dies of: its own session and process group (a
// terminal's Ctrl-C and `kill -9 -PGID` of the proxy's group miss it),
// SIGHUP, SIGPIPE, SIGINT and SIGTERM ignored (it exits when the proxy
// does), and oom_score_adj -999, so the OOM killer
// takes the proxy, whose memory grows with its connections, long before
// this process of a few MiB.
//
// It never removes a newer instance's rules: it removes only rules tagged
// with its proxy's instance id, and only while holding the pid-file lock,
// which a newer instance holds from before it installs anything.

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/compat"
	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/intercept"
	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/nft"
)

// guardianCommand is the hidden command word; usage does not list it.
const guardianCommand = "guardian-internal"

// guardianOOMScoreAdj is the guardian's oom_score_adj. Not -1000, which
// exempts a process from the OOM killer: at -999 it is still chosen if,
// through some bug, it grows to nearly all of memory, but never before a
// process of ordinary size, and the proxy keeps the score it was given.
const guardianOOMScoreAdj = -999

// guardianNice is the guardian's nice value. It sleeps until the proxy
// dies; then its few milliseconds of work (and its iptables commands,
// which inherit it) are all that stands between new connections and a
// port with nobody behind it, often on a host busy with whatever killed
// the proxy. -10 puts that work ahead of ordinary load, not of the kernel
// threads and real-time tasks above it.
const guardianNice = -10

// guardianReadyTimeout bounds how long start waits for the guardian.
const guardianReadyTimeout = 10 * time.Second

// guardianLockWait bounds how long the guardian waits for the pid-file lock
// while the file still names its dead proxy: the kernel drops the proxy's
// lock in the same exit step that closes our pipe, microseconds apart.
// Past it, the holder is a newer instance that has not written its PID yet.
const guardianLockWait = 250 * time.Millisecond

// Descriptors of the guardian: the life pipe's read end and the ready
// pipe's write end (exec.Cmd.ExtraFiles start at 3).
const (
	guardianLifeFD  = 3
	guardianReadyFD = 4
)

// Messages on the life pipe: installedMsg + "MODE FAMILY..." once the
// rules are in (so the guardian can delete them without listing chains
// first), cleanMsg once they are gone again.
const (
	installedMsg = "installed "
	cleanMsg     = "clean\n"
)

// lifeNews is what the proxy told the guardian before it exited.
type lifeNews struct {
	clean    bool
	mode     intercept.Mode // "" if the rules were never reported installed
	families []intercept.Family
}

func parseLifeNews(msg string) lifeNews {
	var n lifeNews
	for line := range strings.Lines(msg) {
		if line == cleanMsg {
			n.clean = true
			continue
		}
		rest, ok := strings.CutPrefix(strings.TrimSuffix(line, "\n"), installedMsg)
		if !ok {
			continue
		}
		fields := strings.Fields(rest)
		if len(fields) < 2 {
			continue
		}
		mode, err := intercept.ParseMode(fields[0])
		if err != nil {
			continue
		}
		var fams []intercept.Family
		for _, f := range fields[1:] {
			switch f {
			case intercept.IPv4.String():
				fams = append(fams, intercept.IPv4)
			case intercept.IPv6.String():
				fams = append(fams, intercept.IPv6)
			}
		}
		n.mode, n.families, n.clean = mode, fams, false
	}
	return n
}

// newInstanceID returns the id that ties rules to one run of the proxy.
func newInstanceID() (string, error) {
	b := make([]byte, 6)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("instance id: %w", err)
	}
	return hex.EncodeToString(b), nil
}

// needsGuardian reports whether a backend leaves rules behind when the
// process dies: iptables always, nftables on a kernel without owner tables
// (which Install learns; start runs the guardian before and dismisses it
// after installing owner tables).
func needsGuardian(ic interceptor) bool {
	b, ok := ic.(*nft.Backend)
	return !ok || !b.Owner()
}

// guardian is the proxy's handle on its guardian process.
type guardian struct {
	pid    int
	life   *os.File // write end; closing it without cleanMsg means "clean up"
	exited chan struct{}
	// dismissed: the guardian's exit is expected, no warning.
	dismissed atomic.Bool
}

// guardianArgs are the hidden command's arguments.
type guardianArgs struct {
	pidfile    string
	backend    string
	instance   string
	port       uint16
	listenPort uint16
	proxyPid   int
	logPath    string // "-" = stderr
}

func (a guardianArgs) argv() []string {
	return []string{guardianCommand,
		"-pidfile", a.pidfile, "-backend", a.backend, "-instance", a.instance,
		"-port", strconv.Itoa(int(a.port)), "-listen-port", strconv.Itoa(int(a.listenPort)), "-proxy-pid", strconv.Itoa(a.proxyPid), "-log", a.logPath}
}

func parseGuardianArgs(args []string) (guardianArgs, error) {
	var a guardianArgs
	fs := flag.NewFlagSet(guardianCommand, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&a.pidfile, "pidfile", "", "")
	fs.StringVar(&a.backend, "backend", "", "")
	fs.StringVar(&a.instance, "instance", "", "")
	port := fs.Uint("port", 443, "")
	listenPort := fs.Uint("listen-port", 0, "")
	fs.IntVar(&a.proxyPid, "proxy-pid", 0, "")
	fs.StringVar(&a.logPath, "log", "-", "")
	if err := fs.Parse(args); err != nil {
		return a, err
	}
	switch {
	case a.pidfile == "" || a.instance == "" || a.proxyPid <= 0:
		return a, errors.New("-pidfile, -instance and -proxy-pid are required")
	case a.backend != "nft" && a.backend != "iptables":
		return a, fmt.Errorf("-backend %q: want nft or iptables", a.backend)
	case *port == 0 || *port > 65535 || *listenPort == 0 || *listenPort > 65535:
		return a, fmt.Errorf("-port %d, -listen-port %d: want 1-65535", *port, *listenPort)
	}
	a.port, a.listenPort = uint16(*port), uint16(*listenPort)
	return a, nil
}

// startGuardian runs the guardian and waits until it is ready to act. The
// caller installs rules only after this returns without error.
func startGuardian(cfg config, backend, instance string, log *slog.Logger) (*guardian, error) {
	lifeR, lifeW, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("guardian: %w", err)
	}
	readyR, readyW, err := os.Pipe()
	if err != nil {
		lifeR.Close()
		lifeW.Close()
		return nil, fmt.Errorf("guardian: %w", err)
	}
	logPath := resolvedLogPath(cfg)
	a := guardianArgs{pidfile: cfg.pidfile, backend: backend, instance: instance,
		port: cfg.port, listenPort: cfg.listenPort, proxyPid: os.Getpid(), logPath: logPath}
	// /proc/self/exe is the very binary running, even if a package
	// upgrade has replaced the file since.
	cmd := exec.Command("/proc/self/exe", a.argv()...)
	cmd.Args[0] = os.Args[0]
	cmd.ExtraFiles = []*os.File{lifeR, readyW}
	if logPath == "-" {
		cmd.Stderr = os.Stderr
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	err = cmd.Start()
	lifeR.Close()
	readyW.Close()
	if err != nil {
		lifeW.Close()
		readyR.Close()
		return nil, fmt.Errorf("guardian: re-executing this binary (/proc/self/exe): %w", err)
	}
	g := &guardian{pid: cmd.Process.Pid, life: lifeW, exited: make(chan struct{})}
	readyR.SetReadDeadline(time.Now().Add(guardianReadyTimeout))
	line := make([]byte, 64)
	n, rerr := readyR.Read(line)
	if rerr != nil || string(line[:n]) != "ready\n" {
		readyR.Close()
		lifeW.Close()
		cmd.Process.Kill()
		cmd.Wait()
		if rerr == nil {
			rerr = fmt.Errorf("said %q", line[:n])
		}
		return nil, fmt.Errorf("guardian (pid %d) did not get ready: %v (see the log)", g.pid, rerr)
	}
	readyR.SetReadDeadline(time.Time{})
	// The guardian holds the ready pipe's write end until it exits.
	go func() {
		io.Copy(io.Discard, readyR)
		readyR.Close()
		cmd.Wait()
		close(g.exited)
		if !g.dismissed.Load() {
			log.Warn("guardian exited: if this proxy is killed now, its rules stay until `acme-alpn-proxy stop`; the proxy keeps serving",
				"guardian_pid", g.pid, "state", cmd.ProcessState.String())
		}
	}()
	log.Info("guardian started", "pid", g.pid, "instance", instance)
	return g, nil
}

// installed tells the guardian which rules to delete if the proxy dies.
func (g *guardian) installed(rs intercept.RuleSet) {
	if g == nil {
		return
	}
	msg := installedMsg + string(rs.Mode)
	for _, t := range rs.Tables {
		msg += " " + t.Family.String()
	}
	g.life.Write([]byte(msg + "\n"))
}

// dismiss tells the guardian its work is done (our rules are gone, or the
// kernel will remove them) and waits, bounded, for it to exit.
func (g *guardian) dismiss() {
	if g == nil || g.dismissed.Swap(true) {
		return
	}
	g.life.Write([]byte(cleanMsg))
	g.life.Close()
	select {
	case <-g.exited:
	case <-time.After(2 * time.Second):
	}
}

// guardianMain is the guardian process.
func guardianMain(args []string, stderr io.Writer) int {
	a, err := parseGuardianArgs(args)
	if err != nil {
		fmt.Fprintf(stderr, "acme-alpn-proxy %s: %v (internal command, run by start)\n", guardianCommand, err)
		return exitUsage
	}
	// Small and idle: one P and an eager collector keep its RSS low.
	runtime.GOMAXPROCS(1)
	debug.SetGCPercent(20)
	// It exits when its proxy does. A closed terminal (SIGHUP), a log
	// reader gone (SIGPIPE), or `systemctl stop` signalling every process
	// of the unit (SIGTERM) while the proxy still drains must not end it
	// first. SIGKILL still does.
	signal.Ignore(syscall.SIGHUP, syscall.SIGPIPE, syscall.SIGINT, syscall.SIGTERM)

	// The proxy's log, in the same form: the journal's priorities under
	// systemd, where the guardian shares the proxy's stderr.
	base, logFile, err := openLog(config{logPath: a.logPath}, stderr, false)
	if err != nil {
		fmt.Fprintf(stderr, "acme-alpn-proxy guardian: %v\n", err)
		return exitFailure
	}
	defer logFile.Close()
	log := base.With("guardian", os.Getpid(), "instance", a.instance)
	if err := os.WriteFile("/proc/self/oom_score_adj", []byte(strconv.Itoa(guardianOOMScoreAdj)), 0); err != nil {
		log.Warn("cannot lower own oom_score_adj; the OOM killer may pick the guardian", "err", err)
	}
	if err := setNiceAllThreads(guardianNice); err != nil {
		log.Warn("cannot raise own priority; cleanup after a crash competes with the host's load", "err", err)
	}
	for _, fd := range []int{guardianLifeFD, guardianReadyFD} {
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFD, unix.FD_CLOEXEC); err != nil {
			log.Error("no pipes from the proxy (internal command, run by start)", "fd", fd, "err", err)
			return exitUsage
		}
	}
	life := os.NewFile(guardianLifeFD, "life")
	ready := os.NewFile(guardianReadyFD, "ready")
	if _, err := ready.Write([]byte("ready\n")); err != nil {
		log.Error("proxy gone before the guardian was ready", "err", err)
		return exitFailure
	}

	news := parseLifeNews(readUntilEOF(life))
	if news.clean {
		return exitOK
	}
	died := time.Now()
	log.Warn("proxy died without removing its rules; removing them", "proxy_pid", a.proxyPid, "backend", a.backend)
	return guardianCleanUp(a, news, log, died)
}

// setNiceAllThreads sets the nice value of every thread of the process:
// on Linux it is per thread, and threads inherit it from their creator.
func setNiceAllThreads(nice int) error {
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return err
	}
	for _, task := range tasks {
		tid, err := strconv.Atoi(task.Name())
		if err != nil {
			continue
		}
		if err := unix.Setpriority(unix.PRIO_PROCESS, tid, nice); err != nil && !errors.Is(err, unix.ESRCH) {
			return err
		}
	}
	return nil
}

// readUntilEOF blocks until every writer of r has closed it (the proxy has
// exited) and returns the first bytes written, bounded.
func readUntilEOF(r io.Reader) string {
	var msg []byte
	buf := make([]byte, 256)
	for {
		n, err := r.Read(buf)
		if len(msg) < len(buf) {
			msg = append(msg, buf[:min(n, len(buf)-len(msg))]...)
		}
		if err != nil {
			return string(msg)
		}
	}
}

// guardianCleanUp removes the dead proxy's rules and conntrack entries,
// holding the pid-file lock so no new instance starts meanwhile, and
// leaving everything alone when a newer instance already holds it.
func guardianCleanUp(a guardianArgs, news lifeNews, log *slog.Logger, died time.Time) int {
	lock, holder, err := lockAfter(a.pidfile, a.proxyPid, guardianLockWait)
	if err != nil {
		log.Error("cannot take the pid-file lock; rules left in place (run `acme-alpn-proxy stop`)", "err", err)
		return exitFailure
	}
	if lock == nil {
		log.Info("a newer instance holds the pid file; its rules are its own: leaving them", "holder_pid", holder)
		return exitOK
	}
	defer lock.release()
	logf := func(format string, args ...any) { log.Info(fmt.Sprintf(format, args...)) }
	ruleSpec := os.Getenv("ACME_ALPN_PROXY_RULESPEC")
	if a.backend == "iptables" && news.mode != "" {
		// The rules it installed, deleted without listing chains first.
		rs, err := intercept.Build(intercept.Config{Mode: news.mode, Port: a.port, ListenPort: a.listenPort, Families: news.families, Instance: a.instance})
		if err == nil {
			var b *compat.Backend
			if b, err = compat.New(compat.Options{RuleSpec: ruleSpec, Logf: logf}); err == nil {
				err = b.RemoveRuleSet(rs)
			}
		}
		if err != nil {
			log.Warn("deleting the known rules failed; listing and removing", "err", err)
		} else {
			log.Info("known rules deleted", "took", time.Since(died).Round(time.Microsecond))
		}
	}
	err = removeStaleOf(staleSelector{backend: a.backend, instance: a.instance, ruleSpec: ruleSpec}, logf)
	took := time.Since(died)
	if err != nil {
		log.Error("removing the dead proxy's rules failed (run `acme-alpn-proxy stop`)", "err", err, "took", took)
		return exitFailure
	}
	log.Info("rules removed: new connections go to the web server", "took", took.Round(time.Microsecond))
	if n, err := nft.DeleteConntrack(a.listenPort); err != nil {
		log.Warn("deleting conntrack entries failed", "err", err)
	} else if n > 0 {
		log.Info("deleted conntrack entries of redirected connections", "count", n)
	}
	return exitOK
}

// lockAfter takes the pid-file lock for a cleanup after deadPid died. It
// returns a nil lock and the holder's PID if another instance holds it.
// While the file still names deadPid the holder may be deadPid in its last
// microseconds, so it retries until wait has passed.
func lockAfter(path string, deadPid int, wait time.Duration) (*pidLock, int, error) {
	deadline := time.Now().Add(wait)
	for {
		lock, err := tryLockPidfile(path)
		var running *errRunning
		if !errors.As(err, &running) {
			return lock, 0, err
		}
		if running.state.pid != deadPid || time.Now().After(deadline) {
			return nil, running.state.pid, nil
		}
		time.Sleep(time.Millisecond)
	}
}

// guardianAlive reports whether pid is a guardian of ours (not a process
// that reused its PID).
func guardianAlive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return err == nil && strings.Contains(string(b), "\x00"+guardianCommand+"\x00") && processAlive(pid)
}

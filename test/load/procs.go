package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// child is a process the runner started. Every PID is appended to a file
// so run.sh can kill what is left if the runner itself dies; Pdeathsig
// covers a runner killed by SIGKILL.
type child struct {
	name       string
	cmd        *exec.Cmd
	pid        int
	done       chan struct{}
	waitErr    error
	stdoutPath string
	stderrPath string
}

type children struct {
	mu       sync.Mutex
	list     []*child
	pidsFile string
	work     string
}

func (cs *children) spawn(name string, argv []string) (*child, error) {
	c := &child{
		name: name, done: make(chan struct{}),
		stdoutPath: filepath.Join(cs.work, name+".out"),
		stderrPath: filepath.Join(cs.work, name+".err"),
	}
	stdout, err := os.Create(c.stdoutPath)
	if err != nil {
		return nil, err
	}
	defer stdout.Close()
	stderr, err := os.Create(c.stderrPath)
	if err != nil {
		return nil, err
	}
	defer stderr.Close()
	c.cmd = exec.Command(argv[0], argv[1:]...)
	c.cmd.Stdout, c.cmd.Stderr = stdout, stderr
	c.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := c.cmd.Start(); err != nil {
		return nil, err
	}
	c.pid = c.cmd.Process.Pid
	if cs.pidsFile != "" {
		if f, err := os.OpenFile(cs.pidsFile, os.O_APPEND|os.O_WRONLY|os.O_CREATE, 0o644); err == nil {
			fmt.Fprintln(f, c.pid)
			f.Close()
		}
	}
	go func() { c.waitErr = c.cmd.Wait(); close(c.done) }()
	cs.mu.Lock()
	cs.list = append(cs.list, c)
	cs.mu.Unlock()
	return c, nil
}

func (c *child) running() bool {
	select {
	case <-c.done:
		return false
	default:
		return true
	}
}

// waitExit waits up to limit for the child to exit.
func (c *child) waitExit(limit time.Duration) error {
	select {
	case <-c.done:
		return nil
	case <-time.After(limit):
		return fmt.Errorf("%s (pid %d) still running after %v", c.name, c.pid, limit)
	}
}

// terminate sends SIGTERM, then SIGKILL after limit.
func (c *child) terminate(limit time.Duration) {
	if !c.running() {
		return
	}
	syscall.Kill(c.pid, syscall.SIGTERM)
	if c.waitExit(limit) != nil {
		syscall.Kill(c.pid, syscall.SIGKILL)
		<-c.done
	}
}

// killAll ends every child still running, by PID.
func (cs *children) killAll() {
	cs.mu.Lock()
	list := append([]*child(nil), cs.list...)
	cs.mu.Unlock()
	for _, c := range list {
		if c.running() {
			syscall.Kill(c.pid, syscall.SIGKILL)
			<-c.done
		}
	}
}

func (c *child) stdout() string { b, _ := os.ReadFile(c.stdoutPath); return string(b) }
func (c *child) stderr() string { b, _ := os.ReadFile(c.stderrPath); return string(b) }

// waitOutput waits until the child's stdout contains s.
func (c *child) waitOutput(s string, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		if strings.Contains(c.stdout(), s) {
			return nil
		}
		if !c.running() {
			return fmt.Errorf("%s exited (%v): %s", c.name, c.waitErr, tail(c.stderr()))
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("%s: no %q after %v: %s", c.name, s, limit, tail(c.stderr()))
}

func tail(s string) string {
	s = strings.TrimSpace(s)
	if len(s) > 600 {
		s = "..." + s[len(s)-600:]
	}
	return s
}

// proxyProc is one acme-alpn-proxy started in the foreground.
type proxyProc struct {
	*child
	bin, ns, pidfile, logPath string
	flags                     []string
}

type proxyOpts struct {
	name   string
	ns     string // network namespace; "" = the runner's
	nofile int    // ulimit -n (soft and hard) for the proxy; 0 = inherited
	env    []string
	flags  []string
}

func (r *runner) startProxy(o proxyOpts) (*proxyProc, error) {
	p := &proxyProc{bin: r.bin, ns: o.ns,
		pidfile: filepath.Join(r.work, o.name+".pid"),
		logPath: filepath.Join(r.work, o.name+".log"),
	}
	os.Remove(p.logPath)
	p.flags = append([]string{"-pidfile", p.pidfile, "-log", p.logPath}, o.flags...)
	argv := append(append([]string{r.bin}, p.flags...), "start")
	if o.nofile > 0 {
		argv = append([]string{"bash", "-c", fmt.Sprintf(`ulimit -n %d && exec "$@"`, o.nofile), "bash"}, argv...)
	}
	if len(o.env) > 0 {
		argv = append(append([]string{"env"}, o.env...), argv...)
	}
	argv = inNetns(o.ns, argv)
	c, err := r.procs.spawn(o.name, argv)
	if err != nil {
		return nil, err
	}
	p.child = c
	noRedirect := false
	for _, f := range o.flags {
		noRedirect = noRedirect || f == "-no-redirect"
	}
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		log := p.log()
		pid, _ := os.ReadFile(p.pidfile)
		if strings.Contains(log, "msg=ready") || (noRedirect && strings.Contains(log, "msg=listening") && len(bytes.TrimSpace(pid)) > 0) {
			return p, nil
		}
		if !c.running() {
			return nil, fmt.Errorf("proxy %s exited (%v): %s %s", o.name, c.waitErr, tail(c.stderr()), tail(log))
		}
		time.Sleep(20 * time.Millisecond)
	}
	c.terminate(5 * time.Second)
	return nil, fmt.Errorf("proxy %s not ready after 15s: %s", o.name, tail(p.log()))
}

func inNetns(ns string, argv []string) []string {
	if ns == "" {
		return argv
	}
	return append([]string{"ip", "netns", "exec", ns}, argv...)
}

func (p *proxyProc) log() string { b, _ := os.ReadFile(p.logPath); return string(b) }

// logLines returns the log lines containing every one of subs.
func (p *proxyProc) logLines(subs ...string) []string {
	var lines []string
next:
	for line := range strings.Lines(p.log()) {
		for _, s := range subs {
			if !strings.Contains(line, s) {
				continue next
			}
		}
		lines = append(lines, strings.TrimSpace(line))
	}
	return lines
}

// stop runs `acme-alpn-proxy stop` with the instance's flags and returns
// how long it took and its combined output.
func (p *proxyProc) stop(limit time.Duration) (time.Duration, string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	argv := inNetns(p.ns, append(append([]string{p.bin}, p.flags...), "stop"))
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	start := time.Now()
	outb, err := cmd.CombinedOutput()
	return time.Since(start), strings.TrimSpace(string(outb)), err
}

// goroutines makes the proxy dump its goroutines with SIGQUIT (the Go
// runtime prints every stack and exits) and parses the dump. It ends the
// proxy, so it is a scenario's last measurement.
func (p *proxyProc) goroutines(watch ...string) (goroutineDump, error) {
	if err := syscall.Kill(p.pid, syscall.SIGQUIT); err != nil {
		return goroutineDump{}, err
	}
	if err := p.waitExit(15 * time.Second); err != nil {
		p.terminate(time.Second)
		return goroutineDump{}, err
	}
	g := parseGoroutineDump(p.stderr(), watch...)
	if g.total == 0 {
		return g, errors.New("no goroutine dump on stderr")
	}
	return g, nil
}

// frameRelay marks the relay engine's goroutines in a dump: its event
// loops, a fixed number however many connections there are.
const frameRelay = "/pkg/relay."

func atoiOr(s string, def int) int {
	if n, err := strconv.Atoi(s); err == nil {
		return n
	}
	return def
}

func syscallKill(pid int) error { return syscall.Kill(pid, syscall.SIGKILL) }

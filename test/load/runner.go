package main

import (
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"
)

// runner holds what every scenario shares.
type runner struct {
	bin, self, work string
	basePort        int
	scale           float64
	procs           *children
	nsFile          string

	mu         sync.Mutex
	namespaces []string

	backend *child // loopback backends for scenarios 1-5
	dialer  *net.Dialer
}

func runMain(args []string) error {
	fs := flag.NewFlagSet("run", flag.ExitOnError)
	r := &runner{dialer: &net.Dialer{}}
	fs.StringVar(&r.bin, "bin", "", "acme-alpn-proxy binary")
	fs.StringVar(&r.work, "work", "", "directory for logs, pid files and outputs")
	fs.IntVar(&r.basePort, "base-port", 25300, "first loopback port used")
	fs.Float64Var(&r.scale, "scale", 1, "multiply every connection count by this (quick runs)")
	scenarios := fs.String("scenarios", "1,2,3,4,5,6,7", "comma-separated scenario numbers")
	pidsFile := fs.String("pids", "", "append the PID of every started process to this file")
	fs.StringVar(&r.nsFile, "netns-file", "", "append the name of every created netns to this file")
	deadline := fs.Duration("deadline", 15*time.Minute, "give up, clean up and exit after this long")
	fs.Parse(args)
	if r.bin == "" || r.work == "" {
		return fmt.Errorf("-bin and -work are required")
	}
	var err error
	if r.self, err = os.Executable(); err != nil {
		return err
	}
	r.procs = &children{pidsFile: *pidsFile, work: r.work}
	r.cleanupOnExit(*deadline)
	defer r.cleanup()

	all := map[string]func() error{
		"1": r.s1Hold, "2": r.s2FdLimit, "3": r.s3Slowloris, "4": r.s4Faults,
		"5": r.s5Stop, "6": r.s6Kill9, "7": r.s7StaleConntrack,
	}
	for _, s := range strings.Split(*scenarios, ",") {
		fn, ok := all[strings.TrimSpace(s)]
		if !ok {
			return fmt.Errorf("unknown scenario %q", s)
		}
		logf("scenario %s", s)
		start := time.Now()
		if err := fn(); err != nil {
			out.row(s, "scenario could not run", err.Error(), verdictBroken)
			logf("scenario %s: %v", s, err)
		}
		logf("scenario %s took %v", s, time.Since(start).Round(time.Millisecond))
		r.procs.killAll() // nothing of one scenario leaks into the next
		r.backend = nil
	}
	if out.broken > 0 {
		return fmt.Errorf("%d rows flagged BROKEN", out.broken)
	}
	return nil
}

// cleanupOnExit kills the children and deletes the namespaces on SIGINT,
// SIGTERM or when deadline passes, and exits.
func (r *runner) cleanupOnExit(deadline time.Duration) {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		s := <-sigs
		logf("%v: cleaning up", s)
		r.cleanup()
		os.Exit(130)
	}()
	time.AfterFunc(deadline, func() {
		logf("deadline %v passed: cleaning up", deadline)
		r.cleanup()
		os.Exit(124)
	})
}

func (r *runner) cleanup() {
	r.procs.killAll()
	r.mu.Lock()
	names := r.namespaces
	r.namespaces = nil
	r.mu.Unlock()
	for _, ns := range names {
		deleteNetns(ns)
	}
}

func (r *runner) port(offset int) int { return r.basePort + offset }

func (r *runner) addr(offset int) string { return fmt.Sprintf("127.0.0.1:%d", r.port(offset)) }

// Loopback layout: web backend, ACME backend, a port nobody listens on,
// and one proxy listener per scenario.
const (
	offWeb     = 1
	offACME    = 2
	offRefused = 3
)

func (r *runner) n(count int) int { return max(1, int(float64(count)*r.scale+0.5)) }

// loopbackBackend starts (once per scenario) the web and ACME backends.
func (r *runner) loopbackBackend() error {
	if r.backend != nil && r.backend.running() {
		return nil
	}
	c, err := r.procs.spawn("backend", []string{r.self, "backend", "-web", r.addr(offWeb), "-acme", r.addr(offACME), "-stall", stallFor.String()})
	if err != nil {
		return err
	}
	if err := c.waitOutput("ready", 10*time.Second); err != nil {
		return err
	}
	r.backend = c
	return nil
}

// stallFor is how long the backend's stalled answers stay silent.
const stallFor = 5 * time.Second

// loopbackProxy starts a -no-redirect proxy listening on r.addr(off).
func (r *runner) loopbackProxy(name string, off, nofile int, extra ...string) (*proxyProc, string, error) {
	if err := r.loopbackBackend(); err != nil {
		return nil, "", err
	}
	addr := r.addr(off)
	flags := append([]string{"-no-redirect", "-listen", addr, "-alpn", r.addr(offACME), "-fallback", r.addr(offWeb), "-hello-timeout", "2s"}, extra...)
	p, err := r.startProxy(proxyOpts{name: name, nofile: nofile, flags: flags})
	return p, addr, err
}

// warmBaseline makes one exchange through the fresh proxy p at addr, lets
// it settle, and samples it: the baseline a scenario's growth is measured
// from.
func (r *runner) warmBaseline(p *proxyProc, addr string, settle time.Duration) (procSample, error) {
	if _, err := exchange(r.dialer, addr, 5*time.Second); err != nil {
		return procSample{}, fmt.Errorf("warm-up exchange: %w", err)
	}
	time.Sleep(settle)
	return sampleProc(p.pid)
}

// parallel runs fn(0..n-1) on at most workers goroutines.
func parallel(n, workers int, fn func(i int)) {
	var wg sync.WaitGroup
	next := make(chan int)
	for w := 0; w < min(workers, n); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				fn(i)
			}
		}()
	}
	for i := 0; i < n; i++ {
		next <- i
	}
	close(next)
	wg.Wait()
}

// steady runs full normal exchanges at rate per second for dur, each in its
// own goroutine started on schedule (a slow proxy does not slow the
// offered load), and returns their latencies and outcomes.
func steady(d *net.Dialer, addr string, rate int, dur time.Duration) ([]time.Duration, tally) {
	var lat latencies
	var mu sync.Mutex
	outcomes := tally{}
	var wg sync.WaitGroup
	interval := time.Second / time.Duration(rate)
	start := time.Now()
	for i := 0; ; i++ {
		at := start.Add(time.Duration(i) * interval)
		if at.Sub(start) >= dur {
			break
		}
		time.Sleep(time.Until(at))
		wg.Add(1)
		go func() {
			defer wg.Done()
			d, err := exchange(d, addr, 5*time.Second)
			mu.Lock()
			outcomes.add(err)
			mu.Unlock()
			if err == nil {
				lat.add(d)
			}
		}()
	}
	wg.Wait()
	return lat.snapshot(), outcomes
}

func kib(k int64) string {
	if k >= 10240 {
		return fmt.Sprintf("%.1f MiB", float64(k)/1024)
	}
	return fmt.Sprintf("%d KiB", k)
}

package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"runtime/pprof"
	"slices"
	"time"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/intercept"
	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/nft"
)

// instance is a started proxy: listeners serving, interception installed.
type instance struct {
	cfg         config
	log         *slog.Logger
	lock        *pidLock
	ls          *listenSet
	p           *proxy
	ic          interceptor // nil with -no-redirect
	backendName string
	rs          intercept.RuleSet
	id          string    // instance id in our rules' comments
	guard       *guardian // nil if the kernel removes our rules itself
	routes      bool      // our policy routing is installed (setupReturnPath)
}

// startForeground runs the proxy until SIGINT or SIGTERM.
func startForeground(cfg config, stdout, stderr io.Writer) int {
	ready := readyPipeFromEnv()
	lock, err := lockPidfile(cfg.pidfile)
	var running *errRunning
	if errors.As(err, &running) {
		fmt.Fprintf(stdout, "%v; nothing to do\n", err)
		ready.reportRunning(err)
		return exitOK
	}
	if err != nil {
		ready.report(err)
		fmt.Fprintf(stderr, "acme-alpn-proxy: %v\n", err)
		return exitFailure
	}
	l, err := launch(cfg, lock, stderr)
	if err != nil {
		ready.report(err)
		fmt.Fprintf(stderr, "acme-alpn-proxy: %v\n", err)
		return exitFailure
	}
	defer l.close()
	in, log, sigs := l.in, l.log, l.sigs
	ready.report(nil)
	if cfg.logPath == "" && defaultLogTarget() != "-" {
		detachStdio()
	}
	stopProfile := startCPUProfile(cfg.cpuProfile, log)
	sig := <-sigs
	stopProfile()
	log.Info("stopping", "signal", sig.String())
	in.shutdown(sigs)
	return exitOK
}

// launched is a started instance with its log and signal channel.
type launched struct {
	in      *instance
	log     *slog.Logger
	logFile io.Closer
	sigs    chan os.Signal

	stopKeepRunning func() // see keepRunning
}

// launch opens the log, catches the stop signals — from here on a signal
// during start-up still removes whatever was installed — and starts the
// instance. On error the lock is released.
func launch(cfg config, lock *pidLock, stderr io.Writer) (*launched, error) {
	log, logFile, err := openLog(cfg, stderr, false)
	if err != nil {
		lock.release()
		return nil, err
	}
	l := &launched{log: log, logFile: logFile, sigs: make(chan os.Signal, 4)}
	notifyStop(l.sigs)
	l.stopKeepRunning = keepRunning(log)
	if l.in, err = startInstance(cfg, log, lock); err != nil {
		log.Error("start failed", "err", err)
		l.close()
		return nil, err
	}
	return l, nil
}

func (l *launched) close() {
	signal.Stop(l.sigs)
	l.stopKeepRunning()
	l.logFile.Close()
}

// startInstance finds the families with a web server, listens on them,
// installs their interception and records the instance in the pid file.
// On error nothing stays installed and the lock is released.
func startInstance(cfg config, log *slog.Logger, lock *pidLock) (in *instance, err error) {
	in = &instance{cfg: cfg, log: log, lock: lock, backendName: "none"}
	defer func() {
		if err != nil {
			in.teardown()
			in = nil
		}
	}()
	host, _, _ := net.SplitHostPort(cfg.listen)
	if !cfg.noRedirect && host != "" && !net.ParseIP(host).IsUnspecified() {
		return in, fmt.Errorf("-listen %s: intercepted connections arrive on a wildcard address; use -listen :%d (or -no-redirect to listen on a specific address)", cfg.listen, cfg.listenPort)
	}
	if !cfg.noRedirect {
		// The backend opens before any socket of the proxy: at kill -9 the
		// kernel releases a process's descriptors highest first, and our
		// owner tables, with the reverse NAT of redirected connections, go
		// with the netlink socket. Below every listener and connection it
		// goes last, after each client has been sent its FIN or reset.
		if in.ic, in.backendName, err = chooseBackend(cfg, log); err != nil {
			return in, err
		}
	}
	plan := familyPlan{intercept: listenFamilies(cfg)}
	if !cfg.noRedirect && !cfg.skipPreflight {
		if plan, err = preflight(cfg, plan.intercept); err != nil {
			return in, err
		}
		warnNotIntercepted(log, plan, cfg.port)
	}
	transparent := !cfg.noRedirect && cfg.mode != "redirect" && cfg.ruleSpec == ""
	in.ls, err = listenAll(context.Background(), listenAddr(cfg, plan.intercept), transparent, slices.Contains(plan.intercept, intercept.IPv6))
	if err != nil {
		return in, err
	}
	// Names are resolved once, here, not per connection.
	alpn, err := resolve("-alpn", cfg.alpn)
	if err != nil {
		return in, err
	}
	var fallback netip.AddrPort
	if cfg.fallback != "" {
		if fallback, err = resolve("-fallback", cfg.fallback); err != nil {
			return in, err
		}
	}
	if in.p, err = newProxy(log, alpn, fallback, cfg.port, cfg.listenPort, cfg.helloTimeout, cfg.dialTimeout); err != nil {
		return in, err
	}
	if in.p.builtin, err = builtinResponder(cfg); err != nil {
		return in, err
	}
	in.p.sendHeaders(cfg.source, cfg.alpnHeader)
	// Serve before intercepting: no intercepted connection may find the
	// listener not yet accepting.
	if err := in.p.serve(in.ls); err != nil {
		return in, err
	}
	log.Info("listening", "addr", in.ls.String(), "alpn", alpnName(cfg), "fallback", fallbackName(cfg),
		"fallback_source", cfg.source, "alpn_proxy_protocol", cfg.alpnHeader)

	if cfg.noRedirect {
		if err := in.lock.write(instanceState{pid: os.Getpid(), backend: "none", mode: "none"}); err != nil {
			return in, fmt.Errorf("pid file: %w", err)
		}
		log.Info("ready", "backend", "none", "mode", "none", "listen", in.ls.String())
		return in, nil
	}
	families := in.ls.families
	if len(families) == 0 {
		return in, errors.New("no wildcard listener to intercept to")
	}
	if n := deleteStaleConntrack(cfg); n > 0 {
		log.Info("deleted conntrack entries a killed instance left", "count", n)
	}
	if in.id, err = newInstanceID(); err != nil {
		return in, err
	}
	// Before the rules: whenever they exist, someone removes them.
	if in.guard, err = startGuardian(cfg, in.backendName, in.id, log); err != nil {
		return in, err
	}
	ctBefore := readConntrackTable()
	mark := in.setupReturnPath(families, fallback)
	in.p.dialFromClient(mark)
	if in.rs, err = install(in.ic, cfg, families, in.id, mark, log); err != nil {
		return in, err
	}
	warnIfConntrackTurnedOn(log, ctBefore)
	if !needsGuardian(in.ic) {
		in.guard.dismiss()
		in.guard = nil
		log.Info("guardian not needed: the kernel removes owner tables when this process dies")
	}
	in.guard.installed(in.rs)
	st := instanceState{pid: os.Getpid(), backend: in.backendName, mode: string(in.rs.Mode), instance: in.id}
	if in.guard != nil {
		st.guardian = in.guard.pid
	}
	if err := in.lock.write(st); err != nil {
		return in, fmt.Errorf("pid file: %w", err)
	}
	ready := []any{"backend", in.backendName, "mode", in.rs.Mode, "source", in.p.sourceInEffect(), "port", cfg.port, "listen", in.ls.String(), "families", familyList(families, ",")}
	if len(plan.without) > 0 {
		ready = append(ready, "not_intercepted", familyList(plan.without, ","))
	}
	log.Info("ready", ready...)
	return in, nil
}

// startCPUProfile profiles the serving phase, for the benchmark scripts.
func startCPUProfile(path string, log *slog.Logger) (stop func()) {
	if path == "" {
		return func() {}
	}
	f, err := os.Create(path)
	if err == nil {
		err = pprof.StartCPUProfile(f)
	}
	if err != nil {
		log.Warn("cpu profile not written", "err", err)
		return func() {}
	}
	return func() { pprof.StopCPUProfile(); f.Close() }
}

func resolve(flagName, hostport string) (netip.AddrPort, error) {
	a, err := net.ResolveTCPAddr("tcp", hostport)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("%s %s: %v", flagName, hostport, err)
	}
	ap := a.AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
}

func fallbackName(cfg config) string {
	if cfg.fallback != "" {
		return cfg.fallback
	}
	return fmt.Sprintf("original destination, port %d", cfg.port)
}

// acceptGrace is how long the listener keeps accepting after the
// interception is removed: a round trip for handshakes already under way.
const acceptGrace = time.Second

// shutdown removes the interception first, so new connections go straight
// to the web server, then stops accepting, drains in-flight connections
// (until -drain-timeout, or a second signal on force), and removes the rest.
func (in *instance) shutdown(force <-chan os.Signal) {
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), in.cfg.drainTimeout)
	defer cancel()
	go func() {
		select {
		case sig := <-force:
			in.log.Warn("second signal: closing in-flight connections now", "signal", sig.String())
			cancel()
		case <-ctx.Done():
		}
	}()
	if in.ic != nil {
		if err := in.ic.RemoveIntercept(); err != nil {
			in.log.Error("removing interception failed; removing all rules", "err", err)
			in.ic.Remove()
		} else {
			in.log.Info("interception removed; new connections go to the web server")
		}
		// A SYN intercepted just before the removal completes its
		// handshake one round trip later; closing the listener before it
		// is accepted would reset that client. New SYNs no longer come.
		select {
		case <-time.After(acceptGrace):
		case <-ctx.Done():
		}
	}
	in.p.stopAccepting(in.ls)
	n := in.p.inFlight()
	if n > 0 {
		in.log.Info("draining", "in_flight", n, "timeout", in.cfg.drainTimeout)
	}
	cut := in.p.drain(ctx)
	in.log.Info("drained", "in_flight_at_stop", n, "cut_off", cut, "took", time.Since(start).Round(time.Millisecond))
	in.teardown()
	in.log.Info("stopped")
}

// teardown removes our rules and conntrack state and releases the lock.
func (in *instance) teardown() {
	if in.p != nil {
		in.p.stopAccepting(in.ls)
		in.p.close()
	} else if in.ls != nil {
		in.ls.Close()
	}
	if in.ic != nil {
		if err := in.ic.Remove(); err != nil {
			// The guardian tries again when we have exited.
			in.log.Error("removing rules failed", "err", err)
		} else {
			in.guard.dismiss()
		}
		in.ic.Close()
		if err := in.removeRoutes(); err != nil {
			in.log.Error("removing policy routing failed", "err", err)
		}
		if in.rs.Mode == intercept.Redirect {
			// Entries of redirected connections outlive us; a new connection
			// reusing a 4-tuple would be sent to a listener that is gone.
			if n, err := nft.DeleteConntrack(in.cfg.listenPort); err != nil {
				in.log.Warn("deleting conntrack entries failed", "err", err)
			} else if n > 0 {
				in.log.Info("deleted conntrack entries of redirected connections", "count", n)
			}
		}
	}
	in.lock.release()
}

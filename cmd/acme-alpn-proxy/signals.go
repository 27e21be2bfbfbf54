package main

import (
	"log/slog"
	"os"
	"os/signal"
	"syscall"
)

// While the proxy intercepts port 443, a signal whose default action kills
// or suspends it would cut the connections it relays, or leave new ones
// waiting in its accept queue. So:
//   - SIGINT, SIGTERM and SIGHUP (a closed terminal) stop it cleanly: the
//     interception goes first, then the drain. Under nohup, SIGHUP stays
//     ignored.
//   - SIGPIPE (a log reader on stderr went away) only fails the log write.
//   - SIGTSTP (Ctrl-Z) is refused with a warning.
//
// All are caught, none set to ignored, so `run`'s command starts with the
// default actions.

// notifyStop delivers the stop signals to c.
func notifyStop(c chan<- os.Signal) {
	sigs := []os.Signal{syscall.SIGINT, syscall.SIGTERM}
	if !signal.Ignored(syscall.SIGHUP) {
		sigs = append(sigs, syscall.SIGHUP)
	}
	signal.Notify(c, sigs...)
}

// keepRunning catches SIGPIPE and SIGTSTP, whose default actions would end
// or suspend the proxy, until the returned function is called.
func keepRunning(log *slog.Logger) (stop func()) {
	c := make(chan os.Signal, 1)
	signal.Notify(c, syscall.SIGPIPE, syscall.SIGTSTP)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for sig := range c {
			if sig == syscall.SIGTSTP {
				log.Warn("not suspending: new connections to port 443 would wait on a stopped proxy; stop it with Ctrl-C or `acme-alpn-proxy stop`")
			}
		}
	}()
	return func() {
		signal.Stop(c)
		close(c)
		<-done
	}
}

package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"syscall"
)

// runWrapped starts the proxy, runs the command with inherited stdio while
// the interception is live, then stops with a drain and exits with the
// command's status. The stop signals (notifyStop) go to the command;
// whatever happens the interception is removed before we exit.
func runWrapped(cfg config, argv []string, stderr io.Writer) int {
	lock, err := lockPidfile(cfg.pidfile)
	if err != nil {
		fmt.Fprintf(stderr, "acme-alpn-proxy: %v (run needs the proxy to itself: stop the other instance first)\n", err)
		return exitFailure
	}
	l, err := launch(cfg, lock, stderr)
	if err != nil {
		fmt.Fprintf(stderr, "acme-alpn-proxy: %v\n", err)
		return exitFailure
	}
	defer l.close()
	in, log, sigs := l.in, l.log, l.sigs

	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	if cfg.alpnCerts != "" {
		cmd.Env = append(os.Environ(), alpnCertsEnv+"="+cfg.alpnCerts) // for the hook
	}
	code := exitFailure
	if err := cmd.Start(); err != nil {
		log.Error("command did not start", "err", err)
		fmt.Fprintf(stderr, "acme-alpn-proxy: run: %v\n", err)
	} else {
		log.Info("running command", "argv", fmt.Sprint(argv), "pid", cmd.Process.Pid)
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
	wait:
		for {
			select {
			case sig := <-sigs:
				cmd.Process.Signal(sig)
			case err := <-done:
				code = exitCode(err)
				break wait
			}
		}
		log.Info("command exited", "code", code)
	}
	in.shutdown(sigs)
	return code
}

// exitCode maps a command's end to a shell-style exit status.
func exitCode(err error) int {
	if err == nil {
		return 0
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return 128 + int(ws.Signal())
		}
		return ee.ExitCode()
	}
	return exitFailure
}

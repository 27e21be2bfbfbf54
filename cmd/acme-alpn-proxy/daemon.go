package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
)

// start -d re-executes the binary as a foreground `start` in a new session
// and waits on a pipe for its verdict, so a pre-hook returns only once the
// interception is live (or with the start-up error), never racing the CA.

const readyFDEnv = "ACME_ALPN_PROXY_READY_FD"

// readyPipe is the write end the child reports its start-up result on.
type readyPipe struct{ f *os.File }

func readyPipeFromEnv() readyPipe {
	fd, err := strconv.Atoi(os.Getenv(readyFDEnv))
	os.Unsetenv(readyFDEnv) // not for the children of `run`
	if err != nil || fd < 3 {
		return readyPipe{}
	}
	return readyPipe{f: os.NewFile(uintptr(fd), "ready")}
}

// report sends "ready" or the error, once, and closes the pipe.
func (r readyPipe) report(err error) {
	msg := "ready"
	if err != nil {
		msg = "error: " + err.Error()
	}
	r.send(msg)
}

// reportRunning tells the parent that another instance already runs.
func (r readyPipe) reportRunning(err error) { r.send("running: " + err.Error()) }

func (r readyPipe) send(msg string) {
	if r.f == nil {
		return
	}
	r.f.WriteString(strings.ReplaceAll(msg, "\n", " ") + "\n")
	r.f.Close()
}

func startDaemon(cfg config, stdout, stderr io.Writer) int {
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintf(stderr, "acme-alpn-proxy: cannot find own executable: %v\n", err)
		return exitFailure
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		fmt.Fprintf(stderr, "acme-alpn-proxy: %v\n", err)
		return exitFailure
	}
	args := append([]string{}, os.Args[1:]...)
	for i, a := range args { // the child runs in the foreground
		if a == "-d" || a == "--d" || a == "-d=true" || a == "--d=true" {
			args = append(args[:i], args[i+1:]...)
			break
		}
	}
	cmd := exec.Command(self, args...)
	cmd.Env = append(os.Environ(), readyFDEnv+"=3")
	cmd.ExtraFiles = []*os.File{pw}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if cfg.logPath == "-" {
		cmd.Stderr = os.Stderr // asked for explicitly; the caller holds it open
	}
	if err := cmd.Start(); err != nil {
		fmt.Fprintf(stderr, "acme-alpn-proxy: starting background instance: %v\n", err)
		return exitFailure
	}
	pw.Close()
	line, _ := bufio.NewReader(pr).ReadString('\n')
	pr.Close()
	switch {
	case line == "ready\n":
		fmt.Fprintf(stdout, "acme-alpn-proxy started (pid %d)\n", cmd.Process.Pid)
		cmd.Process.Release()
		return exitOK
	case strings.HasPrefix(line, "running: "):
		cmd.Wait()
		fmt.Fprintf(stdout, "%s; nothing to do\n", strings.TrimSuffix(strings.TrimPrefix(line, "running: "), "\n"))
		return exitOK
	case strings.HasPrefix(line, "error: "):
		cmd.Wait()
		fmt.Fprintf(stderr, "acme-alpn-proxy: %s", strings.TrimPrefix(line, "error: "))
		return exitFailure
	}
	// The child died before reporting.
	state, _ := cmd.Process.Wait()
	fmt.Fprintf(stderr, "acme-alpn-proxy: background instance exited during start-up (%v); see the log\n", state)
	return exitFailure
}

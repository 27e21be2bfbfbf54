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

	"golang.org/x/sys/unix"
)

// start -d re-executes the binary as a foreground `start` in a new session
// and waits on a pipe for its verdict, so a pre-hook returns only once the
// interception is live (or with the start-up error), never racing the CA.

const readyFDEnv = "ACME_ALPN_PROXY_READY_FD"

// readyPipe is the write end the child reports its start-up result on, a
// bare descriptor (fd 0: none) so that no finalizer closes it behind us.
type readyPipe struct{ fd int }

func readyPipeFromEnv() readyPipe {
	fd, err := strconv.Atoi(os.Getenv(readyFDEnv))
	os.Unsetenv(readyFDEnv) // not for the children of `run`
	if err != nil || fd < 3 {
		return readyPipe{}
	}
	unix.CloseOnExec(fd)
	return readyPipe{fd: fd}
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

// send writes one line (less than PIPE_BUF, so in one piece), then closes
// the pipe by putting /dev/null in its place: its descriptor number is
// below the nftables socket's and must stay taken (see startInstance).
func (r readyPipe) send(msg string) {
	if r.fd == 0 {
		return
	}
	unix.Write(r.fd, []byte(strings.ReplaceAll(msg, "\n", " ")+"\n"))
	if null, err := unix.Open(os.DevNull, unix.O_RDWR|unix.O_CLOEXEC, 0); err == nil {
		unix.Dup3(null, r.fd, unix.O_CLOEXEC)
		unix.Close(null)
	} else {
		unix.Close(r.fd)
	}
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
	if cfg.logPath == "-" || (cfg.logPath == "" && stderrIsJournal()) {
		// Asked for explicitly, or the journal: no hook runner waits for it.
		cmd.Stderr = os.Stderr
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

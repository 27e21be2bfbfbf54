package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// The pid file is locked with flock(2) for the life of the instance. The
// kernel drops the lock when the process dies however it dies, so a stale
// file never blocks a start, and a PID read while the lock is held belongs
// to the live holder: a reused PID is never signalled.

// pidLock is a held pid file lock.
type pidLock struct{ f *os.File }

// errRunning reports that another instance holds the lock.
type errRunning struct{ state instanceState }

func (e *errRunning) Error() string {
	return fmt.Sprintf("acme-alpn-proxy is already running (pid %d)", e.state.pid)
}

// instanceState is what a running instance records in its pid file for
// stop and status, which run in other processes.
type instanceState struct {
	pid      int
	backend  string // "nft", "iptables" or "none"
	mode     string // "tproxy", "redirect" or "none"
	guardian int    // PID of the guardian; 0 if none runs
	instance string // id in our rules' comments
}

// cleanupLockWait bounds how long start waits for a lock whose holder is
// not the process the file names: a guardian removing a killed
// instance's rules (see guardian.go), which takes milliseconds.
const cleanupLockWait = 5 * time.Second

// lockPidfile takes the lock or returns *errRunning with the holder's
// state. A holder that is not the live process the file names is a
// guardian cleaning up after it: start waits for it (bounded) rather than
// report a dead instance as running.
func lockPidfile(path string) (*pidLock, error) {
	deadline := time.Now().Add(cleanupLockWait)
	for {
		l, err := tryLockPidfile(path)
		var running *errRunning
		if !errors.As(err, &running) || processAlive(running.state.pid) || time.Now().After(deadline) {
			return l, err
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// tryLockPidfile takes the lock once, without waiting.
func tryLockPidfile(path string) (*pidLock, error) {
	for {
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			return nil, fmt.Errorf("pid file: %w (set -pidfile to a writable path)", err)
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			defer f.Close()
			if errors.Is(err, unix.EWOULDBLOCK) {
				st, _ := readState(f)
				return nil, &errRunning{state: st}
			}
			return nil, fmt.Errorf("pid file %s: lock: %w", path, err)
		}
		// The holder we waited for may have removed the file before
		// unlocking it (release): a lock on that file guards nothing.
		if sameFile(f, path) {
			return &pidLock{f: f}, nil
		}
		f.Close()
	}
}

// sameFile reports whether path still names the open file f.
func sameFile(f *os.File, path string) bool {
	var a, b unix.Stat_t
	return unix.Fstat(int(f.Fd()), &a) == nil && unix.Stat(path, &b) == nil && a.Dev == b.Dev && a.Ino == b.Ino
}

// processAlive reports whether pid exists and is not dying: not a zombie
// (whose files, and so its locks, are released), not exiting, and without
// a SIGKILL pending — a `start` right after `kill -9` must not take the
// dying instance for a running one.
func processAlive(pid int) bool {
	if pid <= 0 {
		return false
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return false
	}
	return !dying(stat, status)
}

// pfExiting is PF_EXITING in the flags field of /proc/PID/stat.
const pfExiting = 0x4

// dying reads /proc/PID/stat and /proc/PID/status: a zombie, an exiting
// task, or one with SIGKILL pending.
func dying(stat, status []byte) bool {
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return true
	}
	f := strings.Fields(string(stat[i+1:]))
	// After ')': state(3) ppid pgrp session tty_nr tpgid flags(9).
	if len(f) < 7 || f[0] == "Z" || f[0] == "X" {
		return true
	}
	if flags, err := strconv.ParseUint(f[6], 10, 64); err == nil && flags&pfExiting != 0 {
		return true
	}
	for line := range strings.Lines(string(status)) {
		k, v, ok := strings.Cut(line, ":")
		if !ok || (k != "SigPnd" && k != "ShdPnd") {
			continue
		}
		if mask, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64); err == nil && mask&(1<<(unix.SIGKILL-1)) != 0 {
			return true
		}
	}
	return false
}

// write records the state; called while holding the lock.
func (l *pidLock) write(st instanceState) error {
	if err := l.f.Truncate(0); err != nil {
		return err
	}
	line := fmt.Sprintf("%d\nbackend=%s mode=%s", st.pid, st.backend, st.mode)
	if st.guardian > 0 {
		line += fmt.Sprintf(" guardian=%d", st.guardian)
	}
	if st.instance != "" {
		line += " instance=" + st.instance
	}
	_, err := l.f.WriteAt([]byte(line+"\n"), 0)
	return err
}

// release removes the file and drops the lock. Removing first means a
// concurrent start either sees our lock or creates a fresh file.
func (l *pidLock) release() {
	os.Remove(l.f.Name())
	l.f.Close()
}

// probePidfile says whether an instance holds the lock, and its state.
func probePidfile(path string) (running bool, st instanceState, err error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return false, st, nil
	}
	if err != nil {
		return false, st, fmt.Errorf("pid file: %w", err)
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_SH|unix.LOCK_NB); err == nil {
		unix.Flock(int(f.Fd()), unix.LOCK_UN)
		return false, st, nil
	} else if !errors.Is(err, unix.EWOULDBLOCK) {
		return false, st, fmt.Errorf("pid file %s: lock: %w", path, err)
	}
	st, err = readState(f)
	return true, st, err
}

func readState(f *os.File) (instanceState, error) {
	var st instanceState
	if _, err := f.Seek(0, 0); err != nil {
		return st, err
	}
	sc := bufio.NewScanner(f)
	if !sc.Scan() {
		return st, errors.New("pid file is empty (instance starting?)")
	}
	pid, err := strconv.Atoi(strings.TrimSpace(sc.Text()))
	if err != nil || pid <= 0 {
		return st, fmt.Errorf("pid file: bad pid %q", sc.Text())
	}
	st.pid = pid
	if sc.Scan() {
		for _, kv := range strings.Fields(sc.Text()) {
			k, v, _ := strings.Cut(kv, "=")
			switch k {
			case "backend":
				st.backend = v
			case "mode":
				st.mode = v
			case "guardian":
				st.guardian, _ = strconv.Atoi(v)
			case "instance":
				st.instance = v
			}
		}
	}
	return st, nil
}

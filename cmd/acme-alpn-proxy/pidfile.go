package main

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

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
	pid     int
	backend string // "nft", "iptables" or "none"
	mode    string // "tproxy", "redirect" or "none"
}

// lockPidfile takes the lock or returns *errRunning with the holder's state.
func lockPidfile(path string) (*pidLock, error) {
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
	return &pidLock{f: f}, nil
}

// write records the state; called while holding the lock.
func (l *pidLock) write(st instanceState) error {
	if err := l.f.Truncate(0); err != nil {
		return err
	}
	_, err := l.f.WriteAt([]byte(fmt.Sprintf("%d\nbackend=%s mode=%s\n", st.pid, st.backend, st.mode)), 0)
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
			}
		}
	}
	return st, nil
}

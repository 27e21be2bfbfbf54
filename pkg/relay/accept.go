package relay

import (
	"fmt"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"
)

// Accepting: every loop watches the shared listeners; the loop that
// accepts a connection serves it, or hands it to a less busy loop.

func (l *loop) addListener(fd int) error {
	if err := unix.SetNonblock(fd, true); err != nil {
		return err
	}
	l.listeners = append(l.listeners, fd)
	if l.acceptPaused {
		return nil // resumeAccept adds it
	}
	return l.watchListener(fd)
}

// watchListener adds a listener exclusively: a new connection wakes one
// loop, not all of them.
func (l *loop) watchListener(fd int) error {
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLEXCLUSIVE, Fd: int32(fd)}
	if err := unix.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
		return fmt.Errorf("epoll_ctl listener: %w", err)
	}
	return nil
}

func (l *loop) removeListeners() {
	if !l.acceptPaused {
		for _, fd := range l.listeners {
			unix.EpollCtl(l.epfd, unix.EPOLL_CTL_DEL, fd, nil)
		}
	}
	l.listeners = nil
	l.acceptPaused = false
}

// acceptBatch bounds the connections taken per wake-up, so a flood of new
// ones does not starve the established. The listener is level-triggered:
// what is left wakes the loop again.
const acceptBatch = 16

func (l *loop) accept(lfd int) {
	for range acceptBatch {
		fd, client, err := l.sa.accept4(lfd)
		switch err {
		case nil:
		case unix.EAGAIN:
			return
		case unix.EINTR, unix.ECONNABORTED, unix.EPROTO:
			continue // the client left before we took it
		default:
			// EMFILE, ENFILE, ENOBUFS, ENOMEM: retrying at once would
			// spin while the backlog holds the connection.
			l.pauseAccept(err)
			return
		}
		l.acceptBackoff = 0
		l.e.active.Add(1)
		t := l.e.leastLoaded(l)
		t.load.Add(1)
		if t != l && !t.handOff(accepted{fd, client}) {
			t.load.Add(-1)
			l.load.Add(1)
			t = l
		}
		if t == l {
			l.newConn(fd, client)
		}
	}
}

// accepted is a connection handed from the loop that accepted it to the
// one that will serve it.
type accepted struct {
	fd     int
	client netip.AddrPort
}

// handOff queues a connection for t, waking t only if it sleeps: a busy
// loop picks it up on its next round without a system call. It fails
// if t has stopped.
func (t *loop) handOff(a accepted) bool {
	t.mu.Lock()
	if t.quit {
		t.mu.Unlock()
		return false
	}
	t.handoffs = append(t.handoffs, a)
	t.pending.Add(1)
	// Pairs with run's sleeping.Store then pending.Load: one of the two
	// sides sees the other (sequentially consistent atomics).
	if t.sleeping.Load() {
		t.wakeLocked()
	}
	t.mu.Unlock()
	return true
}

// takeHandoffs starts serving the connections other loops handed over.
func (l *loop) takeHandoffs() {
	if l.pending.Load() == 0 {
		return
	}
	l.mu.Lock()
	hs := l.handoffs
	l.handoffs = nil
	l.pending.Store(0)
	l.mu.Unlock()
	for _, a := range hs {
		l.newConn(a.fd, a.client)
	}
}

// pauseAccept stops watching the listeners for a backoff that doubles
// from 5ms to 1s while failures go on: running out of descriptors must
// degrade service, not end it, nor burn a CPU.
func (l *loop) pauseAccept(err error) {
	l.e.cfg.AcceptError(err)
	l.acceptBackoff = min(max(2*l.acceptBackoff, 5*time.Millisecond), time.Second)
	l.acceptResume = time.Now().Add(l.acceptBackoff)
	if !l.acceptPaused {
		for _, fd := range l.listeners {
			unix.EpollCtl(l.epfd, unix.EPOLL_CTL_DEL, fd, nil)
		}
		l.acceptPaused = true
	}
}

func (l *loop) resumeAccept() {
	l.acceptPaused = false
	for _, fd := range l.listeners {
		if err := l.watchListener(fd); err != nil {
			l.pauseAccept(err)
			return
		}
	}
}

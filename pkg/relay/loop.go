package relay

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// loop is one event loop: an epoll instance, the connections it serves,
// and the goroutine that runs it. Other goroutines touch only what mu
// guards (cmds, handoffs, and wakefd's closing) and the atomics; the rest
// is the loop goroutine's alone.
type loop struct {
	e      *Engine
	epfd   int
	wakefd int // eventfd: call wakes the loop through it

	mu       sync.Mutex
	cmds     []func()
	handoffs []accepted // connections another loop accepted for this one

	// Shared with the other loops, lock-free.
	load     atomic.Int32 // connections assigned to this loop and not ended
	pending  atomic.Int32 // len(handoffs)
	sleeping atomic.Bool  // in (or about to enter) a blocking epoll_wait

	quit      bool
	rounds    int // epoll_wait returns, for tests that catch a spinning loop
	listeners []int
	// Accepting pauses after EMFILE and the like; see pauseAccept.
	acceptPaused  bool
	acceptResume  time.Time
	acceptBackoff time.Duration

	events [256]unix.EpollEvent
	ends   []*endpoint // by descriptor number
	gen    uint32      // tells a registration from earlier ones on the same fd

	hellos, dials timerList // connections waiting, oldest deadline first
	live          connList  // every connection of the loop
	again         []*Conn   // relays cut short by their budget, to resume
	free          []*Conn   // recycled connections
	pipes         pipePool
	sa            sockaddr
}

// maxFreeConns bounds the Conn structs a loop keeps for reuse.
const maxFreeConns = 1024

func newLoop(e *Engine) (*loop, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll_create1: %w", err)
	}
	wakefd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		unix.Close(epfd)
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	l := &loop{e: e, epfd: epfd, wakefd: wakefd}
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(wakefd)}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, wakefd, &ev); err != nil {
		l.closeFDs()
		return nil, fmt.Errorf("epoll_ctl: %w", err)
	}
	return l, nil
}

func (l *loop) closeFDs() {
	l.pipes.drain()
	l.mu.Lock()
	unix.Close(l.wakefd)
	l.wakefd = -1
	l.mu.Unlock()
	unix.Close(l.epfd)
}

var errLoopStopped = errors.New("relay: engine closed")

// call runs fn on the loop's goroutine and returns its error.
func (l *loop) call(fn func(*loop) error) error {
	done := make(chan error, 1)
	l.mu.Lock()
	if l.quit {
		l.mu.Unlock()
		return errLoopStopped
	}
	l.cmds = append(l.cmds, func() { done <- fn(l) })
	l.wakeLocked()
	l.mu.Unlock()
	return <-done
}

// wakeLocked interrupts the loop's wait. l.mu is held, so closeFDs cannot
// close the eventfd (and the kernel reuse its number) under the write.
func (l *loop) wakeLocked() {
	if l.wakefd < 0 {
		return
	}
	var one [8]byte
	binary.NativeEndian.PutUint64(one[:], 1)
	unix.Write(l.wakefd, one[:])
}

func (l *loop) runCommands() {
	var buf [8]byte
	unix.Read(l.wakefd, buf[:])
	l.mu.Lock()
	cmds := l.cmds
	l.cmds = nil
	l.mu.Unlock()
	for _, fn := range cmds {
		fn()
	}
	if l.quit {
		l.mu.Lock()
		for _, fn := range l.cmds { // raced with the last command
			fn()
		}
		l.cmds = nil
		l.mu.Unlock()
	}
}

func (l *loop) run() {
	defer l.e.wg.Done()
	for !l.quit {
		timeout := l.timeout()
		if timeout != 0 {
			l.sleeping.Store(true)
			if l.pending.Load() != 0 {
				timeout = 0
			}
		}
		n, err := unix.EpollWait(l.epfd, l.events[:], timeout)
		l.sleeping.Store(false)
		l.rounds++
		if err != nil && err != unix.EINTR {
			// Only a broken epoll fd gets here; say so, and stop this
			// loop rather than spin.
			l.e.cfg.AcceptError(fmt.Errorf("event loop stopped: epoll_wait: %w", err))
			l.mu.Lock()
			l.quit = true
			l.mu.Unlock()
			l.abortAll()
			l.runCommands()
			return
		}
		for i := range n {
			l.dispatch(&l.events[i])
		}
		l.takeHandoffs()
		l.resumeRelays()
		l.expire()
	}
	// Handed over after the final abort, before quit was set.
	l.abortAll()
}

// timeout is how long epoll_wait may sleep: until the next deadline.
func (l *loop) timeout() int {
	if len(l.again) > 0 {
		return 0
	}
	next := earliest(l.hellos.next(), l.dials.next())
	if l.acceptPaused {
		next = earliest(next, l.acceptResume)
	}
	if next.IsZero() {
		return -1
	}
	d := time.Until(next)
	if d <= 0 {
		return 0
	}
	return int((d + time.Millisecond - 1) / time.Millisecond)
}

// earliest of two deadlines, the zero time meaning none.
func earliest(a, b time.Time) time.Time {
	if a.IsZero() || (!b.IsZero() && b.Before(a)) {
		return b
	}
	return a
}

func (l *loop) dispatch(ev *unix.EpollEvent) {
	fd := int(ev.Fd)
	if ev.Pad == 0 { // not a connection's socket
		if fd == l.wakefd {
			l.runCommands()
		} else if !l.acceptPaused && slices.Contains(l.listeners, fd) {
			// A listener removed earlier in this batch may be closed
			// already, its number even reused.
			l.accept(fd)
		}
		return
	}
	if fd >= len(l.ends) {
		return
	}
	ep := l.ends[fd]
	if ep == nil || ep.gen != uint32(ev.Pad) {
		return // the socket was closed after this event was queued
	}
	if ev.Events&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		ep.readable = true
	}
	if ev.Events&(unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		ep.peerDone = true
	}
	if ev.Events&(unix.EPOLLOUT|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		ep.writable = true
	}
	ep.conn.progress()
}

// register adds a connection's socket to the loop, edge-triggered for
// reading, writing and the peer's FIN: one epoll_ctl for its lifetime.
func (l *loop) register(ep *endpoint) error {
	l.gen++
	if l.gen == 0 {
		l.gen = 1 // 0 marks listeners and the eventfd
	}
	ep.gen = l.gen
	if ep.fd >= len(l.ends) {
		grown := make([]*endpoint, max(ep.fd+1, 2*len(l.ends), 64))
		copy(grown, l.ends)
		l.ends = grown
	}
	l.ends[ep.fd] = ep
	ev := unix.EpollEvent{
		Events: unix.EPOLLIN | unix.EPOLLOUT | unix.EPOLLRDHUP | unix.EPOLLET,
		Fd:     int32(ep.fd),
		Pad:    int32(ep.gen),
	}
	if err := unix.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, ep.fd, &ev); err != nil {
		l.ends[ep.fd] = nil
		return fmt.Errorf("epoll_ctl: %w", err)
	}
	return nil
}

// closeEndpoint closes ep's socket, which also takes it out of epoll.
// With rst the peer gets a reset instead of a FIN.
func (l *loop) closeEndpoint(ep *endpoint, rst bool) {
	if ep.fd < 0 {
		return
	}
	if rst {
		setResetOnClose(ep.fd)
	}
	if ep.fd < len(l.ends) && l.ends[ep.fd] == ep {
		l.ends[ep.fd] = nil
	}
	rawClose(ep.fd)
	ep.fd = -1
}

// expire ends connections past their hello or dial deadline, and resumes
// accepting after a pause.
func (l *loop) expire() {
	if l.hellos.head == nil && l.dials.head == nil && !l.acceptPaused {
		return
	}
	now := time.Now()
	for c := l.hellos.head; c != nil && !now.Before(c.deadline); c = l.hellos.head {
		c.end(EndHelloTimeout, errHelloTimeout, false)
	}
	for c := l.dials.head; c != nil && !now.Before(c.deadline); c = l.dials.head {
		c.end(EndDialFailed, ErrDialTimeout, false)
	}
	if l.acceptPaused && !now.Before(l.acceptResume) {
		l.resumeAccept()
	}
}

var errHelloTimeout = errors.New("no whole ClientHello before the hello timeout")

// resumeRelays continues relays that used up their budget last round.
func (l *loop) resumeRelays() {
	again := l.again
	l.again = nil
	for _, c := range again {
		c.queued = false
		if c.phase == phaseRelay {
			c.progress()
		}
	}
	if cap(again) <= 64 && l.again == nil {
		l.again = again[:0]
	}
}

// abortAll cuts every connection of the loop and returns how many.
func (l *loop) abortAll() int {
	l.takeHandoffs()
	n := 0
	for c := l.live.head; c != nil; c = l.live.head {
		c.cut()
		n++
	}
	return n
}

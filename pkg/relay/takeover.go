package relay

import (
	"errors"
	"net"
	"os"
	"slices"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// TakeOver, called from Config.Route, claims the connection for
// Config.Takeover instead of a backend: the engine dials nothing, and
// Route's backend is ignored.
func (c *Conn) TakeOver() { c.takeover = true }

// TakenOver reports whether Route claimed the connection with TakeOver.
func (c *Conn) TakenOver() bool { return c.takeover }

// Finish ends a connection handed to Config.Takeover: it records end and
// err, counts the connection out for Drain and reports it through Done,
// on the caller's goroutine. Call it once, after closing the connection.
// Set Up, Down and Note before.
func (c *Conn) Finish(end string, err error) {
	e := c.l.e
	c.End, c.Err = end, err
	c.Duration = time.Since(c.Start)
	e.taken.remove(c)
	e.active.Add(-1)
	e.cfg.Done(c)
	e.taken.wg.Done()
}

var errNoTakeover = errors.New("route took the connection over, but Config.Takeover is nil")

// handOver gives the client socket, and the hello bytes read from it, to
// Config.Takeover. The Conn leaves the loop but stays counted as active
// until Finish; it is not recycled.
func (c *Conn) handOver() {
	l := c.l
	if l.e.cfg.Takeover == nil {
		c.end(EndDialFailed, errNoTakeover, false)
		return
	}
	fd := c.client.fd
	// Out of our epoll first: a registration belongs to the open file and
	// would live on in the duplicate net.FileConn makes.
	if err := unix.EpollCtl(l.epfd, unix.EPOLL_CTL_DEL, fd, nil); err != nil {
		c.end(EndHelloError, err, false)
		return
	}
	if l.ends[fd] == &c.client {
		l.ends[fd] = nil
	}
	c.client.fd = -1
	f := os.NewFile(uintptr(fd), "") // non-blocking: Go's poller takes it
	nc, err := net.FileConn(f)
	f.Close()
	if err != nil {
		c.end(EndHelloError, err, false)
		return
	}
	hello := slices.Clone(c.hello.Raw)
	c.Up = int64(len(hello))
	c.hello.Release()
	c.hello = nil
	l.live.remove(c)
	l.load.Add(-1)
	c.phase = phaseDone
	l.e.taken.add(c, nc)
	l.e.cfg.Takeover(c, nc, hello)
}

// takenSet holds the connections handed to Config.Takeover and not yet
// finished, so that Drain and Close can cut them.
type takenSet struct {
	mu    sync.Mutex
	conns map[*Conn]net.Conn
	wg    sync.WaitGroup
}

func (s *takenSet) add(c *Conn, nc net.Conn) {
	s.mu.Lock()
	if s.conns == nil {
		s.conns = make(map[*Conn]net.Conn)
	}
	s.conns[c] = nc
	s.wg.Add(1)
	s.mu.Unlock()
}

func (s *takenSet) remove(c *Conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
}

// cut closes the sockets of the unfinished connections, so their
// handlers fail now and Finish them, and returns how many there were.
func (s *takenSet) cut() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, nc := range s.conns {
		nc.Close()
	}
	return len(s.conns)
}

// Package relay is the proxy's data path: it accepts intercepted
// connections, reads each one's ClientHello, connects to the backend the
// caller's Route picks, replays the hello bytes, then moves bytes both
// ways with splice(2) until both directions end, honouring TCP half-close,
// and reports each connection once through Done.
//
// An Engine runs one event loop per CPU (epoll, non-blocking sockets,
// edge-triggered), not goroutines per connection: an idle proxied
// connection costs its two sockets and a small struct, and a short one
// about 17 system calls in all. Splice pipes come from a per-loop
// pool and are held only while bytes move.
//
//	e, err := relay.NewEngine(relay.Config{
//		HelloTimeout: 10 * time.Second,
//		DialTimeout:  5 * time.Second,
//		Route: func(c *relay.Conn) (netip.AddrPort, string) {
//			if c.OffersACME() {
//				return acmeResponder, "acme"
//			}
//			return webServer, "fallback"
//		},
//		Done: func(c *relay.Conn) {
//			log.Printf("%s -> %s up=%d down=%d end=%q err=%v", c.Client, c.Backend, c.Up, c.Down, c.End, c.Err)
//		},
//	})
//	...
//	e.Serve(listenerFD)   // accept on it, from every loop
//	...
//	e.StopAccepting()     // then close the listener
//	e.Drain(ctx)          // wait for in-flight connections, cut the rest
//	e.Close()
//
// To check that splice carries the traffic of a running proxy:
//
//	strace -f -c -e trace=splice,read,write,recvfrom,sendto -p PID
//
// shows splice calls; reads and writes carry only ClientHellos.
//
// A direction waiting for its destination to take more bytes does not
// watch its source meanwhile: if that source resets, the connection ends
// when the destination reads again or goes away, as with a peer that idles.
package relay

import (
	"context"
	"errors"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
)

// How a connection ended, in Conn.End.
const (
	EndClientClosed  = "client closed" // client finished sending first, then backend
	EndBackendClosed = "backend closed"
	EndClientReset   = "client reset"
	EndBackendReset  = "backend reset"
	EndClientError   = "client error" // other socket error on the client side
	EndBackendError  = "backend error"
	EndHelloTimeout  = "hello timeout"              // no whole ClientHello within Config.HelloTimeout
	EndHelloEOF      = "client closed before hello" // nothing sent before EOF
	EndHelloError    = "client error before hello"
	EndDialFailed    = "dial failed" // the backend refused, was unreachable or timed out
	EndClosed        = "closed"      // cut by Drain or Close
)

const (
	defaultHelloLimit = 10 * time.Second
	defaultDialLimit  = 5 * time.Second
)

// ErrDialTimeout is Conn.Err when the backend did not answer the
// connection attempt within Config.DialTimeout.
var ErrDialTimeout = errors.New("connect to backend timed out")

// Config tells an Engine how to route and report connections.
type Config struct {
	// HelloTimeout bounds the wait for a whole ClientHello (default 10s).
	HelloTimeout time.Duration
	// DialTimeout bounds the connection attempt to the backend (default 5s).
	DialTimeout time.Duration
	// Route picks the backend once the ClientHello has been read (or shown
	// not to be one) and names the choice for Conn.Route. It runs on an
	// event loop: it must not block.
	Route func(c *Conn) (backend netip.AddrPort, route string)
	// Done is called once per accepted connection after it ended and its
	// sockets are closed, on an event loop. c is reused afterwards: copy
	// what you keep.
	Done func(c *Conn)
	// AcceptError reports accept(2) failures other than the routine ones
	// (a client gone before it was accepted). Running out of descriptors
	// pauses accepting with a backoff of up to a second; each failure is
	// reported, so rate-limit any logging.
	AcceptError func(err error)
	// Loops is the number of event loops; 0 means GOMAXPROCS.
	Loops int
}

// Engine accepts, sniffs and relays connections on its event loops.
type Engine struct {
	cfg    Config
	loops  []*loop
	active atomic.Int64
	wg     sync.WaitGroup
	closed atomic.Bool
}

// NewEngine starts the event loops. They accept nothing until Serve.
func NewEngine(cfg Config) (*Engine, error) {
	if cfg.Route == nil {
		return nil, errors.New("relay: Config.Route is required")
	}
	if cfg.HelloTimeout <= 0 {
		cfg.HelloTimeout = defaultHelloLimit
	}
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = defaultDialLimit
	}
	if cfg.Done == nil {
		cfg.Done = func(*Conn) {}
	}
	if cfg.AcceptError == nil {
		cfg.AcceptError = func(error) {}
	}
	n := cfg.Loops
	if n <= 0 {
		n = runtime.GOMAXPROCS(0)
	}
	e := &Engine{cfg: cfg}
	for range n {
		l, err := newLoop(e)
		if err != nil {
			for _, l := range e.loops {
				l.closeFDs()
			}
			return nil, err
		}
		e.loops = append(e.loops, l)
	}
	for _, l := range e.loops {
		e.wg.Add(1)
		go l.run()
	}
	return e, nil
}

// Serve makes every loop accept connections from fd, a listening TCP
// socket. The caller keeps fd: call StopAccepting before closing it.
// Accepted sockets inherit the listener's options: set TCP_NODELAY on it,
// as the engine does on its backend sockets, so small TLS flights do not
// wait on Nagle.
//
// Engine methods must not be called from Route or Done, which run on the
// loops these methods wait for.
func (e *Engine) Serve(fd int) error {
	return e.each(func(l *loop) error { return l.addListener(fd) })
}

// StopAccepting makes the loops forget their listeners; when it returns
// none will accept again, and the caller may close them. Connections
// already accepted go on.
func (e *Engine) StopAccepting() {
	e.each(func(l *loop) error { l.removeListeners(); return nil })
}

// Active is the number of accepted connections that have not ended.
func (e *Engine) Active() int { return int(e.active.Load()) }

// Drain waits until no connection is in flight or ctx ends. Then it cuts
// the connections left (End is EndClosed; the client gets a FIN, the
// backend a reset) and returns how many there were.
func (e *Engine) Drain(ctx context.Context) int {
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for e.Active() > 0 {
		select {
		case <-ctx.Done():
			var cut atomic.Int64
			e.each(func(l *loop) error { cut.Add(int64(l.abortAll())); return nil })
			return int(cut.Load())
		case <-tick.C:
		}
	}
	return 0
}

// Close cuts every connection, stops the loops and frees their
// descriptors. Listeners are the caller's.
func (e *Engine) Close() {
	if e.closed.Swap(true) {
		return
	}
	e.each(func(l *loop) error {
		l.removeListeners()
		l.abortAll()
		l.mu.Lock()
		l.quit = true
		l.mu.Unlock()
		return nil
	})
	e.wg.Wait()
	for _, l := range e.loops {
		l.closeFDs()
	}
}

// leastLoaded picks the loop to serve a connection that l accepted: l
// itself unless another has at least two fewer connections. Which loop
// epoll wakes for a listener is up to the kernel; a burst of long-lived
// connections would otherwise pile onto one loop.
func (e *Engine) leastLoaded(l *loop) *loop {
	best := l
	for _, o := range e.loops {
		if o.load.Load() < best.load.Load()-1 {
			best = o
		}
	}
	return best
}

// rounds counts the times the loops woke up.
func (e *Engine) rounds() int {
	n := 0
	e.each(func(l *loop) error { n += l.rounds; return nil })
	return n
}

// each runs fn on every loop, in the loop's goroutine, and waits.
func (e *Engine) each(fn func(*loop) error) error {
	var errs []error
	for _, l := range e.loops {
		if err := l.call(fn); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

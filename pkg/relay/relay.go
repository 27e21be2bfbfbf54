// Package relay connects an intercepted client to its backend: it dials
// the backend, replays the ClientHello bytes already read from the
// client, then moves bytes both ways with splice(2) until both
// directions end, honouring TCP half-close, and reports what happened.
//
// Idle connections are cheap: a direction waits in Go's netpoller and
// holds no splice pipe and no buffer until its source is readable, so an
// idle proxied connection costs its two sockets and two small parked
// goroutines of its own (Start returns at once, so the caller's goroutine,
// whose stack grew while it dialed, is not kept). Pipes come from a shared
// pool of at most 32 while bytes move.
//
// Typical use, once the ClientHello has been read from client:
//
//	backend, err := relay.Dial(ctx, backendAddr, 5*time.Second)
//	if err != nil { ... }
//	relay.Start(ctx, client, backend, hello, func(res relay.Result) {
//		log.Printf("%s -> %s up=%d down=%d dur=%s end=%q err=%v",
//			client.RemoteAddr(), backendAddr, res.Up, res.Down, res.Duration, res.End, res.Err)
//	})
//
// To check that splice carries the traffic of a running proxy:
//
//	strace -f -c -e trace=splice,read,write,recvfrom,sendto -p PID
//
// shows splice calls and almost no read/write on sockets.
package relay

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// How a relay ended, in Result.End.
const (
	EndClientClosed  = "client closed" // client finished sending first, then backend
	EndBackendClosed = "backend closed"
	EndClientReset   = "client reset"
	EndBackendReset  = "backend reset"
	EndClientError   = "client error" // other socket error on the client side
	EndBackendError  = "backend error"
	EndDeadline      = "deadline"    // a deadline set on either conn during the relay expired
	EndCanceled      = "canceled"    // ctx was canceled
	EndClosed        = "closed"      // a conn was closed by someone else during the relay
	EndDialFailed    = "dial failed" // Proxy could not reach the backend
)

// Result describes one proxied connection, for one log line.
type Result struct {
	Up       int64 // client → backend, including the replayed hello bytes
	Down     int64 // backend → client
	Duration time.Duration
	End      string // one of the End* constants
	Err      error  // nil when both sides closed cleanly
}

// Dial connects to the backend over TCP, giving up after timeout.
//
// It does not use (*net.Dialer).DialTCP: that turns the zero local address
// into an explicit bind to port 0, which fails with EADDRINUSE once
// TIME_WAIT sockets fill the ephemeral range, where connect(2) alone would
// still find a free 4-tuple.
func Dial(ctx context.Context, addr netip.AddrPort, timeout time.Duration) (*net.TCPConn, error) {
	// No keepalive: the backend is this host or near it, and the relay
	// ends when either peer goes; it would cost four setsockopts a dial.
	d := net.Dialer{Timeout: timeout, KeepAlive: -1}
	c, err := d.DialContext(ctx, "tcp", addr.String())
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// Proxy dials backend and relays client to it (see Relay). If the dial
// fails it closes client and returns End == EndDialFailed with the error.
// Duration includes the dial.
func Proxy(ctx context.Context, client *net.TCPConn, backend netip.AddrPort, hello []byte, dialTimeout time.Duration) Result {
	start := time.Now()
	b, err := Dial(ctx, backend, dialTimeout)
	if err != nil {
		client.Close()
		return Result{Duration: time.Since(start), End: EndDialFailed, Err: err}
	}
	res := Relay(ctx, client, b, hello)
	res.Duration = time.Since(start)
	return res
}

// Relay writes hello to backend, then relays both directions until both
// have ended, and closes both conns.
//
// When one side finishes sending, the other side's write half is shut
// down and the opposite direction continues. A reset or error on either
// side, an expired deadline, or ctx cancellation aborts both conns with
// RST, so no peer mistakes a cut-short stream for a complete one.
//
// Relay clears any deadline left on the conns (such as the one bounding
// the ClientHello read). To bound a relay, cancel ctx or set a deadline
// from another goroutine after Relay started.
//
// A direction blocked on a peer that stopped reading does not watch its
// source meanwhile: if that source resets, the relay ends when the
// stalled peer reads again or goes away, as with a peer that idles.
func Relay(ctx context.Context, client, backend *net.TCPConn, hello []byte) Result {
	ch := make(chan Result, 1)
	Start(ctx, client, backend, hello, func(res Result) { ch <- res })
	return <-ch
}

// Start is Relay in the background: it returns at once, and done is called
// once, on a relay goroutine, when both directions have ended and both
// conns are closed. Both directions run on fresh goroutines, so an idle
// connection costs two small parked stacks and nothing of the caller's.
func Start(ctx context.Context, client, backend *net.TCPConn, hello []byte, done func(Result)) {
	r := &relay{client: client, backend: backend, begin: time.Now(), done: done}
	client.SetDeadline(time.Time{})
	backend.SetDeadline(time.Time{})
	if ctx.Done() != nil {
		r.stopCancel = context.AfterFunc(ctx, func() {
			r.note(EndCanceled, ctx.Err())
			r.abort()
		})
	}
	if err := r.start(hello, &r.hellod); err != nil {
		r.finish()
		return
	}
	r.running.Store(2)
	go r.pumpDown()
	go r.pumpUp()
}

// finish runs once, after the last direction: it closes both conns and
// reports.
func (r *relay) finish() {
	if r.stopCancel != nil {
		r.stopCancel()
	}
	r.client.Close()
	r.backend.Close()
	res := Result{Up: r.hellod, Duration: time.Since(r.begin)}
	if r.up != nil {
		res.Up += r.up.bytes()
		res.Down = r.down.bytes()
	}
	r.mu.Lock()
	res.End, res.Err = r.end, r.err
	r.mu.Unlock()
	r.done(res)
}

type relay struct {
	client, backend *net.TCPConn
	up, down        *direction
	begin           time.Time
	hellod          int64
	running         atomic.Int32 // directions still moving bytes
	stopCancel      func() bool
	done            func(Result)

	mu      sync.Mutex
	end     string
	err     error
	aborted bool
}

func (r *relay) start(hello []byte, written *int64) error {
	if len(hello) > 0 {
		n, err := r.backend.Write(hello)
		*written = int64(n)
		if err != nil {
			r.fail(backendSide, err)
			return err
		}
	}
	crc, err := r.client.SyscallConn()
	if err != nil {
		r.fail(clientSide, err)
		return err
	}
	brc, err := r.backend.SyscallConn()
	if err != nil {
		r.fail(backendSide, err)
		return err
	}
	r.up = newDirection(crc, brc)
	r.down = newDirection(brc, crc)
	return nil
}

// side names one end of the relay in Result.End.
type side struct{ closed, reset, failed string }

var (
	clientSide  = side{EndClientClosed, EndClientReset, EndClientError}
	backendSide = side{EndBackendClosed, EndBackendReset, EndBackendError}
)

func (r *relay) pumpUp()   { r.pump(r.up, r.backend, clientSide, backendSide) }
func (r *relay) pumpDown() { r.pump(r.down, r.client, backendSide, clientSide) }

func (r *relay) pump(d *direction, dst *net.TCPConn, src, dstSide side) {
	defer func() {
		if r.running.Add(-1) == 0 {
			r.finish()
		}
	}()
	readErr, writeErr := d.run()
	switch {
	case readErr != nil:
		r.fail(src, readErr)
	case writeErr != nil:
		r.fail(dstSide, writeErr)
	default:
		r.note(src.closed, nil)
		// Pass the EOF on. An error here means dst already failed, which
		// the opposite direction observes and reports.
		dst.CloseWrite()
	}
}

// note records how the relay ended: the first event wins, except that a
// later error outranks an earlier clean close.
func (r *relay) note(end string, err error) {
	r.mu.Lock()
	if r.end == "" || (err != nil && r.err == nil) {
		r.end, r.err = end, err
	}
	r.mu.Unlock()
}

// fail classifies err seen on side s and aborts.
func (r *relay) fail(s side, err error) {
	switch {
	case errors.Is(err, net.ErrClosed):
		// Closed by our abort (already noted) or by the caller.
		r.mu.Lock()
		if r.end == "" {
			r.end = EndClosed
		}
		r.mu.Unlock()
	case errors.Is(err, os.ErrDeadlineExceeded):
		r.note(EndDeadline, err)
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		r.note(s.reset, err)
	default:
		r.note(s.failed, err)
	}
	r.abort()
}

// abort closes both conns with RST, waking any direction parked on them.
func (r *relay) abort() {
	r.mu.Lock()
	done := r.aborted
	r.aborted = true
	r.mu.Unlock()
	if done {
		return
	}
	r.client.SetLinger(0)
	r.backend.SetLinger(0)
	r.client.Close()
	r.backend.Close()
}

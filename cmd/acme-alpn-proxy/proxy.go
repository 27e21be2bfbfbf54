package main

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/relay"
	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/sniff"
)

// proxy accepts intercepted connections and routes each by its ClientHello.
type proxy struct {
	log          *slog.Logger
	alpn         netip.AddrPort // ACME responder
	fallback     netip.AddrPort // web server; invalid = original destination
	port         uint16         // the web server's port, for the original destination
	listenPort   uint16
	helloTimeout time.Duration
	dialTimeout  time.Duration

	mu     sync.Mutex
	conns  map[*net.TCPConn]struct{} // in flight, for the forced end of a drain
	closed bool
	wg     sync.WaitGroup

	// Idle handler goroutines waiting for a connection; see dispatch.
	idle        chan *net.TCPConn
	idleWorkers atomic.Int32
}

// maxIdleWorkers bounds the handler goroutines kept waiting for the next
// connection; their stacks have already grown to what handle needs.
const maxIdleWorkers = 64

// dispatch hands c to an idle handler goroutine, or starts one. Reusing
// them matters at high connection rates: a fresh goroutine grows its stack
// two or three times in handle (dial and logging are deep), which cost
// about a tenth of the proxy's CPU in the connection-rate benchmark.
func (p *proxy) dispatch(c *net.TCPConn) {
	select {
	case p.idle <- c:
	default:
		go p.worker(c)
	}
}

func (p *proxy) worker(c *net.TCPConn) {
	var wait *time.Timer
	for {
		p.handle(c)
		if p.idleWorkers.Add(1) > maxIdleWorkers {
			p.idleWorkers.Add(-1)
			return
		}
		if wait == nil {
			wait = time.NewTimer(10 * time.Second)
		} else {
			wait.Reset(10 * time.Second)
		}
		select {
		case c = <-p.idle:
			p.idleWorkers.Add(-1)
		case <-wait.C:
			p.idleWorkers.Add(-1)
			return
		}
	}
}

// serve accepts on ln until it is closed. Accept errors such as EMFILE back
// off and retry: running out of descriptors must degrade service, not end
// it. While failures go on, a warning is logged at most once a second.
func (p *proxy) serve(ln *net.TCPListener) {
	var backoff time.Duration
	var failures int
	var lastWarn time.Time
	for {
		c, err := ln.AcceptTCP()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			failures++
			if time.Since(lastWarn) >= time.Second {
				p.log.Warn("accept failed; backing off", "listener", ln.Addr().String(), "err", err, "failures", failures)
				lastWarn, failures = time.Now(), 0
			}
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		if !p.track(c) {
			c.Close()
			continue
		}
		p.dispatch(c)
	}
}

func (p *proxy) track(c *net.TCPConn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	if p.conns == nil {
		p.conns = make(map[*net.TCPConn]struct{})
	}
	p.conns[c] = struct{}{}
	p.wg.Add(1)
	return true
}

func (p *proxy) untrack(c *net.TCPConn) {
	p.mu.Lock()
	delete(p.conns, c)
	p.mu.Unlock()
	p.wg.Done()
}

// inFlight counts connections being handled.
func (p *proxy) inFlight() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.conns)
}

// drain waits for in-flight connections until ctx ends, then closes the
// rest. It returns how many were cut off.
func (p *proxy) drain(ctx context.Context) int {
	done := make(chan struct{})
	go func() { p.wg.Wait(); close(done) }()
	select {
	case <-done:
		return 0
	case <-ctx.Done():
	}
	p.mu.Lock()
	p.closed = true
	n := len(p.conns)
	for c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	<-done
	return n
}

// handle serves one connection: read the ClientHello, pick the backend,
// dial it, and hand both conns to the relay, which sends the hello bytes
// first. handle then returns: the relay's own goroutines carry the
// connection, so an idle one does not keep this (dial-grown) stack alive.
func (p *proxy) handle(c *net.TCPConn) {
	start := time.Now()
	c.SetReadDeadline(start.Add(p.helloTimeout))
	hello, err := sniff.Read(c)
	// What the log line needs is copied out so the hello's buffer goes back
	// to the pool before the (possibly long, idle) relay.
	line := &connLine{start: start, client: c.RemoteAddr().(*net.TCPAddr).AddrPort(), sni: hello.ServerName,
		alpn: strings.Join(hello.ALPN, ","), hello: hello.Kind, route: "none"}
	defer hello.Release()

	// A client that half-closed mid-hello still gets the web server's
	// answer, as it would have without us; a stalled or reset one is cut.
	if err != nil && !(errors.Is(err, io.ErrUnexpectedEOF) && len(hello.Raw) > 0) {
		c.Close()
		p.finish(c, line, relay.Result{Up: int64(len(hello.Raw)), End: helloEnd(err), Err: err})
		return
	}

	line.route, line.backend = "fallback", p.fallback
	if hello.Kind == sniff.Complete && hello.OffersACME() {
		line.route, line.backend = "acme", p.alpn
	} else if !line.backend.IsValid() {
		line.backend = p.originalDst(c)
	}
	bc, err := relay.Dial(context.Background(), line.backend, p.dialTimeout)
	if err != nil {
		c.Close()
		p.finish(c, line, relay.Result{End: relay.EndDialFailed, Err: err})
		return
	}
	relay.Start(context.Background(), c, bc, hello.Raw, func(res relay.Result) { p.finish(c, line, res) })
}

// finish logs the connection's line and stops tracking it.
func (p *proxy) finish(c *net.TCPConn, line *connLine, res relay.Result) {
	line.res = res
	line.log(p.log)
	p.untrack(c)
}

// connLine is the one log line of a connection.
type connLine struct {
	start           time.Time
	client, backend netip.AddrPort
	sni, alpn       string
	route           string
	hello           sniff.Kind
	res             relay.Result
}

func (l *connLine) log(log *slog.Logger) {
	level := slog.LevelInfo
	if l.res.End == relay.EndDialFailed {
		level = slog.LevelWarn
	}
	attrs := make([]slog.Attr, 0, 12)
	attrs = append(attrs,
		slog.String("client", l.client.String()),
		slog.String("sni", l.sni),
		slog.String("alpn", l.alpn),
		slog.String("route", l.route),
		slog.String("backend", backendName(l.backend)),
		slog.Int64("up", l.res.Up),
		slog.Int64("down", l.res.Down),
		slog.Duration("dur", time.Since(l.start)),
		slog.String("end", l.res.End))
	if l.hello != sniff.Complete {
		attrs = append(attrs, slog.String("hello", l.hello.String()))
	}
	if l.res.Err != nil {
		attrs = append(attrs, slog.String("err", l.res.Err.Error()))
	}
	log.LogAttrs(context.Background(), level, "conn", attrs...)
}

// originalDst is where the client meant to connect, on the web server's
// port. TPROXY keeps it as the socket's local address; after a NAT redirect
// conntrack has it (SO_ORIGINAL_DST). A connection made straight to the
// listener (local diagnostics) has neither: the local address is used.
func (p *proxy) originalDst(c *net.TCPConn) netip.AddrPort {
	local := c.LocalAddr().(*net.TCPAddr).AddrPort()
	addr := local.Addr()
	if local.Port() == p.listenPort {
		if dst, err := relay.OriginalDst(c); err == nil && dst.Port() != p.listenPort {
			addr = dst.Addr()
		}
	}
	return netip.AddrPortFrom(addr.Unmap(), p.port)
}

func backendName(a netip.AddrPort) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}

func helloEnd(err error) string {
	var ne net.Error
	switch {
	case errors.As(err, &ne) && ne.Timeout():
		return "hello timeout"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return "client closed before hello"
	}
	return "client error before hello"
}

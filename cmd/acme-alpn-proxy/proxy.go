package main

import (
	"context"
	"log/slog"
	"net/netip"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/alpncert"
	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/proxyproto"
	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/relay"
)

// proxy routes intercepted connections by their ClientHello; the relay
// engine's event loops carry them.
type proxy struct {
	log        *slog.Logger
	alpn       netip.AddrPort // ACME responder
	fallback   netip.AddrPort // web server; invalid = original destination
	port       uint16         // the web server's port, for the original destination
	listenPort uint16
	engine     *relay.Engine
	conns      *connLog
	builtin    *alpncert.Responder // -alpn-certs: answer acme-tls/1 in-process
	handshake  time.Duration       // the built-in responder's handshake bound

	// PROXY protocol headers; set by sendHeaders before serve.
	source     fallbackSource
	alpnHeader proxyproto.Version

	// dialMark, when not 0, makes web-server connections dial from the
	// client's address with this mark (-fallback-source client, return
	// path proved); 0 dials from this host's. Set before interception.
	dialMark atomic.Uint32

	warnMu   sync.Mutex
	lastWarn time.Time
	failures int
}

// newProxy starts the engine; serve then hands it the listeners.
func newProxy(log *slog.Logger, alpn, fallback netip.AddrPort, port, listenPort uint16, helloTimeout, dialTimeout time.Duration) (*proxy, error) {
	p := &proxy{log: log, alpn: alpn, fallback: fallback, port: port, listenPort: listenPort, conns: newConnLog(log), handshake: helloTimeout}
	p.conns.source = p.sourceName
	var err error
	p.engine, err = relay.NewEngine(relay.Config{
		Loops:        eventLoops(),
		HelloTimeout: helloTimeout,
		DialTimeout:  dialTimeout,
		Route:        p.route,
		Done:         p.conns.add,
		Takeover:     p.answerBuiltin,
		AcceptError:  p.acceptFailed,
	})
	if err != nil {
		return nil, err
	}
	return p, nil
}

// eventLoops returns how many event loops to run, one per CPU, and gives
// the Go scheduler one P more than that. A loop waits in epoll_wait, a
// system call; with every P in one, the scheduler's monitor thread finds no
// idle P and takes the loop's away after 20µs, every time, waking every
// 20µs to do so (a tenth of the CPU in the conn/s benchmark). With a spare
// P it leaves short system calls alone and backs off.
func eventLoops() int {
	n := runtime.GOMAXPROCS(0)
	runtime.GOMAXPROCS(n + 1)
	return n
}

// sendHeaders makes the proxy send PROXY protocol headers: to the web
// server as source says, to the ACME responder of version alpn (0: none).
// Call it before serve.
func (p *proxy) sendHeaders(source fallbackSource, alpn proxyproto.Version) {
	p.source, p.alpnHeader = source, alpn
}

// serve accepts on every listener of ls, from every event loop.
func (p *proxy) serve(ls *listenSet) error {
	for _, fd := range ls.fds {
		if err := p.engine.Serve(fd); err != nil {
			return err
		}
	}
	return nil
}

// stopAccepting stops the loops accepting, then closes the listeners.
func (p *proxy) stopAccepting(ls *listenSet) {
	p.engine.StopAccepting()
	ls.Close()
}

// inFlight counts connections being handled.
func (p *proxy) inFlight() int { return p.engine.Active() }

// drain waits for in-flight connections until ctx ends, then closes the
// rest and stops the engine. It returns how many were cut off.
func (p *proxy) drain(ctx context.Context) int {
	n := p.engine.Drain(ctx)
	p.close()
	return n
}

// close cuts whatever is left, stops the engine and writes the last
// connection lines. Calling it twice is harmless.
func (p *proxy) close() {
	p.engine.Close()
	p.conns.close()
}

// acceptFailed logs accept errors (EMFILE and the like) at most once a
// second; the engine backs off meanwhile.
func (p *proxy) acceptFailed(err error) {
	p.warnMu.Lock()
	defer p.warnMu.Unlock()
	p.failures++
	if time.Since(p.lastWarn) >= time.Second {
		// Written from its own goroutine: this runs on an event loop,
		// which a stalled log must not hold up (see connLog).
		go p.log.Warn("accept failed; backing off", "err", err, "failures", p.failures)
		p.lastWarn, p.failures = time.Now(), 0
	}
}

// route sends a client offering acme-tls/1 to the ACME responder and
// everything else, TLS or not, to the web server, with a PROXY protocol
// header naming the client and the address it dialed where the flags ask
// for one.
func (p *proxy) route(c *relay.Conn) (netip.AddrPort, string) {
	backend, route, header := p.alpn, "acme", p.alpnHeader
	switch {
	case c.OffersACME() && p.builtin != nil:
		c.TakeOver() // see answerBuiltin
		return netip.AddrPort{}, "acme"
	case !c.OffersACME():
		backend, route, header = p.fallback, "fallback", p.source.header()
		if m := p.dialMark.Load(); m != 0 {
			c.Dial.Source, c.Dial.Mark = c.Client.Addr(), m
		}
	}
	var dialed netip.AddrPort
	if header != 0 || !backend.IsValid() {
		dialed = p.dialed(c)
	}
	if !backend.IsValid() {
		backend = netip.AddrPortFrom(dialed.Addr(), p.port)
	}
	if header != 0 {
		// The engine keeps the buffer with the Conn: one allocation per
		// Conn, none per connection.
		c.Dial.Header = proxyproto.Append(slices.Grow(c.Dial.Header[:0], proxyproto.MaxLen), header, c.Client, dialed)
	}
	return backend, route
}

// dialFromClient makes web-server connections dial from the client's
// address with mark (0: from this host's).
func (p *proxy) dialFromClient(mark uint32) { p.dialMark.Store(mark) }

// sourceInEffect is -fallback-source as in effect: client only where the
// return path was proved.
func (p *proxy) sourceInEffect() fallbackSource {
	if p.source == sourceClient && p.dialMark.Load() == 0 {
		return sourceHost
	}
	return p.source
}

// dialed is the address and port the client connected to. TPROXY keeps it
// as the socket's local address; after a NAT redirect conntrack has it
// (SO_ORIGINAL_DST). A connection made straight to the listener (local
// diagnostics) has neither: the local address is used.
func (p *proxy) dialed(c *relay.Conn) netip.AddrPort {
	local, _ := c.LocalAddr()
	if local.Port() == p.listenPort {
		if dst, err := c.OriginalDst(); err == nil && dst.Port() != p.listenPort {
			local = dst
		}
	}
	return netip.AddrPortFrom(local.Addr().Unmap(), local.Port())
}

// sourceName says, for the log, whose address the backend was told the
// connection comes from: "client" when dialed from the client's address,
// "proxy-v1"/"proxy-v2" when a header named the client, "host" for a
// fallback connection without either.
func (p *proxy) sourceName(c *relay.Conn) string {
	switch {
	case c.FromClient:
		return sourceClient.String()
	case len(c.Dial.Header) > 0 && c.Route == "acme":
		return sourceOf(p.alpnHeader).String()
	case len(c.Dial.Header) > 0:
		return p.source.String()
	case c.Route == "fallback":
		return sourceHost.String()
	}
	return ""
}

package relay

import (
	"errors"
	"io"
	"net/netip"
	"slices"
	"time"

	"golang.org/x/sys/unix"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/sniff"
)

// Conn is one proxied connection as Route and Done see it. Its fields
// fill in as it progresses; Route sees the hello facts, Done everything.
type Conn struct {
	Start  time.Time
	Client netip.AddrPort // the peer of the accepted socket

	Hello       sniff.Kind // how far the ClientHello got
	HelloReason string     // why, when Hello is not sniff.Complete
	ServerName  string     // SNI, when Hello is sniff.Complete
	ALPN        []string   // offered protocols, when Hello is sniff.Complete

	Route   string         // Route's name for its choice; "" if never routed
	Backend netip.AddrPort // Route's choice
	Dial    DialOptions    // how to connect to Backend, as Route set them
	// FromClient: the backend was dialed from Dial.Source (the client's
	// address). False after a per-connection fallback to a plain dial.
	FromClient bool

	Up, Down int64 // bytes relayed client → backend (hello included, Dial.Header not) and back
	Duration time.Duration
	End      string // one of the End* constants
	Err      error  // nil when both sides closed cleanly
	Note     string // what a Config.Takeover handler did, for Done

	l               *loop
	phase           phase
	client, backend endpoint
	hello           *sniff.Hello // until it has been written to the backend
	written         int          // Dial.Header and hello bytes written so far
	clientEOF       bool         // the client closed its side during the hello
	up, down        direction
	alpnBuf         []string

	deadline     time.Time
	timers       *timerList
	tprev, tnext *Conn
	lprev, lnext *Conn
	queued       bool // in loop.again
	takeover     bool // Route called TakeOver
}

type phase uint8

const (
	phaseHello phase = iota // reading the ClientHello
	phaseDial               // connecting, writing the hello
	phaseRelay              // splicing both ways
	phaseDone
)

// endpoint is one socket of a connection and what epoll last said of it.
// With edge-triggered events the flags are cleared only by EAGAIN.
type endpoint struct {
	conn     *Conn
	fd       int
	gen      uint32
	readable bool
	writable bool
	peerDone bool // FIN, hang-up or error seen: there is an end to read
	side     side
}

// side names one end of the connection in Conn.End.
type side struct{ closed, reset, failed string }

var (
	clientSide  = side{EndClientClosed, EndClientReset, EndClientError}
	backendSide = side{EndBackendClosed, EndBackendReset, EndBackendError}
)

// OffersACME reports whether the client's ALPN list offers the ACME
// TLS-ALPN-01 protocol.
func (c *Conn) OffersACME() bool {
	return c.Hello == sniff.Complete && slices.Contains(c.ALPN, sniff.ACMEProtocol)
}

// LocalAddr is the accepted socket's local address: with TPROXY, the
// address the client dialed. Like OriginalDst, it asks the socket, so it
// works in Route, not in Done (the socket is closed by then).
func (c *Conn) LocalAddr() (netip.AddrPort, error) {
	return c.l.sa.sockname(c.client.fd)
}

// OriginalDst is where the client addressed the connection before a NAT
// redirect, as conntrack recorded it (see the package-level OriginalDst).
func (c *Conn) OriginalDst() (netip.AddrPort, error) {
	return originalDst(c.client.fd, c.Client.Addr().Is4())
}

// newConn takes an accepted socket into the hello phase.
func (l *loop) newConn(fd int, client netip.AddrPort) {
	var c *Conn
	if n := len(l.free); n > 0 {
		c = l.free[n-1]
		l.free = l.free[:n-1]
	} else {
		c = &Conn{l: l}
		c.client = endpoint{conn: c, side: clientSide}
		c.backend = endpoint{conn: c, side: backendSide}
		c.up = direction{src: &c.client, dst: &c.backend, other: &c.down}
		c.down = direction{src: &c.backend, dst: &c.client, other: &c.up}
	}
	c.Start = time.Now()
	c.Client = netip.AddrPortFrom(client.Addr().Unmap(), client.Port())
	c.phase = phaseHello
	c.client.reset(fd)
	c.backend.reset(-1)
	l.live.push(c)
	if err := l.register(&c.client); err != nil {
		c.end(EndHelloError, err, false)
		return
	}
	c.hello = sniff.New()
	l.hellos.push(c, c.Start.Add(l.e.cfg.HelloTimeout))
}

func (ep *endpoint) reset(fd int) {
	ep.fd = fd
	ep.readable, ep.writable, ep.peerDone = false, false, false
}

// progress does whatever the connection's sockets are now ready for.
func (c *Conn) progress() {
	switch c.phase {
	case phaseHello:
		c.readHello()
	case phaseDial:
		c.writeHello()
	case phaseRelay:
		c.relay()
	}
}

// helloChunk is the first read's buffer: a post-quantum ClientHello is
// 1.5–2 KB, so one read nearly always gets it whole.
const helloChunk = 4 << 10

func (c *Conn) readHello() {
	ep, h := &c.client, c.hello
	for ep.readable {
		if len(h.Raw) == cap(h.Raw) {
			h.Raw = slices.Grow(h.Raw, helloChunk)
		}
		buf := h.Raw[len(h.Raw):cap(h.Raw)]
		n, err := rawRead(ep.fd, buf)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			ep.readable = false
			return
		case err != nil:
			c.end(EndHelloError, err, false)
			return
		case n == 0:
			if len(h.Raw) == 0 {
				c.end(EndHelloEOF, io.EOF, false)
				return
			}
			// A client that half-closed mid-hello still gets the web
			// server's answer, as it would have without us.
			c.clientEOF = true
			c.HelloReason = "stream ended before the ClientHello was complete"
			c.route()
			return
		}
		h.Raw = h.Raw[:len(h.Raw)+n]
		if h.Scan() {
			c.route()
			return
		}
		// A short read emptied the socket: the next bytes bring a new
		// edge, unless a FIN already came with these.
		if n < len(buf) && !ep.peerDone {
			ep.readable = false
		}
	}
}

var errNoBackend = errors.New("route gave no backend address")

// route records the hello's facts, asks Config.Route for the backend and
// starts connecting to it.
func (c *Conn) route() {
	l, h := c.l, c.hello
	l.hellos.remove(c)
	c.Hello = h.Kind
	if h.Kind != sniff.Truncated {
		c.HelloReason = h.Reason
	}
	c.ServerName = h.ServerName
	c.alpnBuf = append(c.alpnBuf[:0], h.ALPN...)
	c.ALPN = c.alpnBuf
	if len(c.ALPN) == 0 {
		c.ALPN = nil
	}
	c.Backend, c.Route = l.e.cfg.Route(c)
	if c.takeover {
		c.handOver()
		return
	}
	if !c.Backend.IsValid() {
		c.end(EndDialFailed, errNoBackend, false)
		return
	}

	fd, err := c.backendSocket()
	if err != nil {
		c.end(EndDialFailed, err, false)
		return
	}
	c.backend.reset(fd)
	// Small TLS flights must not wait on Nagle. (The accepted side
	// inherits TCP_NODELAY from the listener.)
	setNoDelay(fd)
	if err := l.sa.connect(fd, c.Backend); err != nil && err != unix.EINPROGRESS && err != unix.EINTR {
		c.end(EndDialFailed, err, false)
		return
	}
	// Registered once connecting: an unconnected socket polls as hung up.
	if err := l.register(&c.backend); err != nil {
		c.end(EndDialFailed, err, false)
		return
	}
	c.phase = phaseDial
	l.dials.push(c, time.Now().Add(l.e.cfg.DialTimeout))
	// A local backend is usually connected by the time connect returns:
	// try the write now rather than after a round through epoll.
	c.backend.writable = true
	c.writeHello()
}

// writeHello writes Dial.Header, if any, and replays the hello bytes to
// the backend; the first write that succeeds proves the connection is up.
// Header and hello go in one writev while any of the header is left.
func (c *Conn) writeHello() {
	ep := &c.backend
	header, raw := c.Dial.Header, c.hello.Raw
	for ep.writable {
		var n int
		var err error
		if c.written < len(header) {
			n, err = rawWritev2(ep.fd, header[c.written:], raw)
		} else {
			n, err = rawWrite(ep.fd, raw[c.written-len(header):])
		}
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			ep.writable = false
			return
		case err != nil && c.written == 0:
			c.end(EndDialFailed, err, false)
			return
		case err != nil:
			c.fail(backendSide, err)
			return
		}
		c.written += n
		if c.written == len(header)+len(raw) {
			c.startRelay()
			return
		}
	}
}

func (c *Conn) startRelay() {
	c.l.dials.remove(c)
	c.Up = int64(len(c.hello.Raw))
	c.hello.Release()
	c.hello = nil
	c.written = 0
	c.phase = phaseRelay
	c.up.reset(c.clientEOF)
	c.down.reset(false)
	c.relay()
}

// relayBudget bounds the bytes one direction moves per turn, so a bulk
// transfer cannot keep its loop from the other connections.
const relayBudget = 4 << 20

// relay moves bytes both ways as far as the sockets allow.
func (c *Conn) relay() {
	budget := false
	if !c.up.done {
		budget = c.up.move(relayBudget)
	}
	if c.phase == phaseRelay && !c.down.done {
		budget = c.down.move(relayBudget) || budget
	}
	if c.phase != phaseRelay {
		return
	}
	if c.up.done && c.down.done {
		end := EndBackendClosed
		if c.up.first {
			end = EndClientClosed
		}
		c.end(end, nil, false)
		return
	}
	if budget && !c.queued {
		c.queued = true
		c.l.again = append(c.l.again, c)
	}
}

// fail ends the connection after err on side s, with resets to both
// peers, so neither mistakes a cut-short stream for a complete one.
func (c *Conn) fail(s side, err error) {
	end := s.failed
	if err == unix.ECONNRESET || err == unix.EPIPE {
		end = s.reset
	}
	c.end(end, err, true)
}

// cut ends a connection for Drain or Close the way a web server drops an
// idle keep-alive connection: the client gets a FIN, which clients treat
// as "reconnect" (and TLS as truncation, mid-stream); the backend gets a
// reset, so it stops waiting on the request.
func (c *Conn) cut() {
	if c.backend.fd >= 0 {
		setResetOnClose(c.backend.fd)
	}
	c.end(EndClosed, nil, false)
}

// end closes both sockets (with rst, as resets), reports the connection
// and recycles it.
func (c *Conn) end(end string, err error, rst bool) {
	l := c.l
	c.End, c.Err = end, err
	c.Duration = time.Since(c.Start)
	l.hellos.remove(c)
	l.dials.remove(c)
	l.live.remove(c)
	l.closeEndpoint(&c.client, rst)
	l.closeEndpoint(&c.backend, rst)
	switch {
	case c.phase == phaseHello && c.hello != nil:
		c.Up = int64(len(c.hello.Raw)) // read, never sent on
	case c.phase == phaseDial:
		c.Up = int64(max(0, c.written-len(c.Dial.Header)))
	}
	if c.phase == phaseRelay {
		c.Up += c.up.finish(&l.pipes)
		c.Down += c.down.finish(&l.pipes)
	}
	if c.hello != nil {
		c.hello.Release()
		c.hello = nil
	}
	c.phase = phaseDone
	// Counted out first: whoever waits for Done must not see it Active.
	l.load.Add(-1)
	l.e.active.Add(-1)
	l.e.cfg.Done(c)

	*c = Conn{l: l, phase: phaseDone, client: c.client, backend: c.backend, up: c.up, down: c.down, alpnBuf: c.alpnBuf[:0],
		Dial: DialOptions{Header: c.Dial.Header[:0]}}
	clear(c.alpnBuf[:cap(c.alpnBuf)])
	if len(l.free) < maxFreeConns {
		l.free = append(l.free, c)
	}
}

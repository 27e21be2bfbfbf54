package main

import (
	"context"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/relay"
	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/sniff"
)

// connLog takes the per-connection log lines off the event loops. A loop
// only queues the line; a timer writes the queue out connLogDelay later.
// A log that blocks (a terminal paused with Ctrl-S, a pipe nobody reads)
// then delays lines instead of stalling every connection of a loop; past
// maxQueuedLines they are dropped, counted and reported.
type connLog struct {
	log   *slog.Logger
	timer *time.Timer

	mu      sync.Mutex
	queue   []connLine
	spare   []connLine // the previous queue, reused
	dropped int
	armed   bool

	flushMu sync.Mutex // one writer at a time, in queue order
}

const connLogDelay = 10 * time.Millisecond

// maxQueuedLines bounds the queue (about 10 MB of lines); a variable for
// tests.
var maxQueuedLines = 1 << 16

// connLine is what one connection's log line says.
type connLine struct {
	client, backend netip.AddrPort
	sni, alpn       string
	route, end      string
	up, down        int64
	dur             time.Duration
	hello           sniff.Kind
	err             error
	fromClient      bool
}

func newConnLog(log *slog.Logger) *connLog {
	q := &connLog{log: log}
	q.timer = time.AfterFunc(time.Hour, q.flush)
	q.timer.Stop()
	return q
}

// add queues c's line; it runs on an event loop and never blocks on I/O.
func (q *connLog) add(c *relay.Conn) {
	line := connLine{
		client: c.Client, backend: c.Backend, sni: c.ServerName, route: c.Route, end: c.End,
		up: c.Up, down: c.Down, dur: c.Duration, hello: c.Hello, err: c.Err,
		fromClient: c.FromClient,
	}
	if len(c.ALPN) > 0 {
		line.alpn = strings.Join(c.ALPN, ",")
	}
	q.mu.Lock()
	if len(q.queue) < maxQueuedLines {
		q.queue = append(q.queue, line)
	} else {
		q.dropped++
	}
	if !q.armed {
		q.armed = true
		q.timer.Reset(connLogDelay)
	}
	q.mu.Unlock()
}

// flush writes the queued lines. It is the timer's function, and close's.
func (q *connLog) flush() {
	q.flushMu.Lock()
	defer q.flushMu.Unlock()
	q.mu.Lock()
	lines, dropped := q.queue, q.dropped
	q.queue, q.spare, q.dropped, q.armed = q.spare[:0], nil, 0, false
	q.mu.Unlock()

	if dropped > 0 {
		q.log.Warn("connection log lines dropped: the log is not keeping up", "dropped", dropped)
	}
	for i := range lines {
		lines[i].write(q.log)
	}
	clear(lines) // drop the strings and errors they reference
	q.mu.Lock()
	if q.spare == nil {
		q.spare = lines[:0]
	}
	q.mu.Unlock()
}

// close writes what is queued. Call it once no loop can add any more.
func (q *connLog) close() {
	q.timer.Stop()
	q.flush()
}

func (l *connLine) write(log *slog.Logger) {
	level := slog.LevelInfo
	if l.end == relay.EndDialFailed {
		level = slog.LevelWarn
	}
	route := l.route
	if route == "" {
		route = "none"
	}
	attrs := make([]slog.Attr, 0, 12)
	attrs = append(attrs,
		slog.String("client", l.client.String()),
		slog.String("sni", l.sni),
		slog.String("alpn", l.alpn),
		slog.String("route", route),
		slog.String("backend", backendName(l.backend)),
		slog.String("source", l.sourceName()),
		slog.Int64("up", l.up),
		slog.Int64("down", l.down),
		slog.Duration("dur", l.dur),
		slog.String("end", l.end))
	if l.hello != sniff.Complete {
		attrs = append(attrs, slog.String("hello", l.hello.String()))
	}
	if l.err != nil {
		attrs = append(attrs, slog.String("err", l.err.Error()))
	}
	log.LogAttrs(context.Background(), level, "conn", attrs...)
}

// sourceName says which address the backend saw the connection from.
func (l *connLine) sourceName() string {
	if l.fromClient {
		return string(sourceClient)
	}
	return string(sourceHost)
}

func backendName(a netip.AddrPort) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}

package relay

import (
	"bytes"
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"
)

// takeoverEngine serves a listener with an engine whose Route takes every
// connection over; handle runs on its own goroutine for each.
func takeoverEngine(t *testing.T, handle func(c *Conn, nc net.Conn, hello []byte)) (*Engine, string, chan result) {
	t.Helper()
	ln := listen(t)
	addr := ln.Addr().String()
	f := listenerFile(t, ln)
	results := make(chan result, 16)
	e, err := NewEngine(Config{
		Loops: 2,
		Route: func(c *Conn) (netip.AddrPort, string) {
			c.TakeOver()
			return netip.AddrPort{}, "taken"
		},
		Takeover: func(c *Conn, nc net.Conn, hello []byte) { go handle(c, nc, hello) },
		Done: func(c *Conn) {
			r := copyResult(c)
			r.HelloReason = c.Note // the handler's note, compared below
			results <- r
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Serve(int(f.Fd())); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.StopAccepting(); f.Close(); e.Close() })
	return e, addr, results
}

// A connection Route takes over reaches the handler as a working net.Conn
// with the hello bytes that were read from it; it stays active until
// Finish, which reports it once, with the handler's note; nothing leaks.
func TestTakeoverHandsOverSocketAndHello(t *testing.T) {
	e, addr, results := takeoverEngine(t, func(c *Conn, nc net.Conn, hello []byte) {
		// Echo: the hello bytes (which may include what followed them in
		// the same read), then the rest of the stream.
		nc.SetDeadline(time.Now().Add(10 * time.Second))
		n, _ := nc.Write(hello)
		m, _ := io.Copy(nc, nc)
		nc.Close()
		c.Up += m
		c.Down = int64(n) + m
		c.Note = "echoed"
		c.Finish("handler done", nil)
	})
	hello := clientHello(t, &tls.Config{ServerName: "example.org", NextProtos: []string{"acme-tls/1"}})
	fds, _ := countFDs(t)
	client, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	fds++ // the client's socket; the accepted one must be gone at the end
	client.Write(hello)
	if !settle(func() bool { return e.Active() == 1 }) {
		t.Fatalf("active = %d while the handler holds the connection, want 1", e.Active())
	}
	client.Write([]byte("more"))
	client.(*net.TCPConn).CloseWrite()
	got, err := io.ReadAll(client)
	if err != nil {
		t.Fatal(err)
	}
	if want := append(hello, "more"...); !bytes.Equal(got, want) {
		t.Fatalf("handler echoed %d bytes, want the %d hello bytes and \"more\"", len(got), len(hello))
	}
	r := <-results
	if r.Route != "taken" || r.End != "handler done" || r.HelloReason != "echoed" || r.ServerName != "example.org" ||
		r.Up != int64(len(hello)+4) || r.Down != int64(len(hello)+4) || r.Backend.IsValid() {
		t.Errorf("Done saw %+v", r)
	}
	select {
	case r := <-results:
		t.Errorf("a second Done report: %+v", r)
	case <-time.After(100 * time.Millisecond):
	}
	if e.Active() != 0 {
		t.Errorf("active = %d after Finish", e.Active())
	}
	if !settle(func() bool { n, _ := countFDs(t); return n <= fds }) {
		n, _ := countFDs(t)
		t.Errorf("%d descriptors open, %d before", n, fds)
	}
}

// Drain waits for a taken-over connection like any other; when its
// context ends it closes the handler's socket, and Close returns only
// after the handler has finished it.
func TestTakeoverDrainCutsStalledHandler(t *testing.T) {
	e, addr, results := takeoverEngine(t, func(c *Conn, nc net.Conn, hello []byte) {
		_, err := nc.Read(make([]byte, 1)) // no deadline: only a cut ends it
		nc.Close()
		c.Finish("handler cut", err)
	})
	hello := clientHello(t, &tls.Config{ServerName: "example.org"})
	client, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	client.Write(hello)
	if !settle(func() bool { return e.Active() == 1 }) {
		t.Fatal("connection not taken over")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if n := e.Drain(ctx); n != 1 {
		t.Errorf("Drain cut %d connections, want 1", n)
	}
	e.Close()
	select {
	case r := <-results:
		if r.End != "handler cut" || r.Err == nil {
			t.Errorf("Done saw %+v, want the handler's end with the read error", r)
		}
	default:
		t.Fatal("Close returned before the handler finished the connection")
	}
	client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := client.Read(make([]byte, 1)); err == nil {
		t.Error("client socket still open after the cut")
	}
}

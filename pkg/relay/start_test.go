package relay

import (
	"context"
	"net"
	"runtime"
	"testing"
	"time"
)

// Start must hand the connection to relay goroutines of its own and return
// at once, so the caller's (deep, dial-grown) stack is not kept alive by an
// idle connection: an idle proxied connection costs exactly two parked
// goroutines.
func TestStartReturnsAndIdleCostsTwoGoroutines(t *testing.T) {
	front, back := listen(t), listen(t)
	const n = 50
	type pair struct{ client, server *net.TCPConn }
	var pairs []pair
	done := make(chan Result, n)
	before := runtime.NumGoroutine()
	for range n {
		c, err := net.DialTCP("tcp", nil, front.Addr().(*net.TCPAddr))
		if err != nil {
			t.Fatal(err)
		}
		pc, err := front.AcceptTCP()
		if err != nil {
			t.Fatal(err)
		}
		bc, err := Dial(context.Background(), back.Addr().(*net.TCPAddr).AddrPort(), time.Second)
		if err != nil {
			t.Fatal(err)
		}
		sc, err := back.AcceptTCP()
		if err != nil {
			t.Fatal(err)
		}
		returned := make(chan struct{})
		go func() {
			Start(context.Background(), pc, bc, []byte("hello"), func(r Result) { done <- r })
			close(returned)
		}()
		select {
		case <-returned:
		case <-time.After(5 * time.Second):
			t.Fatal("Start blocked on an idle connection")
		}
		pairs = append(pairs, pair{c, sc})
	}
	time.Sleep(100 * time.Millisecond)
	if got := runtime.NumGoroutine() - before; got != 2*n {
		t.Errorf("%d idle relays run %d goroutines, want %d (two each)", n, got, 2*n)
	}
	for _, p := range pairs {
		p.client.Close()
		p.server.Close()
	}
	for range n {
		select {
		case r := <-done:
			if r.Up != 5 {
				t.Errorf("Up = %d, want the 5 hello bytes", r.Up)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("done was not called after both peers closed")
		}
	}
	select {
	case r := <-done:
		t.Fatalf("done called more than once per relay: extra %+v", r)
	case <-time.After(100 * time.Millisecond):
	}
}

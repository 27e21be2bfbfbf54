package relay

import (
	"context"
	"net"
	"runtime"
	"strings"
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
	// Counted from a stack dump: other tests' goroutines may still be
	// winding down, so a NumGoroutine difference would be noisy.
	if got := goroutinesIn("relay.(*relay).pump"); got != 2*n {
		t.Errorf("%d idle relays run %d pump goroutines, want %d (two each)", n, got, 2*n)
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

// goroutinesIn counts goroutines whose stack contains fn.
func goroutinesIn(fn string) int {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	count := 0
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, fn) {
			count++
		}
	}
	return count
}

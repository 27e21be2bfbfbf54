package relay

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"net"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestHelloArrivesFirstAndIntact(t *testing.T) {
	hello, _ := io.ReadAll(stream(1, 1800)) // a post-quantum-sized ClientHello
	s := startSession(t, hello)
	if _, err := s.client.Write([]byte("after-hello")); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(hello)+len("after-hello"))
	if _, err := io.ReadFull(s.backend, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[:len(hello)], hello) || string(got[len(hello):]) != "after-hello" {
		t.Fatalf("backend got wrong bytes: hello intact=%v, tail=%q", bytes.Equal(got[:len(hello)], hello), got[len(hello):])
	}
	s.client.CloseWrite()
	s.backend.Close()
	r := s.wait(t)
	if r.Up != int64(len(got)) || r.Down != 0 {
		t.Errorf("accounting: up=%d down=%d, want up=%d down=0", r.Up, r.Down, len(got))
	}
}

func TestIntegrityBothWaysConcurrently(t *testing.T) {
	const size = 64 << 20
	spliced0, copied0 := splicedBytes.Load(), copiedBytes.Load()
	s := startSession(t, nil)

	var wg sync.WaitGroup
	var upSent, downSent, upGot, downGot [32]byte
	var upN, downN int64
	var errs [4]error
	wg.Go(func() {
		upSent, errs[0] = sendHashed(s.client, 1, size)
		s.client.CloseWrite()
	})
	wg.Go(func() {
		downSent, errs[1] = sendHashed(s.backend, 2, size)
		s.backend.CloseWrite()
	})
	wg.Go(func() { upN, upGot, errs[2] = recvHashed(s.backend) })
	wg.Go(func() { downN, downGot, errs[3] = recvHashed(s.client) })
	wg.Wait()
	if err := errors.Join(errs[:]...); err != nil {
		t.Fatal(err)
	}
	if upN != size || upGot != upSent {
		t.Errorf("client→backend: got %d bytes, hash match %v", upN, upGot == upSent)
	}
	if downN != size || downGot != downSent {
		t.Errorf("backend→client: got %d bytes, hash match %v", downN, downGot == downSent)
	}
	r := s.wait(t)
	if r.Up != size || r.Down != size || r.Err != nil {
		t.Errorf("result %+v, want up=down=%d and no error", r, size)
	}
	// The bytes went through splice, not the copy fallback.
	if d := splicedBytes.Load() - spliced0; d < 2*size {
		t.Errorf("splice moved %d bytes, want at least %d", d, 2*size)
	}
	if d := copiedBytes.Load() - copied0; d != 0 {
		t.Errorf("fallback copied %d bytes while pipes were available", d)
	}
}

// Without pipes (descriptor exhaustion) the relay falls back to
// read/write and still delivers every byte.
func TestFallbackCopyWhenNoPipe(t *testing.T) {
	pipes.drain()
	orig := newPipe
	newPipe = func() (*pipe, error) { return nil, syscall.EMFILE }
	t.Cleanup(func() { newPipe = orig })
	spliced0, copied0 := splicedBytes.Load(), copiedBytes.Load()

	const size = 8 << 20
	s := startSession(t, []byte("hello"))
	io.ReadFull(s.backend, make([]byte, 5)) // closing with unread bytes would reset
	sent := make(chan [32]byte, 1)
	go func() {
		h, _ := sendHashed(s.backend, 3, size)
		s.backend.Close()
		sent <- h
	}()
	n, got, err := recvHashed(s.client)
	if want := <-sent; err != nil || n != size || got != want {
		t.Fatalf("got %d bytes (err %v), hash match %v", n, err, got == want)
	}
	s.client.Close()
	s.wait(t)
	if d := copiedBytes.Load() - copied0; d != size {
		t.Errorf("fallback copied %d bytes, want %d", d, size)
	}
	if d := splicedBytes.Load() - spliced0; d != 0 {
		t.Errorf("splice moved %d bytes without any pipe", d)
	}
}

// A reader slower than the sender makes the relay wait for writability;
// it must not spin while it waits.
func TestSlowReader(t *testing.T) {
	const size = 8 << 20
	s := startSession(t, nil)
	s.client.SetReadBuffer(64 << 10)
	sent := make(chan [32]byte, 1)
	go func() {
		h, _ := sendHashed(s.backend, 4, size)
		s.backend.Close()
		sent <- h
	}()
	time.Sleep(200 * time.Millisecond) // let every buffer on the path fill up

	cpu0, wall0 := cpuTime(t), time.Now()
	var got bytes.Buffer
	buf := make([]byte, 256<<10)
	for {
		n, err := s.client.Read(buf)
		got.Write(buf[:n])
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	cpu, wall := cpuTime(t)-cpu0, time.Since(wall0)
	want := <-sent
	if got.Len() != size || sha256.Sum256(got.Bytes()) != want {
		t.Fatalf("slow reader got %d bytes, want %d, hash match %v", got.Len(), size, sha256.Sum256(got.Bytes()) == want)
	}
	// A relay spinning on EAGAIN would burn a whole core for the reader's
	// entire (mostly sleeping) read; waiting costs almost nothing.
	if cpu > wall/2 {
		t.Errorf("process used %v of CPU over %v of slow reading: the relay busy-waits", cpu, wall)
	}
	s.client.Close()
	s.wait(t)
}

func TestHalfCloseClientFirst(t *testing.T) {
	s := startSession(t, []byte("GET"))
	s.client.Write([]byte(" / HTTP/1.0\r\n\r\n"))
	s.client.CloseWrite()
	// The backend sees the whole request and then EOF…
	req, err := io.ReadAll(s.backend)
	if err != nil || string(req) != "GET / HTTP/1.0\r\n\r\n" {
		t.Fatalf("backend read %q, %v", req, err)
	}
	// …and can still answer over the other half.
	resp := bytes.Repeat([]byte("response "), 100000)
	go func() { s.backend.Write(resp); s.backend.Close() }()
	got, err := io.ReadAll(s.client)
	if err != nil || !bytes.Equal(got, resp) {
		t.Fatalf("client read %d bytes (want %d), %v", len(got), len(resp), err)
	}
	r := s.wait(t)
	if r.End != EndClientClosed || r.Err != nil || r.Up != int64(len(req)) || r.Down != int64(len(resp)) {
		t.Errorf("result %+v, want %q, up %d, down %d", r, EndClientClosed, len(req), len(resp))
	}
}

func TestHalfCloseBackendFirst(t *testing.T) {
	s := startSession(t, []byte("hello"))
	s.backend.Write([]byte("banner"))
	s.backend.CloseWrite()
	got, err := io.ReadAll(s.client)
	if err != nil || string(got) != "banner" {
		t.Fatalf("client read %q, %v", got, err)
	}
	// The client can keep sending after the backend's EOF.
	s.client.Write([]byte(" more"))
	s.client.CloseWrite()
	up, err := io.ReadAll(s.backend)
	if err != nil || string(up) != "hello more" {
		t.Fatalf("backend read %q, %v", up, err)
	}
	r := s.wait(t)
	if r.End != EndBackendClosed || r.Err != nil {
		t.Errorf("result %+v, want %q", r, EndBackendClosed)
	}
}

// A reset on one side tears the other down promptly, even when that
// other side is idle, and is reported.
func TestResetEndsRelay(t *testing.T) {
	for _, tc := range []struct {
		name     string
		resetter func(*session) *net.TCPConn
		other    func(*session) *net.TCPConn
		end      string
	}{
		{"client", func(s *session) *net.TCPConn { return s.client }, func(s *session) *net.TCPConn { return s.backend }, EndClientReset},
		{"backend", func(s *session) *net.TCPConn { return s.backend }, func(s *session) *net.TCPConn { return s.client }, EndBackendReset},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := startSession(t, []byte("x"))
			other := tc.other(s)
			if tc.name == "client" {
				io.ReadFull(s.backend, make([]byte, 1)) // hello delivered: relay running
			} else {
				s.backend.Write([]byte("y"))
				io.ReadFull(s.client, make([]byte, 1))
			}
			c := tc.resetter(s)
			c.SetLinger(0)
			c.Close()
			r := s.wait(t)
			if r.End != tc.end || !isReset(r.Err) {
				t.Errorf("result %+v, want %q with a reset error", r, tc.end)
			}
			other.SetReadDeadline(time.Now().Add(10 * time.Second))
			_, err := io.ReadAll(other)
			if !isReset(err) {
				t.Errorf("idle peer read after the reset: %v, want a reset", err)
			}
		})
	}
}

func TestResetMidStream(t *testing.T) {
	s := startSession(t, nil)
	go sendHashed(s.backend, 5, 1<<30)
	io.ReadFull(s.client, make([]byte, 4<<20))
	s.client.SetLinger(0)
	s.client.Close()
	r := s.wait(t)
	if r.End != EndClientReset || r.Down < 4<<20 {
		t.Errorf("result %+v, want %q after at least 4 MiB down", r, EndClientReset)
	}
}

func TestDialRefused(t *testing.T) {
	front := listen(t)
	client, err := net.DialTCP("tcp", nil, front.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	pc, _ := front.AcceptTCP()
	r := Proxy(context.Background(), pc, freePort(t), []byte("hello"), time.Minute)
	if r.End != EndDialFailed || !errors.Is(r.Err, syscall.ECONNREFUSED) {
		t.Fatalf("result %+v, want %q with ECONNREFUSED", r, EndDialFailed)
	}
	// Refused means refused: no waiting for the dial timeout.
	if r.Duration > 20*time.Second {
		t.Errorf("refused dial took %v", r.Duration)
	}
	client.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := client.Read(make([]byte, 1)); err != io.EOF {
		t.Errorf("client read after failed dial: %v, want EOF (closed)", err)
	}
}

// A backend whose accept queue is full never answers SYNs: the dial gives
// up after the timeout.
func TestDialTimeout(t *testing.T) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, _ := unix.Getsockname(fd)
	addr := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: sa.(*unix.SockaddrInet4).Port}
	// Fill the backlog with connections nobody accepts.
	for i := 0; ; i++ {
		c, err := net.DialTimeout("tcp", addr.String(), 300*time.Millisecond)
		if err != nil {
			break
		}
		t.Cleanup(func() { c.Close() })
		if i > 16 {
			t.Skip("kernel keeps accepting into a full backlog (syncookies?)")
		}
	}
	_, err = Dial(context.Background(), addr.AddrPort(), 300*time.Millisecond)
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("dial to a full backlog: %v, want a timeout", err)
	}
}

func TestCancelEndsRelay(t *testing.T) {
	{
		ctx, cancel := context.WithCancel(context.Background())
		s := proxyPair(t, ctx, listen(t), listen(t), []byte("x"))
		defer s.client.Close()
		defer s.backend.Close()
		io.ReadFull(s.backend, make([]byte, 1))
		cancel()
		r := s.wait(t)
		if r.End != EndCanceled || !errors.Is(r.Err, context.Canceled) {
			t.Errorf("result %+v, want %q", r, EndCanceled)
		}
		for _, c := range []*net.TCPConn{s.client, s.backend} {
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			if _, err := io.ReadAll(c); !isReset(err) {
				t.Errorf("peer read after cancel: %v, want reset", err)
			}
		}
	}
}

// Deadlines: one left from the hello phase is cleared; one set while the
// relay runs ends it.
func TestDeadlines(t *testing.T) {
	front, back := listen(t), listen(t)
	client, err := net.DialTCP("tcp", nil, front.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	pc, _ := front.AcceptTCP()
	pc.SetDeadline(time.Now().Add(100 * time.Millisecond)) // hello-phase deadline
	bc, err := Dial(context.Background(), back.Addr().(*net.TCPAddr).AddrPort(), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	bs, _ := back.AcceptTCP()
	defer bs.Close()
	result := make(chan Result, 1)
	go func() { result <- Relay(context.Background(), pc, bc, nil) }()

	time.Sleep(300 * time.Millisecond) // past the hello-phase deadline
	client.Write([]byte("still relaying"))
	got := make([]byte, len("still relaying"))
	if _, err := io.ReadFull(bs, got); err != nil {
		t.Fatalf("relay ended at the stale hello deadline: %v", err)
	}
	pc.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	select {
	case r := <-result:
		if r.End != EndDeadline {
			t.Errorf("result %+v, want %q", r, EndDeadline)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("deadline set during the relay did not end it")
	}
}

// Many relays ending every way leave no goroutine and no descriptor
// behind.
func TestNoLeaks(t *testing.T) {
	front, back := listen(t), listen(t)
	pipes.drain()
	g0 := runtime.NumGoroutine()
	fd0, _ := countFDs(t)
	ends := map[string]int{}
	for i := 0; i < 90; i++ {
		s := proxyPair(t, context.Background(), front, back, []byte("hi"))
		go io.Copy(io.Discard, s.backend)
		go sendHashed(s.backend, uint64(i), 1<<30)
		io.ReadFull(s.client, make([]byte, 64<<10))
		switch i % 3 {
		case 0: // client resets mid-stream
			s.client.SetLinger(0)
			s.client.Close()
		case 1: // backend resets mid-stream, the client still reading
			go io.Copy(io.Discard, s.client)
			s.backend.SetLinger(0)
			s.backend.Close()
		case 2: // client closes (not half-closes) while data still flows
			s.client.Close()
		}
		ends[s.wait(t).End]++
		s.client.Close()
		s.backend.Close()
	}
	if ends[EndClientReset] < 30 || ends[EndBackendReset] < 30 {
		t.Errorf("unexpected mix of endings: %v", ends)
	}
	pipes.drain()
	if !settle(func() bool { return runtime.NumGoroutine() <= g0 }) {
		buf := make([]byte, 1<<16)
		t.Errorf("goroutines: %d before, %d after\n%s", g0, runtime.NumGoroutine(), buf[:runtime.Stack(buf, true)])
	}
	if !settle(func() bool { n, _ := countFDs(t); return n <= fd0 }) {
		n, p := countFDs(t)
		t.Errorf("descriptors: %d before, %d after (%d pipes)", fd0, n, p)
	}
}

// Idle proxied connections hold their two sockets and no pipe, even
// after having moved data.
func TestIdleConnectionsHoldNoPipe(t *testing.T) {
	const n = 50
	front, back := listen(t), listen(t)
	pipes.drain()
	fd0, pipe0 := countFDs(t)
	for i := 0; i < n; i++ {
		s := proxyPair(t, context.Background(), front, back, []byte("hi"))
		t.Cleanup(func() { s.client.Close(); s.backend.Close() })
		// Move some data both ways, then go idle.
		io.ReadFull(s.backend, make([]byte, 2))
		s.backend.Write(make([]byte, 100<<10))
		io.ReadFull(s.client, make([]byte, 100<<10))
	}
	// Pooled pipes are shared, not held by connections; a relay may still
	// be on its way back to waiting when the client has read its bytes.
	var fds, pipesHeld int
	settle(func() bool {
		pipes.drain()
		fds, pipesHeld = countFDs(t)
		return pipesHeld == pipe0
	})
	// Each connection: client and backend peers (test side) plus the
	// proxy's two sockets.
	if pipesHeld != pipe0 || fds-fd0 != 4*n {
		t.Errorf("%d idle relays: %d more descriptors (want %d), %d more pipes (want 0)",
			n, fds-fd0, 4*n, pipesHeld-pipe0)
	}
}

func cpuTime(t testing.TB) time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		t.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

package relay

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/sniff"
)

// The ClientHello reaches the backend first and byte for byte, the bytes
// after it follow, Route sees what the hello says, and Done accounts for
// every byte.
func TestHelloArrivesFirstAndIntact(t *testing.T) {
	alpn := []string{"h2", sniff.ACMEProtocol, "http/1.1"}
	hello := clientHello(t, &tls.Config{ServerName: "www.example.org", NextProtos: alpn})
	t.Logf("ClientHello: %d bytes", len(hello))
	if len(hello) < 1000 {
		t.Fatalf("captured ClientHello is only %d bytes; want a post-quantum-sized one", len(hello))
	}
	for _, split := range []struct {
		name   string
		pieces []int // cut points in hello+tail; the client pauses at each
	}{
		{"one write", nil},
		{"hello then tail", []int{len(hello)}},
		// The engine must wait for the rest of the record, not route on
		// the first bytes.
		{"in pieces", []int{3, 5, 700, len(hello) - 1, len(hello) + 2}},
	} {
		t.Run(split.name, func(t *testing.T) {
			h := newHarness(t, harnessOptions{
				Route: func(c *Conn, back netip.AddrPort) (netip.AddrPort, string) {
					if c.OffersACME() {
						return back, "acme"
					}
					return freePortUnused, "fallback"
				},
			})
			client := h.dial(t)
			const tail = "after-hello"
			all := append(slices.Clone(hello), tail...)
			prev := 0
			for _, cut := range split.pieces {
				if _, err := client.Write(all[prev:cut]); err != nil {
					t.Fatal(err)
				}
				prev = cut
				if cut < len(hello) {
					h.backendIdle(t, 50*time.Millisecond) // not routed yet
				}
			}
			if _, err := client.Write(all[prev:]); err != nil {
				t.Fatal(err)
			}
			backend := h.acceptBackend(t, 10*time.Second)
			got := make([]byte, len(all))
			if _, err := io.ReadFull(backend, got); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got[:len(hello)], hello) || string(got[len(hello):]) != tail {
				t.Fatalf("backend got wrong bytes: hello intact=%v, tail=%q", bytes.Equal(got[:len(hello)], hello), got[len(hello):])
			}
			client.CloseWrite()
			expectEOF(t, backend, "backend") // the client's EOF came through
			backend.Close()
			expectEOF(t, client, "client")
			r := h.wait(t)
			want := result{
				Client: client.LocalAddr().(*net.TCPAddr).AddrPort(),
				Hello:  sniff.Complete, ServerName: "www.example.org", ALPN: alpn,
				Route: "acme", Backend: h.backAddr,
				Up: int64(len(all)), Down: 0, End: EndClientClosed,
			}
			r.Duration = 0
			if r.String() != want.String() {
				t.Errorf("Done reported\n %v, want\n %v", r, want)
			}
			h.noMoreResults(t, 50*time.Millisecond)
		})
	}
}

// freePortUnused is a backend no test route should pick.
var freePortUnused = netip.MustParseAddrPort("127.0.0.1:1")

func TestIntegrityBothWaysConcurrently(t *testing.T) {
	const size = 64 << 20
	hello := clientHello(t, &tls.Config{ServerName: "bulk.example"})
	spliced0, copied0 := splicedBytes.Load(), copiedBytes.Load()
	s := startSession(t, hello)
	gotHello := make([]byte, len(hello))
	if _, err := io.ReadFull(s.backend, gotHello); err != nil || !bytes.Equal(gotHello, hello) {
		t.Fatalf("hello: %v, intact %v", err, bytes.Equal(gotHello, hello))
	}

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
	if r.Up != size+int64(len(hello)) || r.Down != size || r.Err != nil ||
		(r.End != EndClientClosed && r.End != EndBackendClosed) {
		t.Errorf("result %v, want up=%d down=%d, closed cleanly", r, size+len(hello), size)
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
// read/write and still delivers every byte, both ways.
func TestFallbackCopyWhenNoPipe(t *testing.T) {
	orig := newPipe
	newPipe = func() (*pipe, error) { return nil, syscall.EMFILE }
	// Registered before the harness, so it runs after the engine stopped.
	t.Cleanup(func() { newPipe = orig })
	spliced0, copied0 := splicedBytes.Load(), copiedBytes.Load()
	_, pipes0 := countFDs(t)

	const size = 8 << 20
	s := startSession(t, []byte("hello"))
	if _, err := io.ReadFull(s.backend, make([]byte, 5)); err != nil {
		t.Fatal(err) // closing with unread bytes would reset
	}
	var wg sync.WaitGroup
	var downSent, upSent, upGot [32]byte
	var upN int64
	var errs [3]error
	wg.Go(func() {
		downSent, errs[0] = sendHashed(s.backend, 3, size)
		s.backend.CloseWrite()
	})
	wg.Go(func() {
		upSent, errs[1] = sendHashed(s.client, 4, size)
		s.client.CloseWrite()
	})
	wg.Go(func() { upN, upGot, errs[2] = recvHashed(s.backend) })
	n, got, err := recvHashed(s.client)
	wg.Wait()
	if err := errors.Join(append(errs[:], err)...); err != nil {
		t.Fatal(err)
	}
	if n != size || got != downSent {
		t.Errorf("backend→client: got %d bytes, hash match %v", n, got == downSent)
	}
	if upN != size || upGot != upSent {
		t.Errorf("client→backend: got %d bytes, hash match %v", upN, upGot == upSent)
	}
	if _, pipes := countFDs(t); pipes != pipes0 {
		t.Errorf("%d pipe descriptors appeared though none could be made", pipes-pipes0)
	}
	r := s.wait(t)
	if r.Up != size+5 || r.Down != size || r.Err != nil {
		t.Errorf("result %v, want up=%d down=%d", r, size+5, size)
	}
	if d := copiedBytes.Load() - copied0; d != 2*size {
		t.Errorf("fallback copied %d bytes, want %d", d, 2*size)
	}
	if d := splicedBytes.Load() - spliced0; d != 0 {
		t.Errorf("splice moved %d bytes without any pipe", d)
	}
}

// A reader slower than the sender makes the relay wait for writability
// (backpressure); it must not spin while it waits, nor lose bytes.
func TestSlowReader(t *testing.T) {
	const size = 8 << 20
	s := startSession(t, []byte("slow"))
	if _, err := io.ReadFull(s.backend, make([]byte, 4)); err != nil {
		t.Fatal(err)
	}
	s.client.SetReadBuffer(64 << 10)
	sent := make(chan [32]byte, 1)
	go func() {
		h, _ := sendHashed(s.backend, 4, size)
		s.backend.Close()
		sent <- h
	}()
	time.Sleep(200 * time.Millisecond) // let every buffer on the path fill up

	rounds0 := s.h.e.rounds()
	reads := 0
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
		reads++
		time.Sleep(20 * time.Millisecond)
	}
	rounds := s.h.e.rounds() - rounds0
	want := <-sent
	if got.Len() != size || sha256.Sum256(got.Bytes()) != want {
		t.Fatalf("slow reader got %d bytes, want %d, hash match %v", got.Len(), size, sha256.Sum256(got.Bytes()) == want)
	}
	// A relay spinning on EAGAIN would wake its loop without end for the
	// reader's entire (mostly sleeping) read; one waiting for writability
	// wakes about once per read that makes room.
	if rounds > 10*reads+100 {
		t.Errorf("the loops woke %d times over %d slow reads: the relay busy-waits", rounds, reads)
	}
	t.Logf("%d loop wake-ups over %d reads", rounds, reads)
	s.client.Close()
	if r := s.wait(t); r.Down != size || r.Err != nil {
		t.Errorf("result %v, want down=%d and no error", r, size)
	}
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
	if r.End != EndClientClosed || r.Err != nil || r.Up != int64(len(req)) || r.Down != int64(len(resp)) || r.Hello != sniff.NotTLS {
		t.Errorf("result %v, want %q, up %d, down %d, not TLS", r, EndClientClosed, len(req), len(resp))
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
	if r.End != EndBackendClosed || r.Err != nil || r.Up != 10 || r.Down != 6 {
		t.Errorf("result %v, want %q, up 10, down 6", r, EndBackendClosed)
	}
}

// A client that half-closes in the middle of its hello still gets the
// backend's answer, as it would have without the proxy.
func TestHalfCloseDuringHello(t *testing.T) {
	h := newHarness(t, harnessOptions{HelloTimeout: time.Minute})
	client := h.dial(t)
	client.Write([]byte{0x16, 0x03, 0x01})
	client.CloseWrite()
	backend := h.acceptBackend(t, 10*time.Second)
	got, err := io.ReadAll(backend)
	if err != nil || !bytes.Equal(got, []byte{0x16, 0x03, 0x01}) {
		t.Fatalf("backend read % x, %v; want the 3 bytes, then EOF", got, err)
	}
	backend.Write([]byte("alert"))
	backend.Close()
	if b, err := io.ReadAll(client); err != nil || string(b) != "alert" {
		t.Errorf("client read %q, %v", b, err)
	}
	r := h.wait(t)
	if r.Hello != sniff.Truncated || r.HelloReason == "" || r.Route != "back" ||
		r.End != EndClientClosed || r.Up != 3 || r.Down != 5 || r.Err != nil {
		t.Errorf("result %v, want a truncated hello routed to back, client closed, up 3, down 5", r)
	}
}

// A stream that starts like TLS but is not a ClientHello is forwarded as
// it is.
func TestMalformedHelloIsForwarded(t *testing.T) {
	// A handshake record holding a ServerHello-type message.
	bad := []byte{0x16, 0x03, 0x01, 0x00, 0x05, 0x02, 0x00, 0x00, 0x01, 0x00}
	s := startSession(t, bad)
	got := make([]byte, len(bad))
	if _, err := io.ReadFull(s.backend, got); err != nil || !bytes.Equal(got, bad) {
		t.Fatalf("backend read % x, %v; want % x", got, err, bad)
	}
	s.client.Close()
	expectEOF(t, s.backend, "backend")
	s.backend.Close()
	if r := s.wait(t); r.Hello != sniff.Malformed || r.Up != int64(len(bad)) || r.End != EndClientClosed {
		t.Errorf("result %v, want malformed, up %d, client closed", r, len(bad))
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
			io.ReadFull(s.backend, make([]byte, 1)) // hello delivered: relay running
			if tc.name == "backend" {
				s.backend.Write([]byte("y"))
				io.ReadFull(s.client, make([]byte, 1))
			}
			c := tc.resetter(s)
			c.SetLinger(0)
			c.Close()
			r := s.wait(t)
			if r.End != tc.end || !isReset(r.Err) {
				t.Errorf("result %v, want %q with a reset error", r, tc.end)
			}
			other := tc.other(s)
			other.SetReadDeadline(time.Now().Add(10 * time.Second))
			_, err := io.ReadAll(other)
			if !isReset(err) {
				t.Errorf("idle peer read after the reset: %v, want a reset", err)
			}
		})
	}
}

func TestResetMidStream(t *testing.T) {
	s := startSession(t, []byte("x"))
	io.ReadFull(s.backend, make([]byte, 1))
	sendErr := make(chan error, 1)
	go func() { _, err := sendHashed(s.backend, 5, 1<<30); sendErr <- err }()
	if _, err := io.ReadFull(s.client, make([]byte, 4<<20)); err != nil {
		t.Fatal(err)
	}
	s.client.SetLinger(0)
	s.client.Close()
	r := s.wait(t)
	if r.End != EndClientReset || !isReset(r.Err) || r.Down < 4<<20 {
		t.Errorf("result %v, want %q after at least 4 MiB down", r, EndClientReset)
	}
	// The backend, still sending, is reset rather than left hanging. The
	// kernel reports a reset once: to the writer or to the reader.
	s.backend.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, readErr := io.ReadAll(s.backend)
	if err := <-sendErr; !isReset(err) && !isReset(readErr) {
		t.Errorf("backend after the client's reset: write %v, read %v; want a reset", err, readErr)
	}
}

func TestDialRefused(t *testing.T) {
	refused := freePort(t)
	const dialTimeout = time.Minute
	h := newHarness(t, harnessOptions{
		DialTimeout: dialTimeout,
		Route:       func(*Conn, netip.AddrPort) (netip.AddrPort, string) { return refused, "nowhere" },
	})
	client := h.dial(t)
	client.Write([]byte("hello"))
	r := h.wait(t)
	if r.End != EndDialFailed || !errors.Is(r.Err, syscall.ECONNREFUSED) || r.Route != "nowhere" || r.Backend != refused || r.Up != 0 {
		t.Fatalf("result %v, want %q with ECONNREFUSED, routed to %v, nothing sent", r, EndDialFailed, refused)
	}
	// Refused means refused: no waiting for the dial timeout.
	if r.Duration >= dialTimeout/2 {
		t.Errorf("refused dial took %v", r.Duration)
	}
	expectEOF(t, client, "client after the failed dial")
}

// A backend whose accept queue is full drops SYNs: the engine gives up
// after DialTimeout.
func TestDialTimeout(t *testing.T) {
	addr := fullBacklog(t)
	const dialTimeout = 300 * time.Millisecond
	h := newHarness(t, harnessOptions{
		DialTimeout: dialTimeout,
		Route:       func(*Conn, netip.AddrPort) (netip.AddrPort, string) { return addr, "blackhole" },
	})
	client := h.dial(t)
	client.Write([]byte("hello"))
	r := h.wait(t)
	if r.End != EndDialFailed || !errors.Is(r.Err, ErrDialTimeout) || r.Backend != addr {
		t.Fatalf("result %v, want %q with ErrDialTimeout", r, EndDialFailed)
	}
	if r.Duration < dialTimeout {
		t.Errorf("gave up after %v, before the %v dial timeout", r.Duration, dialTimeout)
	}
	expectEOF(t, client, "client after the dial timeout")
}

// fullBacklog returns a loopback address whose listener's accept queue
// is full, so that further SYNs are dropped.
func fullBacklog(t *testing.T) netip.AddrPort {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, _ := syscall.Getsockname(fd)
	addr := netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), uint16(sa.(*syscall.SockaddrInet4).Port))
	// Fill the backlog with connections nobody accepts.
	for i := 0; ; i++ {
		c, err := net.DialTimeout("tcp", addr.String(), 300*time.Millisecond)
		if err != nil {
			break
		}
		t.Cleanup(func() { c.Close() })
		if i > 16 {
			t.Skip("kernel keeps accepting into a full backlog")
		}
	}
	return addr
}

// A client that starts a TLS record and stalls is closed after
// HelloTimeout, and the backend is never dialed.
func TestHelloTimeout(t *testing.T) {
	const helloTimeout = 300 * time.Millisecond
	h := newHarness(t, harnessOptions{HelloTimeout: helloTimeout})
	client := h.dial(t)
	client.Write([]byte{0x16, 0x03, 0x01}) // three bytes of a record header
	r := h.wait(t)
	if r.End != EndHelloTimeout || r.Err == nil || r.Up != 3 || r.Route != "" {
		t.Errorf("result %v, want %q with an error, up 3, not routed", r, EndHelloTimeout)
	}
	if r.Duration < helloTimeout {
		t.Errorf("cut after %v, before the %v hello timeout", r.Duration, helloTimeout)
	}
	expectEOF(t, client, "stalled client")
	h.backendIdle(t, 50*time.Millisecond)
}

// A client that leaves without a byte is reported as such, not routed.
func TestHelloEOF(t *testing.T) {
	h := newHarness(t, harnessOptions{HelloTimeout: time.Minute})
	client := h.dial(t)
	client.CloseWrite()
	r := h.wait(t)
	if r.End != EndHelloEOF || r.Up != 0 || r.Route != "" {
		t.Errorf("result %v, want %q, up 0, not routed", r, EndHelloEOF)
	}
	expectEOF(t, client, "client")
	h.backendIdle(t, 50*time.Millisecond)
}

// A non-TLS client (one that may wait for the server to speak) is routed
// on its first byte, without waiting for the hello timeout.
func TestNotTLSRoutedAtOnce(t *testing.T) {
	h := newHarness(t, harnessOptions{HelloTimeout: time.Hour})
	s := h.open(t, []byte("GET / HTTP/1.0\r\n\r\n")) // fails after 10s without a backend connection
	req := make([]byte, len("GET / HTTP/1.0\r\n\r\n"))
	if _, err := io.ReadFull(s.backend, req); err != nil || string(req) != "GET / HTTP/1.0\r\n\r\n" {
		t.Fatalf("backend read %q, %v", req, err)
	}
	s.backend.Write([]byte("HTTP/1.0 200 OK\r\n\r\n"))
	s.backend.Close()
	if b, err := io.ReadAll(s.client); err != nil || string(b) != "HTTP/1.0 200 OK\r\n\r\n" {
		t.Fatalf("client read %q, %v", b, err)
	}
	s.client.Close()
	r := s.wait(t)
	if r.Hello != sniff.NotTLS || r.Route != "back" || r.End != EndBackendClosed || r.Err != nil {
		t.Errorf("result %v, want not TLS, routed to back, backend closed", r)
	}
}

// Drain waits for open connections, which keep working meanwhile.
func TestDrainWaits(t *testing.T) {
	h := newHarness(t, harnessOptions{})
	s := h.open(t, []byte("x"))
	io.ReadFull(s.backend, make([]byte, 1))
	h.e.StopAccepting()

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	drained := make(chan int, 1)
	go func() { drained <- h.e.Drain(ctx) }()
	select {
	case n := <-drained:
		t.Fatalf("Drain returned (cut %d) while a connection was open", n)
	case <-time.After(200 * time.Millisecond):
	}
	s.client.Write([]byte("more"))
	if b := make([]byte, 4); func() error { _, err := io.ReadFull(s.backend, b); return err }() != nil || string(b) != "more" {
		t.Fatalf("relay stopped working while draining: backend got %q", b)
	}
	s.client.CloseWrite()
	expectEOF(t, s.backend, "backend")
	s.backend.Close()
	select {
	case n := <-drained:
		if n != 0 {
			t.Errorf("Drain cut %d connections, want 0", n)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Drain did not return after the last connection ended")
	}
	if r := h.wait(t); r.End != EndClientClosed || r.Up != 5 {
		t.Errorf("result %v, want %q, up 5", r, EndClientClosed)
	}
	if n := h.e.Active(); n != 0 {
		t.Errorf("Active() = %d after Drain, want 0", n)
	}
}

// When ctx ends first, Drain cuts what is still open, in every phase,
// and says how many.
func TestDrainCuts(t *testing.T) {
	h := newHarness(t, harnessOptions{HelloTimeout: time.Hour})
	relaying := h.open(t, []byte("x"))
	io.ReadFull(relaying.backend, make([]byte, 1))
	helloing := h.dial(t)
	helloing.Write([]byte{0x16, 0x03}) // waits for the rest of its hello
	if !settle(func() bool { return h.e.Active() == 2 }) {
		t.Fatalf("Active() = %d, want 2", h.e.Active())
	}
	h.e.StopAccepting()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if n := h.e.Drain(ctx); n != 2 {
		t.Errorf("Drain cut %d connections, want 2", n)
	}
	for range 2 {
		if r := h.wait(t); r.End != EndClosed || r.Err != nil {
			t.Errorf("result %v, want %q", r, EndClosed)
		}
	}
	// Clients get a FIN, as when a web server drops an idle keep-alive
	// connection; the backend a reset, so it stops waiting.
	expectEnd(t, relaying.client, "relayed client", false)
	expectEnd(t, relaying.backend, "backend", true)
	expectEnd(t, helloing, "client in hello", false)
	if n := h.e.Active(); n != 0 {
		t.Errorf("Active() = %d after Drain, want 0", n)
	}
	h.noMoreResults(t, 50*time.Millisecond)
}

// Close cuts every connection and reports each once.
func TestCloseCutsEverything(t *testing.T) {
	h := newHarness(t, harnessOptions{})
	var sessions []*session
	for range 5 {
		s := h.open(t, []byte("x"))
		io.ReadFull(s.backend, make([]byte, 1))
		sessions = append(sessions, s)
	}
	h.close()
	for range sessions {
		if r := h.wait(t); r.End != EndClosed {
			t.Errorf("result %v, want %q", r, EndClosed)
		}
	}
	h.noMoreResults(t, 50*time.Millisecond)
	for _, s := range sessions {
		expectClosed(t, s.client, "client")
		expectClosed(t, s.backend, "backend")
	}
	if n := h.e.Active(); n != 0 {
		t.Errorf("Active() = %d after Close, want 0", n)
	}
	if err := h.e.Serve(int(h.lnFile.Fd())); err == nil {
		t.Error("Serve on a closed engine succeeded")
	}
}

// After StopAccepting the engine takes no new connection, and the ones it
// has go on.
func TestStopAccepting(t *testing.T) {
	h := newHarness(t, harnessOptions{})
	s := h.open(t, []byte("x"))
	io.ReadFull(s.backend, make([]byte, 1))
	h.e.StopAccepting()
	late := h.dial(t) // the kernel still queues it: the listener is open
	late.Write([]byte("y"))
	h.backendIdle(t, 200*time.Millisecond)
	if n := h.e.Active(); n != 1 {
		t.Errorf("Active() = %d, want the 1 connection accepted before", n)
	}
	s.client.Write([]byte("z"))
	if b := make([]byte, 1); func() error { _, err := io.ReadFull(s.backend, b); return err }() != nil || b[0] != 'z' {
		t.Errorf("connection accepted before StopAccepting stopped relaying")
	}
	h.lnFile.Close() // the queued connection goes with the listener
	late.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := late.Read(make([]byte, 1)); !isReset(err) {
		t.Errorf("client queued after StopAccepting: read %v, want a reset when the listener closed", err)
	}
}

// Many connections ending every way leave no goroutine, no descriptor
// and no active count behind.
func TestNoLeaks(t *testing.T) {
	g0 := runtime.NumGoroutine()
	fd0, _ := countFDs(t)
	refused := freePort(t)
	h := newHarness(t, harnessOptions{
		HelloTimeout: 200 * time.Millisecond,
		Route: func(c *Conn, back netip.AddrPort) (netip.AddrPort, string) {
			if c.ServerName == "refused.example" {
				return refused, "refused"
			}
			return back, "back"
		},
	})
	refusedHello := clientHello(t, &tls.Config{ServerName: "refused.example"})
	const kinds, rounds = 7, 10
	ends := map[string]int{}
	var bg sync.WaitGroup
	for i := range kinds * rounds {
		switch i % kinds {
		case 0, 1, 2:
			s := h.open(t, []byte("hi"))
			bg.Go(func() { io.Copy(io.Discard, s.backend) })
			bg.Go(func() { sendHashed(s.backend, uint64(i), 1<<30) })
			if _, err := io.ReadFull(s.client, make([]byte, 64<<10)); err != nil {
				t.Fatal(err)
			}
			switch i % kinds {
			case 0: // client resets mid-stream
				s.client.SetLinger(0)
				s.client.Close()
			case 1: // backend resets mid-stream, the client still reading
				bg.Go(func() { io.Copy(io.Discard, s.client) })
				s.backend.SetLinger(0)
				s.backend.Close()
			case 2: // client closes (not half-closes) while data still flows
				s.client.Close()
			}
			r := h.wait(t)
			ends[r.End]++
			s.client.Close()
			s.backend.Close()
		case 3: // both finish cleanly, the client first
			s := h.open(t, []byte("hi"))
			s.client.CloseWrite()
			if b, err := io.ReadAll(s.backend); err != nil || string(b) != "hi" {
				t.Fatalf("backend read %q, %v", b, err)
			}
			s.backend.Write([]byte("bye"))
			s.backend.Close()
			if b, err := io.ReadAll(s.client); err != nil || string(b) != "bye" {
				t.Fatalf("client read %q, %v", b, err)
			}
			ends[h.wait(t).End]++
			s.client.Close()
		case 4: // the backend refuses
			c := h.dial(t)
			c.Write(refusedHello)
			ends[h.wait(t).End]++
			c.Close()
		case 5: // the client stalls in its hello
			c := h.dial(t)
			c.Write([]byte{0x16})
			ends[h.wait(t).End]++
			c.Close()
		case 6: // the client leaves without a word
			c := h.dial(t)
			c.Close()
			ends[h.wait(t).End]++
		}
	}
	want := map[string]int{
		EndClientReset: 2 * rounds, EndBackendReset: rounds, EndClientClosed: rounds,
		EndDialFailed: rounds, EndHelloTimeout: rounds, EndHelloEOF: rounds,
	}
	if !mapsEqual(ends, want) {
		t.Errorf("endings %v, want %v", ends, want)
	}
	if n := h.e.Active(); n != 0 {
		t.Errorf("Active() = %d after every connection ended", n)
	}
	h.noMoreResults(t, 50*time.Millisecond)
	bg.Wait()
	h.close()
	if !settle(func() bool { return runtime.NumGoroutine() <= g0 }) {
		t.Errorf("goroutines: %d before, %d after\n%s", g0, runtime.NumGoroutine(), allStacks())
	}
	if !settle(func() bool { n, _ := countFDs(t); return n <= fd0 }) {
		n, p := countFDs(t)
		t.Errorf("descriptors: %d before, %d after (%d pipe ends)", fd0, n, p)
	}
}

func mapsEqual(a, b map[string]int) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// Idle proxied connections hold their two sockets, no pipe and no
// goroutine, even after having moved data both ways; the loops keep at
// most a bounded pool of pipes.
func TestIdleConnectionsHoldNoPipe(t *testing.T) {
	const n = 200
	const loops = 2
	h := newHarness(t, harnessOptions{Loops: loops})
	fd0, pipe0 := countFDs(t)
	g0 := runtime.NumGoroutine()
	for range n {
		s := h.open(t, []byte("hi"))
		io.ReadFull(s.backend, make([]byte, 2))
		// Move some data both ways, then go idle.
		s.backend.Write(make([]byte, 100<<10))
		if _, err := io.ReadFull(s.client, make([]byte, 100<<10)); err != nil {
			t.Fatal(err)
		}
		s.client.Write(make([]byte, 100<<10))
		if _, err := io.ReadFull(s.backend, make([]byte, 100<<10)); err != nil {
			t.Fatal(err)
		}
	}
	// A relay may still be on its way back to waiting when the peer has
	// read its bytes: wait until every pipe is back in a pool.
	var fds, pipeFDs, pooled int
	ok := settle(func() bool {
		pooled = pooledPipes(h.e)
		fds, pipeFDs = countFDs(t)
		return pipeFDs-pipe0 == 2*pooled
	})
	if !ok {
		t.Errorf("%d idle connections: %d pipes open, only %d pooled: connections hold %d",
			n, (pipeFDs-pipe0)/2, pooled, (pipeFDs-pipe0)/2-pooled)
	}
	if pooled > loops*maxFreePipes {
		t.Errorf("%d pipes pooled, want at most %d per loop", pooled, maxFreePipes)
	}
	// Each connection: the client and backend peers (test side) plus the
	// engine's two sockets; nothing else but the pooled pipes.
	if got := fds - fd0 - (pipeFDs - pipe0); got != 4*n {
		t.Errorf("%d idle connections: %d more socket descriptors, want %d (2 per connection in the engine)", n, got, 4*n)
	}
	if a := h.e.Active(); a != n {
		t.Errorf("Active() = %d, want %d", a, n)
	}
	// The loops serve them all: no goroutine per connection (the test's
	// side runs none either; a few may be winding down from earlier tests).
	if g := runtime.NumGoroutine(); g > g0+5 {
		t.Errorf("%d idle connections: %d goroutines, %d before", n, g, g0)
	}
}

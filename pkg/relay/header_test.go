package relay

import (
	"bytes"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/proxyproto"
)

// Route's Dial.Header reaches the backend before the hello, byte for
// byte; Up counts only the client's bytes; each connection starts with no
// header and Route can append to the buffer the previous one left.
func TestDialHeaderPrecedesHello(t *testing.T) {
	hello := clientHello(t, &tls.Config{ServerName: "www.example.org"})
	var entryLens []int // Route's view, on the loop; read after the connections end
	h := newHarness(t, harnessOptions{
		Loops: 1, // the second connection reuses the first one's Conn
		Route: func(c *Conn, back netip.AddrPort) (netip.AddrPort, string) {
			entryLens = append(entryLens, len(c.Dial.Header))
			c.Dial.Header = fmt.Appendf(c.Dial.Header[:0], "HEADER for %v\r\n", c.Client)
			return back, "back"
		},
	})
	const tail = "after-hello"
	for i := range 2 {
		client := h.dial(t)
		if _, err := client.Write(append(slices.Clone(hello), tail...)); err != nil {
			t.Fatal(err)
		}
		backend := h.acceptBackend(t, 10*time.Second)
		header := fmt.Sprintf("HEADER for %v\r\n", client.LocalAddr())
		want := append(append([]byte(header), hello...), tail...)
		got := make([]byte, len(want))
		if _, err := io.ReadFull(backend, got); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("connection %d: backend got %q..., want %q then the hello and %q", i, got[:min(len(got), len(header)+8)], header, tail)
		}
		client.CloseWrite()
		expectEOF(t, backend, "backend")
		backend.Close()
		expectEOF(t, client, "client")
		if r := h.wait(t); r.Up != int64(len(hello)+len(tail)) || r.End != EndClientClosed {
			t.Errorf("connection %d: Done reported up=%d end=%q, want up=%d (the header not counted), end=%q",
				i, r.Up, r.End, len(hello)+len(tail), EndClientClosed)
		}
	}
	if !slices.Equal(entryLens, []int{0, 0}) {
		t.Errorf("Route saw headers of lengths %v on entry, want none left from an earlier connection", entryLens)
	}
}

// A header larger than the socket buffers (no PROXY header is; the write
// path must not care) goes out in many partial writes, some of them
// ending inside the header, and still arrives whole, then the hello.
func TestDialHeaderPartialWrites(t *testing.T) {
	hello := clientHello(t, &tls.Config{ServerName: "www.example.org"})
	header := make([]byte, 8<<20)
	if _, err := io.ReadFull(stream(7, int64(len(header))), header); err != nil {
		t.Fatal(err)
	}
	h := headerHarness(t, header)
	client := h.dial(t)
	if _, err := client.Write(hello); err != nil {
		t.Fatal(err)
	}
	backend := h.acceptBackend(t, 10*time.Second)
	// Not reading for a while fills the socket buffers: the engine's
	// writes come back short, then EAGAIN, until the backend reads.
	time.Sleep(100 * time.Millisecond)
	got, err := io.ReadAll(io.LimitReader(backend, int64(len(header)+len(hello))))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[:min(len(got), len(header))], header) || !bytes.Equal(got[min(len(got), len(header)):], hello) {
		t.Fatalf("backend got %d bytes, not the %d-byte header then the %d-byte hello", len(got), len(header), len(hello))
	}
	client.CloseWrite()
	expectEOF(t, backend, "backend")
	backend.Close()
	expectEOF(t, client, "client")
	if r := h.wait(t); r.Up != int64(len(hello)) {
		t.Errorf("Done reported up=%d, want %d", r.Up, len(hello))
	}
}

// A backend that resets while the header is still going out ends the
// connection with none of the client's bytes counted: the header bytes
// written are not Up.
func TestDialHeaderNotCountedWhenCutShort(t *testing.T) {
	hello := clientHello(t, &tls.Config{ServerName: "www.example.org"})
	header := make([]byte, 8<<20)
	h := headerHarness(t, header)
	client := h.dial(t)
	if _, err := client.Write(hello); err != nil {
		t.Fatal(err)
	}
	backend := h.acceptBackend(t, 10*time.Second)
	if _, err := io.ReadFull(backend, make([]byte, 1<<20)); err != nil {
		t.Fatal(err)
	}
	backend.SetLinger(0)
	backend.Close()
	r := h.wait(t)
	if r.End != EndBackendReset && r.End != EndBackendError {
		t.Errorf("ended %q (%v), want the backend's reset", r.End, r.Err)
	}
	if r.Up != 0 {
		t.Errorf("Done reported up=%d with the header cut short, want 0: the header is not the client's", r.Up)
	}
	expectEnd(t, client, "client", true)
}

// BenchmarkHelloWrite compares ways to send a PROXY header and a
// ClientHello to a connected backend: writev of both (what writeHello
// does), copying both into one buffer and one write, and two writes.
//
//	go test ./pkg/relay -run '^$' -bench HelloWrite
func BenchmarkHelloWrite(b *testing.B) {
	hello := clientHello(b, &tls.Config{ServerName: "www.example.org"})
	header := []byte("PROXY TCP6 2001:db8::1 2001:db8::11 56324 443\r\n")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	peer, err := ln.Accept()
	if err != nil {
		b.Fatal(err)
	}
	defer peer.Close()
	go io.Copy(io.Discard, peer)
	f, err := c.(*net.TCPConn).File() // a blocking duplicate: no EAGAIN to handle
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	fd := int(f.Fd())
	unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	buf := make([]byte, 0, 4<<10)
	for _, way := range []struct {
		name  string
		write func() error
	}{
		{"writev", func() error { _, err := rawWritev2(fd, header, hello); return err }},
		{"copy+write", func() error {
			buf = append(append(buf[:0], header...), hello...)
			_, err := rawWrite(fd, buf)
			return err
		}},
		{"write+write", func() error {
			if _, err := rawWrite(fd, header); err != nil {
				return err
			}
			_, err := rawWrite(fd, hello)
			return err
		}},
	} {
		b.Run(way.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(header) + len(hello)))
			for b.Loop() {
				if err := way.write(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkConnHeader is the connection rate through an Engine with no
// dial header and with a PROXY v1 or v2 one made in Route: 8 clients
// loop connect, ClientHello, 1-byte answer from the backend, close.
//
//	go test ./pkg/relay -run '^$' -bench ConnHeader -count 6
func BenchmarkConnHeader(b *testing.B) {
	hello := clientHello(b, &tls.Config{ServerName: "www.example.org"})
	for _, version := range []proxyproto.Version{0, proxyproto.V1, proxyproto.V2} {
		b.Run("header="+version.String(), func(b *testing.B) {
			h := newHarness(b, harnessOptions{
				Route: func(c *Conn, back netip.AddrPort) (netip.AddrPort, string) {
					if version != 0 {
						c.Dial.Header = proxyproto.Append(slices.Grow(c.Dial.Header[:0], proxyproto.MaxLen), version, c.Client, back)
					}
					return back, "back"
				},
			})
			go func() {
				for range h.results {
				}
			}()
			go func() {
				for {
					c, err := h.back.AcceptTCP()
					if err != nil {
						return
					}
					go func() {
						defer c.Close()
						// The client sends the hello only: it has all once the
						// bytes end with it, whatever header came first.
						var got []byte
						buf := make([]byte, 4<<10)
						for !bytes.HasSuffix(got, hello) {
							n, err := c.Read(buf)
							if err != nil {
								return
							}
							got = append(got, buf[:n]...)
						}
						c.Write([]byte{1})
					}()
				}
			}()
			b.SetParallelism(4) // 4 × GOMAXPROCS clients
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				one := make([]byte, 1)
				for pb.Next() {
					c, err := net.DialTCP("tcp", nil, h.front)
					if err != nil {
						b.Error(err)
						return
					}
					c.Write(hello)
					if _, err := io.ReadFull(c, one); err != nil {
						b.Error(err)
					}
					c.Close()
				}
			})
			b.StopTimer()
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "conn/s")
		})
	}
}

// headerHarness is a harness whose Route sends header before the hello.
func headerHarness(t *testing.T, header []byte) *harness {
	return newHarness(t, harnessOptions{
		Route: func(c *Conn, back netip.AddrPort) (netip.AddrPort, string) {
			c.Dial.Header = header
			return back, "back"
		},
	})
}

package relay

import (
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/internal/hellotest"
	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/sniff"
)

// requireRoot skips tests that need root and network namespaces, except
// under CI=true where not being able to run them is a failure.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("test needs root (network namespaces, nftables)")
	}
	t.Skip("test needs root (network namespaces, nftables)")
}

// result is what Done saw of one connection, copied out: the engine
// reuses its Conn once Done returns.
type result struct {
	Client      netip.AddrPort
	Hello       sniff.Kind
	HelloReason string
	ServerName  string
	ALPN        []string
	Route       string
	Backend     netip.AddrPort
	Up, Down    int64
	Duration    time.Duration
	End         string
	Err         error
	FromClient  bool
}

func copyResult(c *Conn) result {
	return result{
		Client: c.Client, Hello: c.Hello, HelloReason: c.HelloReason,
		ServerName: c.ServerName, ALPN: slices.Clone(c.ALPN),
		Route: c.Route, Backend: c.Backend,
		Up: c.Up, Down: c.Down, Duration: c.Duration, End: c.End, Err: c.Err,
		FromClient: c.FromClient,
	}
}

func (r result) String() string {
	return fmt.Sprintf("{client=%v hello=%v(%s) sni=%q alpn=%q route=%q backend=%v up=%d down=%d dur=%v end=%q err=%v}",
		r.Client, r.Hello, r.HelloReason, r.ServerName, r.ALPN, r.Route, r.Backend, r.Up, r.Down, r.Duration, r.End, r.Err)
}

// harnessOptions configure newHarness; the zero value is a default
// Engine routing every connection to the harness's backend.
type harnessOptions struct {
	HelloTimeout, DialTimeout time.Duration
	Loops                     int
	// Route replaces the default route ("back", to the harness's backend
	// listener, whose address is back). It runs on an event loop.
	Route func(c *Conn, back netip.AddrPort) (netip.AddrPort, string)
	// AcceptError, if set, receives the engine's accept errors.
	AcceptError func(error)
}

// harness is an Engine serving a loopback front listener, routing to a
// loopback backend listener, and reporting every Done on results.
type harness struct {
	e        *Engine
	front    *net.TCPAddr     // where clients connect
	back     *net.TCPListener // the default backend
	backAddr netip.AddrPort
	results  chan result
	lost     atomic.Int64 // results dropped on a full channel
	lnFile   *os.File     // the front listener, kept open for the engine
	loops    int

	closeOnce sync.Once
}

func listen(t testing.TB) *net.TCPListener {
	t.Helper()
	l, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// listenerFile turns a listener into the descriptor an Engine serves:
// it sets TCP_NODELAY on the listening socket (accepted sockets inherit
// it, as the proxy relies on), dups the socket into a file and closes the
// listener. The caller must keep the file open while the engine serves it.
func listenerFile(t testing.TB, ln *net.TCPListener) *os.File {
	t.Helper()
	rc, err := ln.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	}); err != nil || serr != nil {
		t.Fatalf("TCP_NODELAY on the listener: %v %v", err, serr)
	}
	f, err := ln.File()
	if err != nil {
		t.Fatal(err)
	}
	ln.Close()
	return f
}

func newHarness(t testing.TB, o harnessOptions) *harness {
	t.Helper()
	h := &harness{back: listen(t), results: make(chan result, 1<<14)}
	h.backAddr = h.back.Addr().(*net.TCPAddr).AddrPort()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	h.front = ln.Addr().(*net.TCPAddr)
	h.lnFile = listenerFile(t, ln)

	route := func(*Conn) (netip.AddrPort, string) { return h.backAddr, "back" }
	if o.Route != nil {
		route = func(c *Conn) (netip.AddrPort, string) { return o.Route(c, h.backAddr) }
	}
	e, err := NewEngine(Config{
		HelloTimeout: o.HelloTimeout,
		DialTimeout:  o.DialTimeout,
		Loops:        o.Loops,
		Route:        route,
		Done: func(c *Conn) {
			select {
			case h.results <- copyResult(c):
			default:
				h.lost.Add(1)
			}
		},
		AcceptError: o.AcceptError,
	})
	if err != nil {
		h.lnFile.Close()
		t.Fatal(err)
	}
	h.e = e
	h.loops = len(e.loops)
	t.Cleanup(func() {
		h.close()
		if n := h.lost.Load(); n > 0 {
			t.Errorf("%d Done reports dropped on a full channel", n)
		}
	})
	// Fd puts the descriptor in blocking mode; Serve makes it
	// non-blocking again. Never call Fd again while the engine serves it.
	if err := e.Serve(int(h.lnFile.Fd())); err != nil {
		t.Fatal(err)
	}
	return h
}

// close stops the engine as the proxy does: stop accepting, close the
// listener, cut what is left. The backend listener is closed too. It may
// be called more than once.
func (h *harness) close() {
	h.closeOnce.Do(func() {
		h.e.StopAccepting()
		h.lnFile.Close()
		h.e.Close()
		h.back.Close()
	})
}

// wait returns the next Done report, failing the test after 30s.
func (h *harness) wait(t testing.TB) result {
	t.Helper()
	select {
	case r := <-h.results:
		return r
	case <-time.After(30 * time.Second):
		t.Fatalf("no connection ended within 30s (active %d)\n%s", h.e.Active(), allStacks())
		return result{}
	}
}

// noMoreResults fails if a Done report arrives within d.
func (h *harness) noMoreResults(t testing.TB, d time.Duration) {
	t.Helper()
	select {
	case r := <-h.results:
		t.Errorf("unexpected extra Done report: %v", r)
	case <-time.After(d):
	}
}

// dial connects a client to the front listener. It fails rather than
// hangs: every read and write has a one-minute deadline.
func (h *harness) dial(t testing.TB) *net.TCPConn {
	t.Helper()
	c, err := net.DialTCP("tcp", nil, h.front)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(time.Minute))
	return c
}

// acceptBackend returns the backend's side of the next connection the
// engine makes to the harness's backend, failing after timeout.
func (h *harness) acceptBackend(t testing.TB, timeout time.Duration) *net.TCPConn {
	t.Helper()
	h.back.SetDeadline(time.Now().Add(timeout))
	c, err := h.back.AcceptTCP()
	if err != nil {
		t.Fatalf("the engine did not connect to the backend: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(time.Minute))
	return c
}

// backendIdle asserts that the engine has not connected to the backend
// (nothing is waiting in its accept queue within d).
func (h *harness) backendIdle(t testing.TB, d time.Duration) {
	t.Helper()
	h.back.SetDeadline(time.Now().Add(d))
	if c, err := h.back.AcceptTCP(); err == nil {
		c.Close()
		t.Errorf("the engine connected to the backend, want no connection")
	}
}

// session is one connection proxied by a harness's engine.
type session struct {
	h       *harness
	client  *net.TCPConn // the client's socket
	backend *net.TCPConn // the backend server's accepted socket
}

// open connects a client that sends hello first (the engine reads it as
// the ClientHello, or as the first bytes of a non-TLS stream) and returns
// once the engine has connected to the backend. hello must not be empty:
// the engine routes nothing before the client says something.
func (h *harness) open(t testing.TB, hello []byte) *session {
	t.Helper()
	if len(hello) == 0 {
		t.Fatal("open needs hello bytes")
	}
	s := &session{h: h, client: h.dial(t)}
	if _, err := s.client.Write(hello); err != nil {
		t.Fatal(err)
	}
	s.backend = h.acceptBackend(t, 10*time.Second)
	return s
}

// startSession is a new engine with one session.
func startSession(t testing.TB, hello []byte) *session {
	t.Helper()
	return newHarness(t, harnessOptions{}).open(t, hello)
}

func (s *session) wait(t testing.TB) result {
	t.Helper()
	return s.h.wait(t)
}

// expectEOF reads c to its end and fails unless it ends with a clean EOF
// and no bytes.
func expectEOF(t testing.TB, c net.Conn, who string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	b, err := io.ReadAll(c)
	if err != nil || len(b) != 0 {
		t.Errorf("%s read %q, %v; want a clean EOF (closed)", who, b, err)
	}
}

// expectEnd reads c until it ends and fails unless it ends with a reset
// (rst) or a plain EOF (!rst) within 10s.
func expectEnd(t testing.TB, c net.Conn, who string, rst bool) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err := io.Copy(io.Discard, onlyReader{c})
	if rst && !isReset(err) {
		t.Errorf("%s: read after the cut: %v, want a reset", who, err)
	}
	if !rst && err != nil {
		t.Errorf("%s: read after the cut: %v, want EOF", who, err)
	}
}

// expectClosed reads c until it ends and fails unless it ends (EOF or a
// reset) within 10s.
func expectClosed(t testing.TB, c net.Conn, who string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err := io.Copy(io.Discard, onlyReader{c})
	if err != nil && !isReset(err) {
		t.Errorf("%s: read after the cut: %v, want EOF or a reset", who, err)
	}
}

// clientHello returns the first flight crypto/tls writes for cfg: a real
// ClientHello record (about 1.8 KB with the default post-quantum key
// share).
func clientHello(t testing.TB, cfg *tls.Config) []byte {
	t.Helper()
	b, err := hellotest.Capture(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// stream is deterministic pseudo-random data of a given length.
func stream(seed uint64, n int64) io.Reader {
	return io.LimitReader(rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8)}), n)
}

// sendHashed writes n bytes of seeded data to w and returns their sha256.
func sendHashed(w io.Writer, seed uint64, n int64) ([32]byte, error) {
	h := sha256.New()
	_, err := io.CopyBuffer(io.MultiWriter(onlyWriter{w}, h), stream(seed, n), make([]byte, 256<<10))
	return [32]byte(h.Sum(nil)), err
}

// recvHashed reads r to EOF and returns the count and sha256.
func recvHashed(r io.Reader) (int64, [32]byte, error) {
	h := sha256.New()
	n, err := io.CopyBuffer(h, onlyReader{r}, make([]byte, 256<<10))
	return n, [32]byte(h.Sum(nil)), err
}

// onlyReader and onlyWriter hide ReadFrom/WriteTo so io.Copy copies
// through its buffer.
type onlyReader struct{ io.Reader }
type onlyWriter struct{ io.Writer }

// countFDs counts this process's open descriptors, and how many are pipes
// (each splice pipe is two).
func countFDs(t testing.TB) (total, pipes int) {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if l, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && strings.HasPrefix(l, "pipe:") {
			pipes++
		}
	}
	return len(ents) - 1, pipes // minus ReadDir's own descriptor
}

// pooledPipes is the number of pipes the engine's loops keep for reuse,
// read on the loops themselves.
func pooledPipes(e *Engine) int {
	var n atomic.Int64
	e.each(func(l *loop) error { n.Add(int64(len(l.pipes.free))); return nil })
	return int(n.Load())
}

// settle waits until cond holds, collecting garbage in between, and
// reports whether it did.
func settle(cond func() bool) bool {
	for range 500 {
		if cond() {
			return true
		}
		runtime.GC()
		time.Sleep(10 * time.Millisecond)
	}
	return cond()
}

func isReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// freePort is a loopback address nothing listens on.
func freePort(t testing.TB) netip.AddrPort {
	t.Helper()
	l := listen(t)
	ap := l.Addr().(*net.TCPAddr).AddrPort()
	l.Close()
	return ap
}

func cpuTime(t testing.TB) time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		t.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func allStacks() []byte {
	buf := make([]byte, 1<<20)
	return buf[:runtime.Stack(buf, true)]
}

// noDelay reads TCP_NODELAY of the socket fd; -1 if it cannot.
func noDelay(fd int) int {
	v, err := unix.GetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY)
	if err != nil {
		return -1
	}
	return v
}

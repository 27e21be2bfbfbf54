package relay

import (
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"
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

// session is one connection proxied through Proxy on loopback.
type session struct {
	client  *net.TCPConn // the client's socket
	backend *net.TCPConn // the backend server's accepted socket
	result  chan Result
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

// proxyPair builds client → proxy (Relay) → backend on loopback.
func proxyPair(t testing.TB, ctx context.Context, front, back *net.TCPListener, hello []byte) *session {
	t.Helper()
	s := &session{result: make(chan Result, 1)}
	var err error
	s.client, err = net.DialTCP("tcp", nil, front.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	pc, err := front.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	backAddr := back.Addr().(*net.TCPAddr).AddrPort()
	go func() { s.result <- Proxy(ctx, pc, backAddr, hello, 5*time.Second) }()
	s.backend, err = back.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func startSession(t testing.TB, hello []byte) *session {
	t.Helper()
	s := proxyPair(t, context.Background(), listen(t), listen(t), hello)
	// Fail rather than hang when the relay loses an EOF or a reset.
	s.client.SetDeadline(time.Now().Add(time.Minute))
	s.backend.SetDeadline(time.Now().Add(time.Minute))
	t.Cleanup(func() { s.client.Close(); s.backend.Close() })
	return s
}

func (s *session) wait(t testing.TB) Result {
	t.Helper()
	select {
	case r := <-s.result:
		return r
	case <-time.After(30 * time.Second):
		buf := make([]byte, 1<<20)
		t.Fatalf("relay did not end\n%s", buf[:runtime.Stack(buf, true)])
		return Result{}
	}
}

// stream is deterministic pseudo-random data of a given length.
func stream(seed uint64, n int64) io.Reader {
	return io.LimitReader(rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8)}), n)
}

// sendHashed writes n bytes of seeded data to w in writes of chunk bytes
// and returns their sha256.
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

// countFDs counts this process's open descriptors, and how many are pipes.
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

// settle waits until cond holds, collecting garbage in between, and
// reports whether it did.
func settle(cond func() bool) bool {
	for i := 0; i < 200; i++ {
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

func freePort(t *testing.T) netip.AddrPort {
	t.Helper()
	l := listen(t)
	ap := l.Addr().(*net.TCPAddr).AddrPort()
	l.Close()
	return ap
}

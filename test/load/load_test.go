package main

import (
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/internal/acceptloop"
)

func TestPercentileNearestRank(t *testing.T) {
	var ds []time.Duration
	for i := 100; i >= 1; i-- {
		ds = append(ds, time.Duration(i)*time.Millisecond)
	}
	for _, c := range []struct {
		p    float64
		want time.Duration
	}{{50, 50 * time.Millisecond}, {99, 99 * time.Millisecond}, {100, 100 * time.Millisecond}, {0, time.Millisecond}} {
		if got := percentile(ds, c.p); got != c.want {
			t.Errorf("p%v = %v, want %v", c.p, got, c.want)
		}
	}
	if ds[0] != 100*time.Millisecond {
		t.Error("percentile reordered its input")
	}
	if percentile(nil, 50) != 0 {
		t.Error("empty input")
	}
}

func TestSampleProcOfThisProcess(t *testing.T) {
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	s, err := sampleProc(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if s.rssKiB <= 0 || s.pssKiB <= 0 || s.fds < 4 || s.threads < 1 {
		t.Errorf("implausible sample %+v", s)
	}
}

func TestParseGoroutineDump(t *testing.T) {
	dump := `SIGQUIT: quit
PC=0x47 m=0 sigcode=0

goroutine 1 [chan receive]:
main.startForeground(...)

goroutine 7 [syscall]:
golang.org/x/sys/unix.EpollWait(...)
github.com/x/pkg/relay.(*loop).run(...)

goroutine 9 [syscall]:
github.com/x/pkg/relay.(*loop).run(...)

goroutine 0 gp=0x7fad80 m=0 mp=0x7fbd80 [idle]:
runtime.futex(...)

goroutine 449 gp=0x241893504f00 m=nil [GC worker (idle)]:
runtime.gopark(...)

rax    0x0
`
	g := parseGoroutineDump(dump, frameRelay, "main.startForeground(")
	if g.total != 5 || g.own() != 3 || g.byFrame["main.startForeground("] != 1 || g.byFrame[frameRelay] != 2 {
		t.Errorf("got %+v", g)
	}
}

// TestReadHelloSplitRecords feeds a crypto/tls hello split over several
// records followed by a command byte: readHello must stop right before it.
func TestReadHelloSplitRecords(t *testing.T) {
	rec := clientHello("a.test", []string{"acme-tls/1"})
	body := rec[5:]
	var split []byte
	for len(body) > 0 {
		n := min(100, len(body))
		split = append(split, recordHandshake, 3, 1, 0, byte(n))
		split = append(split, body[:n]...)
		body = body[n:]
	}
	r := bytes.NewReader(append(split, cmdEcho))
	if _, err := readHello(r); err != nil {
		t.Fatal(err)
	}
	if b, _ := r.ReadByte(); b != cmdEcho {
		t.Errorf("next byte %q, want the command", b)
	}
	if _, err := readHello(bytes.NewReader(split[:len(split)-1])); err == nil {
		t.Error("truncated hello accepted")
	}
	if _, err := readHello(bytes.NewReader([]byte{23, 3, 3, 0, 1, 0})); err == nil {
		t.Error("application data record accepted as hello")
	}
}

// TestBackendProtocol runs the backend handler on a loopback pair and checks
// the header, the echo, the mid-stream reset and the server close.
func TestBackendProtocol(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go acceptloop.Serve(ln, func(c net.Conn) { serveBackend(c, 'W', 50*time.Millisecond) })
	d := &net.Dialer{}

	s, err := openSession(d, ln.Addr().String(), webHello, cmdEcho, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if s.tag != 'W' || !s.direct() {
		t.Errorf("tag %c peer %s, want W and our own address %s", s.tag, s.peer, s.c.LocalAddr())
	}
	if err := s.ping(1000, 5*time.Second); err != nil {
		t.Error(err)
	}
	s.c.Close()

	s, err = openSession(d, ln.Addr().String(), webHello, cmdResetMid, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	_, err = io.ReadAll(s.c)
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("after mid-stream reset: %v, want ECONNRESET", err)
	}
	s.c.Close()

	s, err = openSession(d, ln.Addr().String(), webHello, cmdServerClose, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	s.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := io.Copy(io.Discard, s.c); err != nil || n != 0 {
		t.Errorf("server close: %d bytes, %v; want a clean EOF", n, err)
	}
	s.c.Close()
}

func TestClientHelloIsRealTLS(t *testing.T) {
	// A crypto/tls server must accept our captured hello as a ClientHello
	// and see its ALPN offer.
	var gotALPN []string
	server, client := net.Pipe()
	defer client.Close()
	go func() {
		client.Write(acmeHello)
		io.Copy(io.Discard, client)
	}()
	srv := tls.Server(server, &tls.Config{GetConfigForClient: func(h *tls.ClientHelloInfo) (*tls.Config, error) {
		gotALPN = h.SupportedProtos
		return nil, errors.New("enough")
	}})
	srv.Handshake()
	server.Close()
	if len(gotALPN) != 1 || gotALPN[0] != "acme-tls/1" {
		t.Errorf("server saw ALPN %v", gotALPN)
	}
}

func TestErrKind(t *testing.T) {
	for err, want := range map[error]string{
		nil:                          "ok",
		io.EOF:                       "closed",
		syscall.ECONNRESET:           "reset",
		syscall.ECONNREFUSED:         "refused",
		os.ErrDeadlineExceeded:       "timeout",
		errors.New("something else"): "other: something else",
	} {
		if got := errKind(err); got != want {
			t.Errorf("errKind(%v) = %q, want %q", err, got, want)
		}
	}
}

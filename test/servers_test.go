package e2e

// Test servers (a TLS web server, a TLS ACME responder, a plain TCP one),
// the clients that talk to them, ClientHello shaping and a load generator.
//
// Protocol of every test server: after the (optional) TLS handshake it
// sends one greeting line "NAME ALPN PEER\n" — who answered, the ALPN
// protocol it negotiated ("-" for none) and the client address it saw —
// then echoes every byte back until the client closes.

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/big"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// ACMEALPN is the TLS-ALPN-01 protocol name.
const ACMEALPN = "acme-tls/1"

// ACMEAddr is where the proxy sends acme-tls/1 connections by default.
var ACMEAddr = netip.MustParseAddrPort("127.0.0.1:31443")

// serverConnLimit bounds how long a test server keeps any connection.
const serverConnLimit = 60 * time.Second

// testCertificate is a self-signed ECDSA certificate shared by the servers;
// clients skip verification, they identify servers by their greeting.
var testCertificate = sync.OnceValues(func() (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "e2e.test"},
		DNSNames:     []string{"e2e.test"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
})

// EchoServer is a test server in a namespace (see the protocol above). It
// records the peer address of every connection.
type EchoServer struct {
	Name string
	tls  *tls.Config // nil: plain TCP
	ln   net.Listener

	mu    sync.Mutex
	peers []netip.AddrPort
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

// StartEchoServer listens on addr in ns and serves until t ends. cfg nil
// means plain TCP.
func StartEchoServer(t testing.TB, ns *Netns, name, network, addr string, cfg *tls.Config) *EchoServer {
	t.Helper()
	ln, err := ns.Listen(network, addr)
	if err != nil {
		t.Fatalf("%s server: listen %s in %s: %v", name, addr, ns.Name, err)
	}
	s := &EchoServer{Name: name, tls: cfg, ln: ln, conns: map[net.Conn]struct{}{}}
	s.wg.Add(1)
	go s.serve()
	t.Cleanup(s.Close)
	return s
}

// StartWebServer is the "web" TLS server on port 443 of every address of
// ns (one dual-stack socket). It negotiates h2 when offered and otherwise
// no ALPN (like a web server that knows nothing of acme-tls/1).
func StartWebServer(t testing.TB, ns *Netns) *EchoServer {
	t.Helper()
	return StartNamedWebServer(t, ns, "web", "tcp", ":443")
}

// StartNamedWebServer is a web server like StartWebServer that greets as
// name and listens on addr, for a second site on the same host (e.g. the
// target of a Docker-style DNAT).
func StartNamedWebServer(t testing.TB, ns *Netns, name, network, addr string) *EchoServer {
	t.Helper()
	cert, err := testCertificate()
	if err != nil {
		t.Fatal(err)
	}
	base := &tls.Config{Certificates: []tls.Certificate{cert}}
	h2 := base.Clone()
	h2.NextProtos = []string{"h2"}
	cfg := base.Clone()
	cfg.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
		if slices.Contains(hello.SupportedProtos, "h2") {
			return h2, nil
		}
		return base, nil
	}
	return StartEchoServer(t, ns, name, network, addr, cfg)
}

// StartACMEServer is the "acme" responder on 127.0.0.1:31443 of ns: TLS
// that accepts only acme-tls/1, like a TLS-ALPN-01 responder.
func StartACMEServer(t testing.TB, ns *Netns) *EchoServer {
	t.Helper()
	cert, err := testCertificate()
	if err != nil {
		t.Fatal(err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{ACMEALPN}}
	return StartEchoServer(t, ns, "acme", "tcp4", ACMEAddr.String(), cfg)
}

func (s *EchoServer) serve() {
	defer s.wg.Done()
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return // closed
		}
		s.mu.Lock()
		if s.conns == nil { // closing
			s.mu.Unlock()
			c.Close()
			return
		}
		s.conns[c] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go s.handle(c)
	}
}

func (s *EchoServer) handle(c net.Conn) {
	defer s.wg.Done()
	defer func() {
		c.Close()
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
	}()
	c.SetDeadline(time.Now().Add(serverConnLimit))
	peer := addrPortOf(c.RemoteAddr())
	s.mu.Lock()
	s.peers = append(s.peers, peer)
	s.mu.Unlock()
	conn, alpn := c, "-"
	if s.tls != nil {
		tc := tls.Server(c, s.tls)
		if err := tc.Handshake(); err != nil {
			return
		}
		if p := tc.ConnectionState().NegotiatedProtocol; p != "" {
			alpn = p
		}
		conn = tc
	}
	if _, err := fmt.Fprintf(conn, "%s %s %s\n", s.Name, alpn, peer); err != nil {
		return
	}
	io.Copy(conn, conn)
}

// Peers returns the client addresses of all connections seen so far.
func (s *EchoServer) Peers() []netip.AddrPort {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.peers)
}

// Close stops accepting, closes every open connection and waits for the
// handlers.
func (s *EchoServer) Close() {
	s.ln.Close()
	s.mu.Lock()
	for c := range s.conns {
		c.Close()
	}
	s.conns = nil
	s.mu.Unlock()
	s.wg.Wait()
}

func addrPortOf(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}

// Site is an Env with the web server on :443 and the ACME responder on
// 127.0.0.1:31443 running in the server namespace.
type Site struct {
	*Env
	Web, ACME *EchoServer
}

// NewSite creates the namespaces and starts both servers.
func NewSite(t testing.TB) *Site {
	t.Helper()
	e := NewEnv(t)
	return &Site{Env: e, Web: StartWebServer(t, e.Srv), ACME: StartACMEServer(t, e.Srv)}
}

// Answer is a server's greeting.
type Answer struct {
	Server string         // "web", "acme", "raw"
	ALPN   string         // negotiated by the server, "" for none
	Peer   netip.AddrPort // the client address the server saw
	// Local is the client socket's own address. The web server sees
	// exactly it only on a direct connection: through the proxy it sees
	// the client's address on another port (-fallback-source client) or
	// this host's address.
	Local netip.AddrPort
}

func parseGreeting(line string) (Answer, error) {
	f := strings.Fields(line)
	if len(f) != 3 {
		return Answer{}, fmt.Errorf("bad greeting %q", line)
	}
	peer, err := netip.ParseAddrPort(f[2])
	if err != nil {
		return Answer{}, fmt.Errorf("bad greeting %q: %v", line, err)
	}
	a := Answer{Server: f[0], ALPN: f[1], Peer: peer}
	if a.ALPN == "-" {
		a.ALPN = ""
	}
	return a, nil
}

// Session is an open client connection that has read the greeting.
type Session struct {
	Conn   net.Conn
	Answer Answer
	r      *bufio.Reader
}

// Greet reads the server's greeting from conn.
func Greet(conn net.Conn, limit time.Duration) (*Session, error) {
	conn.SetReadDeadline(time.Now().Add(limit))
	r := bufio.NewReader(conn)
	line, err := r.ReadString('\n')
	if err != nil {
		return nil, fmt.Errorf("reading greeting: %w (got %q)", err, line)
	}
	conn.SetReadDeadline(time.Time{})
	a, err := parseGreeting(line)
	if err != nil {
		return nil, err
	}
	a.Local = addrPortOf(conn.LocalAddr())
	return &Session{Conn: conn, Answer: a, r: r}, nil
}

// Echo sends msg and a newline and requires the same line back within 5 s.
func (s *Session) Echo(msg string) error {
	s.Conn.SetDeadline(time.Now().Add(5 * time.Second))
	defer s.Conn.SetDeadline(time.Time{})
	if _, err := io.WriteString(s.Conn, msg+"\n"); err != nil {
		return fmt.Errorf("echo write: %w", err)
	}
	line, err := s.r.ReadString('\n')
	if err != nil {
		return fmt.Errorf("echo read: %w (got %q)", err, line)
	}
	if line != msg+"\n" {
		return fmt.Errorf("echo: sent %q, got %q", msg, line)
	}
	return nil
}

// Close closes the connection.
func (s *Session) Close() error { return s.Conn.Close() }

// clientTLS is the client config: any certificate, the given ALPN offer.
func clientTLS(alpn []string) *tls.Config {
	return &tls.Config{InsecureSkipVerify: true, NextProtos: alpn, ServerName: "e2e.test"}
}

// OpenTLSOver runs a TLS handshake on conn offering alpn and reads the
// greeting. It checks that the server's and the client's view of the
// negotiated protocol agree.
func OpenTLSOver(ctx context.Context, conn net.Conn, alpn []string) (*Session, error) {
	tc := tls.Client(conn, clientTLS(alpn))
	if err := tc.HandshakeContext(ctx); err != nil {
		conn.Close()
		return nil, fmt.Errorf("TLS handshake (alpn %v): %w", alpn, err)
	}
	s, err := Greet(tc, greetLimit(ctx))
	if err != nil {
		tc.Close()
		return nil, err
	}
	if got := tc.ConnectionState().NegotiatedProtocol; got != s.Answer.ALPN {
		tc.Close()
		return nil, fmt.Errorf("client negotiated %q, server %s says %q", got, s.Answer.Server, s.Answer.ALPN)
	}
	return s, nil
}

func greetLimit(ctx context.Context) time.Duration {
	if d, ok := ctx.Deadline(); ok {
		return time.Until(d)
	}
	return 10 * time.Second
}

// OpenTLS dials addr from ns, handshakes offering alpn (nil: no ALPN
// extension) and reads the greeting.
func (n *Netns) OpenTLS(ctx context.Context, addr netip.AddrPort, alpn []string) (*Session, error) {
	conn, err := n.Dial(ctx, addr)
	if err != nil {
		return nil, err
	}
	return OpenTLSOver(ctx, conn, alpn)
}

// Request is one complete exchange on a fresh connection: dial, TLS,
// greeting, one echo, close. It returns who answered.
func (n *Netns) Request(ctx context.Context, addr netip.AddrPort, alpn []string) (Answer, error) {
	s, err := n.OpenTLS(ctx, addr, alpn)
	if err != nil {
		return Answer{}, err
	}
	defer s.Close()
	if err := s.Echo("ping"); err != nil {
		return s.Answer, err
	}
	return s.Answer, nil
}

// MustRequest is Request with a 10 s bound that fails the test on error.
func (n *Netns) MustRequest(t testing.TB, addr netip.AddrPort, alpn []string) Answer {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	a, err := n.Request(ctx, addr, alpn)
	if err != nil {
		t.Fatalf("request to %s offering ALPN %q: %v", addr, alpn, err)
	}
	return a
}

// helloShaper is a client-side net.Conn that delivers the first thing
// written through it — crypto/tls's ClientHello record — re-framed into
// several TLS records and/or in small TCP segments, the way real clients
// and networks can (NETFILTER-NOTES fact 7). Later writes pass through.
type helloShaper struct {
	net.Conn
	// Records are the payload sizes of the leading records; what is left
	// goes in one last record. Nil keeps a single record.
	Records []int
	// Segment is the number of bytes per write (TCP_NODELAY is Go's
	// default); 0 writes everything at once.
	Segment int
	Pause   time.Duration // between segments

	shaped bool
}

func (h *helloShaper) Write(b []byte) (int, error) {
	if h.shaped {
		return h.Conn.Write(b)
	}
	h.shaped = true
	out, err := reframeHandshake(b, h.Records)
	if err != nil {
		return 0, err
	}
	step := h.Segment
	if step <= 0 {
		step = len(out)
	}
	for len(out) > 0 {
		n := min(step, len(out))
		if _, err := h.Conn.Write(out[:n]); err != nil {
			return 0, err
		}
		out = out[n:]
		if len(out) > 0 && h.Pause > 0 {
			time.Sleep(h.Pause)
		}
	}
	return len(b), nil
}

const (
	recordHeaderLen     = 5
	recordTypeHandshake = 22
)

// reframeHandshake takes whole TLS handshake records and returns the same
// handshake bytes in records whose payloads have the given leading sizes,
// the remainder in one final record. The record version of the first
// input record is kept.
func reframeHandshake(records []byte, sizes []int) ([]byte, error) {
	var payload []byte
	var version []byte
	for rest := records; len(rest) > 0; {
		if len(rest) < recordHeaderLen {
			return nil, fmt.Errorf("truncated record header (%d bytes)", len(rest))
		}
		if rest[0] != recordTypeHandshake {
			return nil, fmt.Errorf("record type %d, want handshake", rest[0])
		}
		if version == nil {
			version = rest[1:3]
		}
		n := int(binary.BigEndian.Uint16(rest[3:5]))
		if len(rest) < recordHeaderLen+n {
			return nil, fmt.Errorf("truncated record: %d of %d payload bytes", len(rest)-recordHeaderLen, n)
		}
		payload = append(payload, rest[recordHeaderLen:recordHeaderLen+n]...)
		rest = rest[recordHeaderLen+n:]
	}
	if len(payload) == 0 {
		return nil, errors.New("no handshake payload")
	}
	var out []byte
	appendRecord := func(p []byte) {
		out = append(out, recordTypeHandshake, version[0], version[1])
		out = binary.BigEndian.AppendUint16(out, uint16(len(p)))
		out = append(out, p...)
	}
	for _, size := range sizes {
		if size <= 0 || size >= len(payload) {
			return nil, fmt.Errorf("record size %d does not leave a non-empty rest of %d bytes", size, len(payload))
		}
		appendRecord(payload[:size])
		payload = payload[size:]
	}
	appendRecord(payload)
	return out, nil
}

// LoadTarget is one kind of request the load generator makes.
type LoadTarget struct {
	Addr netip.AddrPort
	ALPN []string
}

// Load makes Rate requests per second from a namespace, each on a fresh
// TLS connection with a greeting and one echo, cycling through Targets,
// until Stop. Requests run concurrently, so a slow one does not lower the
// rate. Every request must be answered by the server named Want.
type Load struct {
	ns      *Netns
	targets []LoadTarget
	want    string

	stop     chan struct{}
	finished chan struct{}
	wg       sync.WaitGroup
	started  time.Time
	inflight atomic.Int64

	mu         sync.Mutex
	report     LoadReport
	maxReasons int
}

// LoadReport is what a load run saw.
type LoadReport struct {
	Requests int
	Failures int
	Reasons  []string           // the first failures, with time and target
	ByPeer   map[netip.Addr]int // successful requests by the peer the server saw
	// Proxied and Direct count successful requests by the client's
	// address: through the proxy (the server saw another socket than the
	// client's) or straight to the server.
	Proxied, Direct map[netip.Addr]int
	Slow            int            // successful requests that took over 1 s (a lost SYN costs 1 s)
	MaxLatency      time.Duration  // of successful requests
	Duration        time.Duration  // from start to stop
	ByTarget        map[string]int // successful requests per target
}

// maxLoadInflight bounds concurrent requests; reaching it is a failure
// (requests hang), not a reason to slow down.
const maxLoadInflight = 256

// StartLoad starts the generator; call Stop to end it and get the report.
func StartLoad(t testing.TB, ns *Netns, rate int, want string, targets ...LoadTarget) *Load {
	t.Helper()
	if rate <= 0 || len(targets) == 0 {
		t.Fatal("StartLoad: need a positive rate and a target")
	}
	l := &Load{
		ns: ns, targets: targets, want: want,
		stop: make(chan struct{}), finished: make(chan struct{}),
		started:    time.Now(),
		maxReasons: 20,
		report: LoadReport{ByPeer: map[netip.Addr]int{}, ByTarget: map[string]int{},
			Proxied: map[netip.Addr]int{}, Direct: map[netip.Addr]int{}},
	}
	go l.loop(time.Second / time.Duration(rate))
	t.Cleanup(func() { l.Stop() })
	return l
}

func (l *Load) loop(interval time.Duration) {
	defer close(l.finished)
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for i := 0; ; i++ {
		select {
		case <-l.stop:
			l.wg.Wait()
			return
		case <-tick.C:
		}
		target := l.targets[i%len(l.targets)]
		if l.inflight.Load() >= maxLoadInflight {
			l.record(target, time.Now(), 0, Answer{}, fmt.Errorf("%d requests in flight: connections hang", maxLoadInflight))
			continue
		}
		l.inflight.Add(1)
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			defer l.inflight.Add(-1)
			begin := time.Now()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			a, err := l.ns.Request(ctx, target.Addr, target.ALPN)
			if err == nil && a.Server != l.want {
				err = fmt.Errorf("answered by %q, want %q", a.Server, l.want)
			}
			l.record(target, begin, time.Since(begin), a, err)
		}()
	}
}

func (t LoadTarget) String() string {
	alpn := "none"
	if len(t.ALPN) > 0 {
		alpn = strings.Join(t.ALPN, ",")
	}
	return fmt.Sprintf("%s alpn=%s", t.Addr, alpn)
}

func (l *Load) record(target LoadTarget, begin time.Time, took time.Duration, a Answer, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.report.Requests++
	if err != nil {
		l.report.Failures++
		if len(l.report.Reasons) < l.maxReasons {
			l.report.Reasons = append(l.report.Reasons,
				fmt.Sprintf("+%v %s: %v", begin.Sub(l.started).Round(time.Millisecond), target, err))
		}
		return
	}
	l.report.ByPeer[a.Peer.Addr()]++
	if a.Peer == a.Local {
		l.report.Direct[a.Local.Addr()]++
	} else {
		l.report.Proxied[a.Local.Addr()]++
	}
	l.report.ByTarget[target.String()]++
	if took > time.Second {
		l.report.Slow++
	}
	l.report.MaxLatency = max(l.report.MaxLatency, took)
}

// Stop ends the load, waits for requests in flight and returns the report.
// Calling it again returns the same report.
func (l *Load) Stop() LoadReport {
	select {
	case <-l.stop:
	default:
		close(l.stop)
	}
	<-l.finished
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.report.Duration == 0 {
		l.report.Duration = time.Since(l.started)
	}
	r := l.report
	r.ByPeer = maps.Clone(l.report.ByPeer)
	r.Proxied, r.Direct = maps.Clone(l.report.Proxied), maps.Clone(l.report.Direct)
	r.ByTarget = maps.Clone(l.report.ByTarget)
	r.Reasons = slices.Clone(l.report.Reasons)
	return r
}

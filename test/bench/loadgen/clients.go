package main

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/internal/procstat"
)

// Result is one JSON line of a client mode; report aggregates them. Pointer
// fields are nil when not measured (no -watch PIDs, e.g. the direct peer).
type Result struct {
	Peer    string   `json:"peer"`
	Rep     int      `json:"rep"`
	Mode    string   `json:"mode"` // bulk, cps, idle; skip when a peer could not run
	Dir     string   `json:"dir,omitempty"`
	Streams int      `json:"streams,omitempty"`
	Bytes   int64    `json:"bytes,omitempty"`
	Seconds float64  `json:"seconds,omitempty"`
	Gbps    float64  `json:"gbps,omitempty"`
	CPUSec  *float64 `json:"cpu_s,omitempty"`

	Conns int     `json:"conns,omitempty"`
	CPS   float64 `json:"cps,omitempty"`
	P50ms float64 `json:"p50_ms,omitempty"`
	P99ms float64 `json:"p99_ms,omitempty"`

	Want          int      `json:"want,omitempty"`
	Open          int      `json:"open,omitempty"`
	PSSKiBPerConn *float64 `json:"pss_kib_per_conn,omitempty"`
	FDsPerConn    *float64 `json:"fds_per_conn,omitempty"`

	Errors int    `json:"errors,omitempty"`
	Error  string `json:"error,omitempty"`
}

// clientFlags are shared by the client modes.
type clientFlags struct {
	fs     *flag.FlagSet
	addr   *string
	alpn   *string
	expect *string
	peer   *string
	rep    *int
	watch  *string
}

func newClientFlags(name string) *clientFlags {
	fs := flag.NewFlagSet(name, flag.ExitOnError)
	return &clientFlags{
		fs:     fs,
		addr:   fs.String("addr", "127.0.0.1:24101", "proxy (or backend) address to connect to"),
		alpn:   fs.String("alpn", "h2,http/1.1", "comma-separated ALPN protocols the ClientHello offers"),
		expect: fs.String("expect", "W", "backend tag a ping must get back (W web, A acme)"),
		peer:   fs.String("peer", "", "peer name to put in the result"),
		rep:    fs.Int("rep", 0, "repetition number to put in the result"),
		watch:  fs.String("watch", "", "comma-separated PIDs of the proxy, to charge CPU/memory/fds to"),
	}
}

func (f *clientFlags) hello() ([]byte, error) {
	return clientHello("bench.example", strings.Split(*f.alpn, ","))
}

func (f *clientFlags) result(mode string) Result {
	return Result{Peer: *f.peer, Rep: *f.rep, Mode: mode}
}

func emit(r Result) error {
	return json.NewEncoder(os.Stdout).Encode(r)
}

// errCounter counts failures and keeps the first message for the report.
type errCounter struct {
	mu    sync.Mutex
	n     int
	first string
}

func (e *errCounter) add(err error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.n == 0 {
		e.first = err.Error()
	}
	e.n++
}

func (e *errCounter) fill(r *Result) {
	r.Errors, r.Error = e.n, e.first
}

func dial(addr string) (*net.TCPConn, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// runBulk measures the throughput of N parallel streams. up: the client
// writes for -duration, half-closes, and the backend answers how many bytes
// it got; the clock stops at that answer, so data still buffered in the
// proxy counts only once it arrived. down: the backend writes for -duration
// and closes; the clock stops at EOF.
func runBulk(args []string) error {
	f := newClientFlags("bulk")
	streams := f.fs.Int("streams", 1, "parallel connections")
	dir := f.fs.String("dir", "up", "up (client to backend) or down (backend to client)")
	dur := f.fs.Duration("duration", 3*time.Second, "how long data flows")
	f.fs.Parse(args)
	if *dir != "up" && *dir != "down" {
		return fmt.Errorf("-dir must be up or down")
	}
	if *streams < 1 || *streams > 256 || *dur <= 0 || *dur > maxDownloadDur {
		return fmt.Errorf("-streams must be 1..256 and -duration at most %v", maxDownloadDur)
	}
	pids, err := parsePIDs(*f.watch)
	if err != nil {
		return err
	}
	hello, err := f.hello()
	if err != nil {
		return err
	}
	res := f.result("bulk")
	res.Dir, res.Streams = *dir, *streams
	var errs errCounter

	conns := make([]*net.TCPConn, 0, *streams)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range *streams {
		c, err := dial(*f.addr)
		if err != nil {
			errs.add(err)
			errs.fill(&res)
			return emit(res)
		}
		conns = append(conns, c)
	}

	before, err := readUsage(pids)
	if err != nil {
		return err
	}
	var total atomic.Int64
	var mu sync.Mutex
	var last time.Time
	start := time.Now()
	end := start.Add(*dur)
	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var n int64
			var err error
			if *dir == "up" {
				n, err = upload(c, hello, end)
			} else {
				n, err = download(c, hello, *dur)
			}
			if err != nil {
				errs.add(err)
				return
			}
			total.Add(n)
			now := time.Now()
			mu.Lock()
			if now.After(last) {
				last = now
			}
			mu.Unlock()
		}()
	}
	wg.Wait()
	after, err := readUsage(pids)
	if err != nil {
		return err
	}
	errs.fill(&res)
	if res.Errors == 0 {
		res.Bytes = total.Load()
		res.Seconds = last.Sub(start).Seconds()
		res.Gbps = float64(res.Bytes) * 8 / res.Seconds / 1e9
		if len(pids) > 0 {
			cpu := float64(after.cpuTicks-before.cpuTicks) / procstat.UserHZ
			res.CPUSec = &cpu
		}
	}
	return emit(res)
}

func upload(c *net.TCPConn, hello []byte, end time.Time) (int64, error) {
	c.SetDeadline(end.Add(helloTimeout))
	if _, err := c.Write(append(slices.Clip(hello), cmdUpload)); err != nil {
		return 0, err
	}
	buf := make([]byte, ioBufSize)
	var sent int64
	for time.Now().Before(end) {
		n, err := c.Write(buf)
		sent += int64(n)
		if err != nil {
			return 0, err
		}
	}
	if err := c.CloseWrite(); err != nil {
		return 0, err
	}
	var ack [8]byte
	if _, err := io.ReadFull(c, ack[:]); err != nil {
		return 0, fmt.Errorf("no byte count after half-close (proxy does not relay half-close?): %w", err)
	}
	got := int64(binary.BigEndian.Uint64(ack[:]))
	if got != sent {
		return 0, fmt.Errorf("backend got %d bytes, client sent %d", got, sent)
	}
	return got, nil
}

func download(c *net.TCPConn, hello []byte, dur time.Duration) (int64, error) {
	c.SetDeadline(time.Now().Add(dur + helloTimeout))
	req := append(slices.Clip(hello), cmdDownload, 0, 0, 0, 0)
	binary.BigEndian.PutUint32(req[len(req)-4:], uint32(dur/time.Millisecond))
	if _, err := c.Write(req); err != nil {
		return 0, err
	}
	buf := make([]byte, ioBufSize)
	var got int64
	for {
		n, err := c.Read(buf)
		got += int64(n)
		if err == io.EOF {
			return got, nil
		}
		if err != nil {
			return 0, err
		}
	}
}

// ping does the short exchange of the cps and idle modes: connect, send
// the hello and cmd (cmdPing or cmdHold), and wait for the backend's tag.
func ping(addr string, hello []byte, cmd, expect byte) (*net.TCPConn, error) {
	c, err := dial(addr)
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(helloTimeout))
	var tag [1]byte
	if _, err = c.Write(append(slices.Clip(hello), cmd)); err == nil {
		_, err = io.ReadFull(c, tag[:])
	}
	if err == nil && tag[0] != expect {
		err = fmt.Errorf("routed to backend %q, want %q", tag[0], expect)
	}
	if err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// awaitClose waits (within the deadline already set on c) for the backend's
// close to come through, then closes c: the backend is the active closer.
func awaitClose(c *net.TCPConn) error {
	defer c.Close()
	var b [1]byte
	n, err := c.Read(b[:])
	if err == io.EOF {
		return nil
	}
	if err == nil {
		err = fmt.Errorf("unexpected byte %q instead of close", b[:n])
	}
	return err
}

func expectTag(s string) (byte, error) {
	if s != string(tagWeb) && s != string(tagACME) {
		return 0, errors.New("-expect must be W or A")
	}
	return s[0], nil
}

// maxSamples bounds the latency samples a cps run keeps.
const maxSamples = 1 << 20

// runCPS measures connections per second at a fixed concurrency and the
// latency of one exchange: connect, send the ClientHello, get the backend's
// one-byte answer. The client then closes (FIN), like a browser would.
func runCPS(args []string) error {
	f := newClientFlags("cps")
	conc := f.fs.Int("concurrency", 32, "parallel workers")
	dur := f.fs.Duration("duration", 3*time.Second, "how long to run")
	f.fs.Parse(args)
	if *conc < 1 || *conc > 1024 || *dur <= 0 || *dur > 5*time.Minute {
		return fmt.Errorf("-concurrency must be 1..1024 and -duration at most 5m")
	}
	tag, err := expectTag(*f.expect)
	if err != nil {
		return err
	}
	hello, err := f.hello()
	if err != nil {
		return err
	}
	pids, err := parsePIDs(*f.watch)
	if err != nil {
		return err
	}
	before, err := readUsage(pids)
	if err != nil {
		return err
	}
	var errs errCounter
	var mu sync.Mutex
	var lat []time.Duration
	start := time.Now()
	end := start.Add(*dur)
	var wg sync.WaitGroup
	for range *conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var mine []time.Duration
			for time.Now().Before(end) && len(mine) < maxSamples / *conc {
				t0 := time.Now()
				c, err := ping(*f.addr, hello, cmdPing, tag)
				if err == nil {
					lat := time.Since(t0)
					if err = awaitClose(c); err == nil {
						mine = append(mine, lat)
					}
				}
				if err != nil {
					errs.add(err)
					time.Sleep(time.Millisecond) // no hot loop against a dead proxy
				}
			}
			mu.Lock()
			lat = append(lat, mine...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	after, err := readUsage(pids)
	if err != nil {
		return err
	}
	res := f.result("cps")
	errs.fill(&res)
	res.Conns = len(lat)
	if len(pids) > 0 {
		cpu := float64(after.cpuTicks-before.cpuTicks) / procstat.UserHZ
		res.CPUSec = &cpu
	}
	if len(lat) > 0 {
		slices.Sort(lat)
		res.CPS = float64(len(lat)) / elapsed.Seconds()
		res.P50ms = percentile(lat, 50).Seconds() * 1e3
		res.P99ms = percentile(lat, 99).Seconds() * 1e3
	}
	return emit(res)
}

// percentile returns the nearest-rank percentile of sorted samples.
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(float64(len(sorted))*p/100+0.999999) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

// runIdle opens -n connections through the proxy, each having sent its
// hello and got the backend's answer, and charges the growth of the
// proxy's PSS and descriptor count to them.
func runIdle(args []string) error {
	f := newClientFlags("idle")
	n := f.fs.Int("n", 5000, "idle connections to hold")
	conc := f.fs.Int("concurrency", 64, "parallel dialers")
	settle := f.fs.Duration("settle", time.Second, "wait after the last connection before measuring")
	maxErrors := f.fs.Int("max-errors", 10, "stop opening connections after this many failures (the proxy is at a limit)")
	setupTimeout := f.fs.Duration("setup-timeout", time.Minute, "stop opening connections after this long")
	f.fs.Parse(args)
	if *n < 1 || *n > 15000 || *conc < 1 || *conc > 1024 {
		return fmt.Errorf("-n must be 1..15000 (the fd limit) and -concurrency 1..1024")
	}
	tag, err := expectTag(*f.expect)
	if err != nil {
		return err
	}
	pids, err := parsePIDs(*f.watch)
	if err != nil {
		return err
	}
	hello, err := f.hello()
	if err != nil {
		return err
	}
	before, err := readUsage(pids)
	if err != nil {
		return err
	}
	var errs errCounter
	var mu sync.Mutex
	conns := make([]*net.TCPConn, 0, *n)
	defer func() { release(conns, *conc) }()
	var next atomic.Int64
	var failed atomic.Int64
	var wg sync.WaitGroup
	setupEnd := time.Now().Add(*setupTimeout)
	for range *conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(*n) && failed.Load() < int64(*maxErrors) && time.Now().Before(setupEnd) {
				c, err := ping(*f.addr, hello, cmdHold, tag)
				if err != nil {
					errs.add(err)
					failed.Add(1)
					continue
				}
				mu.Lock()
				conns = append(conns, c)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	time.Sleep(*settle)
	after, err := readUsage(pids)
	if err != nil {
		return err
	}
	res := f.result("idle")
	errs.fill(&res)
	res.Want, res.Open = *n, len(conns)
	if len(pids) > 0 && len(conns) > 0 {
		pss := float64(after.pssKiB-before.pssKiB) / float64(len(conns))
		fds := float64(after.fds-before.fds) / float64(len(conns))
		res.PSSKiBPerConn, res.FDsPerConn = &pss, &fds
	}
	return emit(res)
}

// release ends idle connections the way cps does: it asks each backend to
// close first, so no TIME_WAIT lands on an ephemeral port.
func release(conns []*net.TCPConn, workers int) {
	work := make(chan *net.TCPConn)
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for c := range work {
				c.SetDeadline(time.Now().Add(helloTimeout))
				if _, err := c.Write([]byte{cmdRelease}); err == nil {
					awaitClose(c)
				}
				c.Close()
			}
		}()
	}
	for _, c := range conns {
		work <- c
	}
	close(work)
	wg.Wait()
}

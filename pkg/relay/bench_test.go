package relay

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Run with, for example:
//
//	go test ./pkg/relay -run '^$' -bench Throughput -benchtime 4096x
//	go test ./pkg/relay -run '^$' -bench Idle/engine -benchtime 1x
//
// relay-cpu-s/GB is the relay's CPU time per GB relayed: the client and
// backend run in a child process. "direct" connects them without a relay.

// relayImpl is a proxy under test: serve takes over front, relays every
// connection it accepts to backend, and returns a stop function that
// closes front and waits until the relays of connections whose peers
// have closed are gone.
type relayImpl struct {
	name  string
	serve func(tb testing.TB, front *net.TCPListener, backend netip.AddrPort) (stop func())
}

var relayImpls = []relayImpl{
	{"engine", serveEngine},
	{"io.Copy", serveGoroutines(false)},
	{"go-ReadFrom", serveGoroutines(true)},
}

// serveEngine is this package: one Engine serving front.
func serveEngine(tb testing.TB, front *net.TCPListener, backend netip.AddrPort) func() {
	f := listenerFile(tb, front)
	e, err := NewEngine(Config{
		Route: func(*Conn) (netip.AddrPort, string) { return backend, "back" },
	})
	if err != nil {
		f.Close()
		tb.Fatal(err)
	}
	if err := e.Serve(int(f.Fd())); err != nil {
		e.Close()
		f.Close()
		tb.Fatal(err)
	}
	return func() {
		e.StopAccepting()
		f.Close()
		e.Close()
	}
}

// serveGoroutines is the obvious proxy: a goroutine per connection dials
// the backend, then io.Copy each way with half-close (copyRelay).
func serveGoroutines(readFrom bool) func(testing.TB, *net.TCPListener, netip.AddrPort) func() {
	return func(tb testing.TB, front *net.TCPListener, backend netip.AddrPort) func() {
		var wg sync.WaitGroup
		wg.Go(func() {
			for {
				c, err := front.AcceptTCP()
				if err != nil {
					return
				}
				wg.Go(func() {
					d := net.Dialer{Timeout: 5 * time.Second, KeepAlive: -1}
					b, err := d.Dial("tcp", backend.String())
					if err != nil {
						c.Close()
						return
					}
					copyRelay(c, b.(*net.TCPConn), readFrom)
				})
			}
		})
		return func() {
			front.Close()
			wg.Wait()
		}
	}
}

// copyRelay relays between c and b until both directions are done, then
// closes both. With readFrom it uses (*net.TCPConn).ReadFrom, Go's own
// splice path; otherwise a 32 KiB user-space buffer.
func copyRelay(c, b *net.TCPConn, readFrom bool) {
	pump := func(dst, src *net.TCPConn) {
		if readFrom {
			dst.ReadFrom(src)
		} else {
			io.CopyBuffer(onlyWriter{dst}, onlyReader{src}, make([]byte, 32<<10))
		}
		dst.CloseWrite()
	}
	var wg sync.WaitGroup
	wg.Go(func() { pump(b, c) })
	pump(c, b)
	wg.Wait()
	c.Close()
	b.Close()
}

func BenchmarkThroughput(b *testing.B) {
	impls := append([]relayImpl{{name: "direct"}}, relayImpls...)
	for _, streams := range []int{1, 8} {
		for _, impl := range impls {
			b.Run(fmt.Sprintf("streams=%d/%s", streams, impl.name), func(b *testing.B) {
				benchThroughput(b, impl, streams)
			})
		}
	}
}

// benchThroughput relays streams connections at once, each carrying
// b.N MiB from client to backend. The client and the backend run in a
// child process (see runEndpoint) so that this process's CPU time is the
// relay's alone.
func benchThroughput(b *testing.B, impl relayImpl, streams int) {
	const chunk = 1 << 20
	front := listen(b)
	target := front.Addr().String()
	if impl.serve == nil {
		target = "direct"
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%s %d %d", endpointEnv, target, streams, int64(b.N)*chunk))
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	lines := bufio.NewScanner(out)
	if !lines.Scan() {
		cmd.Wait()
		b.Fatal("endpoint process did not start")
	}
	backAddr, err := netip.ParseAddrPort(lines.Text())
	if err != nil {
		cmd.Wait()
		b.Fatal(err)
	}

	b.SetBytes(int64(streams) * chunk)
	cpu0 := cpuTime(b)
	b.ResetTimer()
	stop := func() {}
	if impl.serve != nil {
		// The child's connections wait in front's backlog until then.
		stop = impl.serve(b, front, backAddr)
	}
	lines.Scan() // the endpoint's report, after it received everything
	if err := cmd.Wait(); err != nil {
		stop()
		b.Fatalf("endpoint process: %v", err)
	}
	b.StopTimer()
	stop()
	cpu := cpuTime(b) - cpu0
	bytes := float64(b.N) * float64(streams) * chunk
	b.ReportMetric(cpu.Seconds()/(bytes/1e9), "relay-cpu-s/GB")
	b.ReportMetric(bytes*8/1e9/b.Elapsed().Seconds(), "Gbit/s")
}

const endpointEnv = "RELAY_BENCH_ENDPOINT"

func TestMain(m *testing.M) {
	if spec := os.Getenv(endpointEnv); spec != "" {
		if err := runEndpoint(spec); err != nil {
			fmt.Fprintln(os.Stderr, "endpoint:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// runEndpoint is the throughput benchmark's far side, run as a child
// process. spec is "FRONT STREAMS BYTES": it listens as the backend,
// prints its address, dials FRONT (or itself, for "direct") STREAMS
// times, sends BYTES on each, and exits once the backend has read every
// byte and every client has seen the relay close.
func runEndpoint(spec string) error {
	var front string
	var streams int
	var perStream int64
	if _, err := fmt.Sscan(spec, &front, &streams, &perStream); err != nil {
		return err
	}
	back, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	fmt.Println(back.Addr())
	if front == "direct" {
		front = back.Addr().String()
	}
	var wg sync.WaitGroup
	var received atomic.Int64
	errs := make(chan error, 2*streams)
	for range streams {
		wg.Go(func() {
			c, err := back.Accept()
			if err != nil {
				errs <- err
				return
			}
			n, _ := io.CopyBuffer(io.Discard, onlyReader{c}, make([]byte, 1<<20))
			received.Add(n)
			c.Close()
		})
		wg.Go(func() {
			c, err := net.Dial("tcp", front)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			// The first byte (0) is not a TLS record type: the engine
			// routes the stream at once.
			buf := make([]byte, 1<<20)
			for left := perStream; left > 0; left -= int64(len(buf)) {
				if _, err := c.Write(buf[:min(left, int64(len(buf)))]); err != nil {
					errs <- err
					return
				}
			}
			c.(*net.TCPConn).CloseWrite()
			io.Copy(io.Discard, c) // until the relay closes
		})
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return err
	}
	if got, want := received.Load(), int64(streams)*perStream; got != want {
		return fmt.Errorf("received %d bytes, want %d", got, want)
	}
	fmt.Println("done")
	return nil
}

func BenchmarkIdle(b *testing.B) {
	for _, impl := range relayImpls {
		b.Run(impl.name, func(b *testing.B) { benchIdle(b, impl, 2000) })
	}
}

// benchIdle holds n proxied connections that moved a byte each way and
// then went idle, and reports what each costs the proxy: heap and stack
// bytes (B/conn), open descriptors (fds/conn) and splice pipes
// (pipes/conn). The test's own two sockets per connection are measured on
// as many direct connections first, and subtracted.
func benchIdle(b *testing.B, impl relayImpl, n int) {
	back, front, direct := listen(b), listen(b), listen(b)
	frontAddr := front.Addr().(*net.TCPAddr)
	stop := impl.serve(b, front, back.Addr().(*net.TCPAddr).AddrPort())
	defer stop()
	for range b.N {
		memD0 := memInUse()
		fdD0, pipeD0 := countFDs(b)
		sets := connectIdle(b, direct.Addr().(*net.TCPAddr), direct, n)
		memD1 := memInUse()
		fdD1, _ := countFDs(b)
		closeIdle(b, sets, fdD0-pipeD0)

		mem0 := memInUse()
		fd0, pipe0 := countFDs(b)
		sets = connectIdle(b, frontAddr, back, n)
		time.Sleep(200 * time.Millisecond) // let every relay park
		mem1 := memInUse()
		fd1, pipe1 := countFDs(b)

		// A proxy that recycles its per-connection state (the engine keeps
		// freed Conns for reuse) pays part of it before mem0 from the
		// second iteration on: compare first iterations (-benchtime 1x).
		b.ReportMetric(float64((mem1-mem0)-(memD1-memD0))/float64(n), "B/conn")
		b.ReportMetric(float64((fd1-fd0)-(fdD1-fdD0))/float64(n), "fds/conn")
		b.ReportMetric(float64(pipe1-pipe0)/2/float64(n), "pipes/conn")
		closeIdle(b, sets, fd0-pipe0)
	}
}

// idleConn is a client and the backend's accepted socket, connected
// through a proxy or directly.
type idleConn struct{ client, backend *net.TCPConn }

// connectIdle makes n connections to addr, each moving one byte each way;
// accept is the listener where they arrive at the backend.
func connectIdle(b *testing.B, addr *net.TCPAddr, accept *net.TCPListener, n int) []idleConn {
	sets := make([]idleConn, n)
	one := make([]byte, 1)
	for i := range sets {
		cs := &sets[i]
		var err error
		if cs.client, err = net.DialTCP("tcp", nil, addr); err != nil {
			b.Fatal(err)
		}
		cs.client.SetDeadline(time.Now().Add(time.Minute))
		if _, err := cs.client.Write(one); err != nil {
			b.Fatal(err)
		}
		accept.SetDeadline(time.Now().Add(10 * time.Second))
		if cs.backend, err = accept.AcceptTCP(); err != nil {
			b.Fatal(err)
		}
		cs.backend.SetDeadline(time.Now().Add(time.Minute))
		if _, err := io.ReadFull(cs.backend, one); err != nil {
			b.Fatal(err)
		}
		cs.backend.Write(one)
		if _, err := io.ReadFull(cs.client, one); err != nil {
			b.Fatal(err)
		}
	}
	return sets
}

// closeIdle closes the connections and waits until the process is back
// to its earlier number of descriptors other than pipes (a proxy may keep
// a pool of those), so the next measurement starts clean.
func closeIdle(b *testing.B, sets []idleConn, nonPipes int) {
	for _, cs := range sets {
		cs.client.Close()
		cs.backend.Close()
	}
	settle(func() bool { n, p := countFDs(b); return n-p <= nonPipes })
}

func memInUse() int64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return int64(m.HeapInuse + m.StackInuse)
}

package relay

import (
	"bufio"
	"context"
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
//	go test ./pkg/relay -run '^$' -bench Idle/splice-relay -benchtime 1x
//
// Run each Idle case in its own process: the runtime reuses the
// descriptors of dead goroutines, so a case run after another would not
// pay for its goroutines' heap.
//
// relay-cpu-s/GB is the relay's CPU time per GB relayed: the client and
// backend run in a child process. "direct" connects them without a relay.

// relayImpl relays between client and backend until both ends are done,
// then closes both.
type relayImpl struct {
	name string
	run  func(client, backend *net.TCPConn)
}

var relayImpls = []relayImpl{
	{"splice-relay", func(c, b *net.TCPConn) { Relay(context.Background(), c, b, nil) }},
	{"io.Copy", func(c, b *net.TCPConn) { copyRelay(c, b, false) }},
	{"go-ReadFrom", func(c, b *net.TCPConn) { copyRelay(c, b, true) }},
}

// copyRelay is the obvious relay: io.Copy each way with half-close.
// With readFrom it uses (*net.TCPConn).ReadFrom, Go's own splice path;
// otherwise a 32 KiB user-space buffer.
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

// conns is one proxied connection's four sockets: the client, the two
// the proxy holds, and the backend's.
type conns struct {
	client, proxyClient, proxyBackend, backend *net.TCPConn
}

func dialPair(b *testing.B, front, back *net.TCPListener) conns {
	var cs conns
	var err error
	if cs.client, err = net.DialTCP("tcp", nil, front.Addr().(*net.TCPAddr)); err != nil {
		b.Fatal(err)
	}
	if cs.proxyClient, err = front.AcceptTCP(); err != nil {
		b.Fatal(err)
	}
	if cs.proxyBackend, err = net.DialTCP("tcp", nil, back.Addr().(*net.TCPAddr)); err != nil {
		b.Fatal(err)
	}
	if cs.backend, err = back.AcceptTCP(); err != nil {
		b.Fatal(err)
	}
	return cs
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
	if impl.run == nil {
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
		b.Fatal(err)
	}

	b.SetBytes(int64(streams) * chunk)
	cpu0 := cpuTime(b)
	b.ResetTimer()
	var relays sync.WaitGroup
	for i := 0; impl.run != nil && i < streams; i++ {
		c, err := front.AcceptTCP()
		if err != nil {
			b.Fatal(err)
		}
		bk, err := Dial(context.Background(), backAddr, time.Second)
		if err != nil {
			b.Fatal(err)
		}
		relays.Go(func() { impl.run(c, bk) })
	}
	lines.Scan() // the endpoint's report, after it received everything
	if err := cmd.Wait(); err != nil {
		b.Fatalf("endpoint process: %v", err)
	}
	b.StopTimer()
	relays.Wait()
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
// byte.
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

// benchIdle holds n proxied connections that moved a few bytes each way
// and then went idle, and reports what each costs the proxy: heap and
// stack bytes added by the relay (B/conn), the user-space cost of its two
// sockets (sock-B/conn), and open descriptors (fds/conn, pipes/conn).
func benchIdle(b *testing.B, impl relayImpl, n int) {
	front, back := listen(b), listen(b)
	for range b.N {
		mem0 := memInUse()
		fd0, pipe0 := countFDs(b)
		sets := make([]conns, n)
		for i := range sets {
			sets[i] = dialPair(b, front, back)
		}
		mem1 := memInUse()
		fd1, _ := countFDs(b)

		var relays sync.WaitGroup
		for _, cs := range sets {
			relays.Go(func() { impl.run(cs.proxyClient, cs.proxyBackend) })
		}
		one := make([]byte, 1)
		for _, cs := range sets {
			cs.client.Write(one)
			io.ReadFull(cs.backend, one)
			cs.backend.Write(one)
			io.ReadFull(cs.client, one)
		}
		time.Sleep(200 * time.Millisecond) // let every relay park
		mem2 := memInUse()
		fd2, pipe2 := countFDs(b)

		b.ReportMetric(float64(mem2-mem1)/float64(n), "B/conn")
		// Four sockets per set, two of them the proxy's.
		b.ReportMetric(float64(mem1-mem0)/float64(n)/2, "sock-B/conn")
		b.ReportMetric(float64(fd2-fd1)/float64(n)+float64(fd1-fd0)/float64(n)/2, "fds/conn")
		b.ReportMetric(float64(pipe2-pipe0)/float64(n), "pipes/conn")

		for _, cs := range sets {
			cs.client.Close()
			cs.backend.Close()
		}
		relays.Wait()
	}
}

func memInUse() int64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return int64(m.HeapInuse + m.StackInuse)
}

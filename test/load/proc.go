package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/internal/procstat"
)

// procSample is what the kernel shows about a process from outside.
type procSample struct {
	rssKiB, pssKiB int64
	fds, threads   int
	sockets, pipes int   // fds by kind: the relay keeps up to 32 idle pipes pooled
	cpuTicks       int64 // utime+stime
}

func sampleProc(pid int) (procSample, error) {
	var s procSample
	base := fmt.Sprintf("/proc/%d/", pid)
	stat, err := os.ReadFile(base + "stat")
	if err != nil {
		return s, err
	}
	if s.cpuTicks, err = procstat.CPUTicks(stat); err != nil {
		return s, err
	}
	status, err := os.ReadFile(base + "status")
	if err != nil {
		return s, err
	}
	if s.rssKiB, err = procstat.Field(status, "VmRSS:"); err != nil {
		return s, err
	}
	threads, err := procstat.Field(status, "Threads:")
	if err != nil {
		return s, err
	}
	s.threads = int(threads)
	rollup, err := os.ReadFile(base + "smaps_rollup")
	if err != nil {
		return s, err
	}
	if s.pssKiB, err = procstat.Field(rollup, "Pss:"); err != nil {
		return s, err
	}
	fds, err := os.ReadDir(base + "fd")
	if err != nil {
		return s, err
	}
	s.fds = len(fds)
	for _, fd := range fds {
		switch target, _ := os.Readlink(base + "fd/" + fd.Name()); {
		case strings.HasPrefix(target, "socket:"):
			s.sockets++
		case strings.HasPrefix(target, "pipe:"):
			s.pipes++
		}
	}
	return s, nil
}

// cpuPercent measures a process's CPU use over d (100% = one core).
func cpuPercent(pid int, d time.Duration) (float64, error) {
	a, err := sampleProc(pid)
	if err != nil {
		return 0, err
	}
	start := time.Now()
	time.Sleep(d)
	b, err := sampleProc(pid)
	if err != nil {
		return 0, err
	}
	secs := float64(b.cpuTicks-a.cpuTicks) / procstat.UserHZ
	return 100 * secs / time.Since(start).Seconds(), nil
}

// goroutineDump is what a Go program prints on SIGQUIT: every goroutine's
// stack. It is the only outside view of a Go process's goroutines.
type goroutineDump struct {
	total int
	// runtime counts the runtime's own goroutines (garbage collector,
	// finalizers, ...): their number depends on when the collector first
	// ran, not on the program.
	runtime int
	// byFrame counts goroutines whose stack mentions each of the watched
	// functions (a goroutine may count under several).
	byFrame map[string]int
}

// parseGoroutineDump counts the "goroutine N [state]:" blocks of a dump
// and, per watched substring, how many blocks contain it.
func parseGoroutineDump(dump string, watch ...string) goroutineDump {
	g := goroutineDump{byFrame: map[string]int{}}
	var block strings.Builder
	flush := func() {
		if block.Len() == 0 {
			return
		}
		for _, w := range watch {
			if strings.Contains(block.String(), w) {
				g.byFrame[w]++
			}
		}
		block.Reset()
	}
	for line := range strings.Lines(dump) {
		if strings.HasPrefix(line, "goroutine ") && strings.Contains(line, " [") {
			flush()
			g.total++
			if isRuntimeGoroutine(line) {
				g.runtime++
			}
			block.WriteString(line)
			continue
		}
		if g.total > 0 {
			block.WriteString(line)
		}
	}
	flush()
	return g
}

// runtimeStates are the wait reasons of the runtime's own goroutines in a
// dump header such as "goroutine 18 gp=0x.. m=nil [GC worker (idle)]:".
var runtimeStates = []string{"[GC worker", "[GC sweep wait", "[GC scavenge wait", "[force gc", "[finalizer wait", "[cleanup wait", "[GOMAXPROCS updater"}

// isRuntimeGoroutine tells a runtime goroutine's dump header, including
// goroutine 0 (a thread's scheduler stack, shown in crash dumps).
func isRuntimeGoroutine(header string) bool {
	if strings.HasPrefix(header, "goroutine 0 ") {
		return true
	}
	for _, st := range runtimeStates {
		if strings.Contains(header, st) {
			return true
		}
	}
	return false
}

// own is the number of the program's goroutines.
func (g goroutineDump) own() int { return g.total - g.runtime }

// fdKinds renders a sample's descriptors for a table cell.
func (s procSample) fdKinds() string {
	return fmt.Sprintf("%d (%d sockets, %d pipe fds)", s.fds, s.sockets, s.pipes)
}

// maxPooledPipeFds is what the relay's pipe pool may keep open while idle
// (pkg/relay maxFreePipes = 32 pipes of 2 fds).
const maxPooledPipeFds = 64

// noLeakSince tells whether s holds no more sockets than base and no more
// pipes than the relay's pool may keep.
func (s procSample) noLeakSince(base procSample) bool {
	return s.sockets <= base.sockets && s.pipes <= base.pipes+maxPooledPipeFds
}

// tcpExt reads counters of the TcpExt lines of /proc/net/netstat (of the
// caller's network namespace).
func tcpExt(names ...string) (map[string]int64, error) {
	b, err := os.ReadFile("/proc/net/netstat")
	if err != nil {
		return nil, err
	}
	var keys []string
	vals := map[string]int64{}
	for line := range strings.Lines(string(b)) {
		f := strings.Fields(line)
		if len(f) == 0 || f[0] != "TcpExt:" {
			continue
		}
		if keys == nil {
			keys = f[1:]
			continue
		}
		for i, v := range f[1:] {
			if i < len(keys) {
				n, _ := strconv.ParseInt(v, 10, 64)
				vals[keys[i]] = n
			}
		}
	}
	out := map[string]int64{}
	for _, n := range names {
		out[n] = vals[n]
	}
	return out, nil
}

package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// s1Hold holds many proxied connections open at once and charges the
// proxy's memory, descriptors and goroutines to them.
func (r *runner) s1Hold() error {
	const sc = "1 idle conns"
	n := r.n(8000)
	p, addr, err := r.loopbackProxy("s1-proxy", 10, 0)
	if err != nil {
		return err
	}
	base, err := r.warmBaseline(p, addr, 500*time.Millisecond)
	if err != nil {
		return err
	}
	sessions := make([]*session, n)
	var mu sync.Mutex
	opened := tally{}
	start := time.Now()
	var failed atomic.Int64
	parallel(n, 100, func(i int) {
		if failed.Load() > int64(n/20) {
			mu.Lock()
			opened["skipped after too many failures"]++
			mu.Unlock()
			return
		}
		s, err := openSession(r.dialer, addr, webHello, cmdEcho, 15*time.Second)
		if err == nil {
			if err = s.ping(8, 15*time.Second); err != nil {
				s.c.Close()
				s = nil
			}
		}
		if err != nil {
			failed.Add(1)
		}
		sessions[i] = s
		mu.Lock()
		opened.add(err)
		mu.Unlock()
	})
	openTook := time.Since(start)
	defer func() {
		for _, s := range sessions {
			if s != nil {
				s.c.Close()
			}
		}
	}()
	out.row(sc, fmt.Sprintf("%d connections opened (hello, backend header, 8-byte echo)", n),
		fmt.Sprintf("%s in %s", opened, ms(openTook)), check(opened["ok"] == n))
	time.Sleep(time.Second)
	held, err := sampleProc(p.pid)
	if err != nil {
		return err
	}
	again := tally{}
	parallel(n, 200, func(i int) {
		if s := sessions[i]; s != nil {
			err := s.ping(8, 15*time.Second)
			mu.Lock()
			again.add(err)
			mu.Unlock()
		}
	})
	out.row(sc, "second echo on every held connection", again.String(), check(again["ok"] == n))
	k := float64(opened["ok"])
	out.row(sc, "proxy fds idle → held (per conn)", fmt.Sprintf("%d → %d (%.2f)", base.fds, held.fds, float64(held.fds-base.fds)/k), check(held.fds-base.fds <= 2*opened["ok"]+16))
	out.row(sc, "proxy RSS idle → held (per conn)", fmt.Sprintf("%s → %s (%.1f KiB)", kib(base.rssKiB), kib(held.rssKiB), float64(held.rssKiB-base.rssKiB)/k), verdictInfo)
	out.row(sc, "proxy PSS idle → held (per conn)", fmt.Sprintf("%s → %s (%.1f KiB)", kib(base.pssKiB), kib(held.pssKiB), float64(held.pssKiB-base.pssKiB)/k), verdictInfo)
	out.row(sc, "proxy OS threads idle → held", fmt.Sprintf("%d → %d", base.threads, held.threads), verdictInfo)
	g, err := p.goroutines(frameRelay)
	if err != nil {
		out.row(sc, "goroutines (SIGQUIT dump) while held", err.Error(), verdictBroken)
		return nil
	}
	out.row(sc, "goroutines while held (SIGQUIT dump): total / relay event loops",
		fmt.Sprintf("%d / %d (%.3f per conn)", g.total, g.byFrame[frameRelay], float64(g.total)/k), verdictInfo)
	return nil
}

// s2FdLimit runs the proxy under a low descriptor limit and offers it more
// connections than it can hold.
func (r *runner) s2FdLimit() error {
	const sc = "2 fd limit"
	const nofile = 300
	n := r.n(400)
	p, addr, err := r.loopbackProxy("s2-proxy", 11, nofile)
	if err != nil {
		return err
	}
	base, err := r.warmBaseline(p, addr, 300*time.Millisecond)
	if err != nil {
		return err
	}
	// Each client keeps its connection whatever happens: connected through,
	// or waiting in the accept queue. Only a close by the proxy ends it.
	conns := make([]net.Conn, n)
	var mu sync.Mutex
	outcome := tally{}
	parallel(n, 50, func(i int) {
		c, err := r.dialer.Dial("tcp", addr)
		if err != nil {
			mu.Lock()
			outcome["dial: "+errKind(err)]++
			mu.Unlock()
			return
		}
		conns[i] = c
		c.Write(append(append([]byte{}, webHello...), cmdEcho))
		c.SetReadDeadline(time.Now().Add(4 * time.Second))
		_, err = readLine(c, 128)
		c.SetReadDeadline(time.Time{})
		kind := "through"
		switch {
		case err == nil:
		case errKind(err) == "timeout":
			kind = "waiting (no answer in 4s)"
		default:
			kind = "closed by proxy (" + errKind(err) + ")"
		}
		mu.Lock()
		outcome[kind]++
		mu.Unlock()
	})
	exhausted, err := sampleProc(p.pid)
	if err != nil {
		return err
	}
	out.row(sc, fmt.Sprintf("%d clients held open against ulimit -n %d", n, nofile), outcome.String(), check(outcome["through"] > 0))
	out.row(sc, "proxy fds idle → exhausted", fmt.Sprintf("%s → %s", base.fdKinds(), exhausted.fdKinds()), verdictInfo)
	idleCPU, err := cpuPercent(p.pid, 2*time.Second)
	if err != nil {
		return err
	}
	// The accept loop must not spin while descriptors are out, neither
	// with an idle queue nor while new clients keep arriving (50/s here).
	offered := tally{}
	stopOffer := make(chan struct{})
	offerDone := make(chan struct{})
	go func() {
		defer close(offerDone)
		var wg sync.WaitGroup
		for {
			select {
			case <-stopOffer:
				wg.Wait()
				return
			case <-time.After(20 * time.Millisecond):
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				s, err := openSession(r.dialer, addr, webHello, cmdEcho, 2*time.Second)
				if err == nil {
					s.c.Close()
				}
				mu.Lock()
				offered.add(err)
				mu.Unlock()
			}()
		}
	}()
	busyCPU, err := cpuPercent(p.pid, 3*time.Second)
	close(stopOffer)
	<-offerDone
	if err != nil {
		return err
	}
	out.row(sc, "proxy CPU while exhausted: no new clients (2 s) / 50 new clients per s (3 s); 100% = 1 core", fmt.Sprintf("%.1f%% / %.1f%%", idleCPU, busyCPU), check(idleCPU < 20 && busyCPU < 50))
	out.row(sc, "those new clients while exhausted", offered.String(), verdictInfo)

	released := time.Now()
	for _, c := range conns {
		if c != nil {
			c.Close()
		}
	}
	var firstOK time.Duration
	for time.Since(released) < 15*time.Second {
		if _, err := exchange(r.dialer, addr, time.Second); err == nil {
			firstOK = time.Since(released)
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if firstOK == 0 {
		out.row(sc, "recovery after the extra clients left", "no exchange succeeded within 15 s", verdictBroken)
	} else {
		out.row(sc, "first successful exchange after the extra clients left", ms(firstOK), verdictOK)
	}
	after := tally{}
	recoveryN := r.n(100)
	parallel(recoveryN, 10, func(int) {
		_, err := exchange(r.dialer, addr, 5*time.Second)
		mu.Lock()
		after.add(err)
		mu.Unlock()
	})
	out.row(sc, fmt.Sprintf("%d exchanges after recovery", recoveryN), after.String(), check(after["ok"] == recoveryN))
	time.Sleep(time.Second)
	settled, err := sampleProc(p.pid)
	if err != nil {
		return err
	}
	out.row(sc, "proxy fds after recovery vs idle", fmt.Sprintf("%s vs %s", settled.fdKinds(), base.fdKinds()), check(settled.noLeakSince(base)))
	out.row(sc, "log lines: accept backoff / accepting again / dial failed",
		fmt.Sprintf("%d / %d / %d", len(p.logLines("accept failed")), len(p.logLines("accepting again")), len(p.logLines("msg=conn", "level=WARN"))), verdictInfo)
	p.terminate(10 * time.Second)
	return nil
}

// s3Slowloris opens many connections that send 3 bytes and go silent,
// while normal clients keep coming.
func (r *runner) s3Slowloris() error {
	const sc = "3 slowloris"
	const helloTimeout = 2 * time.Second
	slowN := r.n(5000)
	rate := max(1, int(200*r.scale))
	p, addr, err := r.loopbackProxy("s3-proxy", 12, 0)
	if err != nil {
		return err
	}
	base, err := r.warmBaseline(p, addr, 300*time.Millisecond)
	if err != nil {
		return err
	}
	lat0, t0 := steady(r.dialer, addr, rate, 5*time.Second)
	out.row(sc, fmt.Sprintf("normal clients, %d/s for 5 s, no attack: latency", rate), dist(lat0), verdictInfo)
	out.row(sc, "normal clients, no attack: outcomes", t0.String(), check(len(t0) == 1 && t0["ok"] > 0))

	// The attack: slowN clients, each reconnecting as soon as the proxy
	// closes it, until stop.
	stop := make(chan struct{})
	var (
		open, peakOpen atomic.Int64
		closeLat       latencies
		mu             sync.Mutex
		ends           = tally{}
		dialSem        = make(chan struct{}, 200)
		wg             sync.WaitGroup
	)
	record := func(k string) { mu.Lock(); ends[k]++; mu.Unlock() }
	slowClient := func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			dialSem <- struct{}{}
			// Timed from before the dial: the proxy's hello timer starts at
			// accept, which is later, so a close before -hello-timeout
			// by this clock is a real early close.
			sent := time.Now()
			c, err := r.dialer.Dial("tcp", addr)
			<-dialSem
			if err != nil {
				record("dial " + errKind(err))
				time.Sleep(100 * time.Millisecond)
				continue
			}
			c.Write([]byte{recordHandshake, 3, 1})
			if o := open.Add(1); o > peakOpen.Load() {
				peakOpen.Store(o)
			}
			cancelWake := afterClose(stop, func() { c.SetReadDeadline(time.Unix(1, 0)) })
			c.SetReadDeadline(sent.Add(10 * helloTimeout))
			_, err = c.Read(make([]byte, 16))
			took := time.Since(sent)
			cancelWake()
			open.Add(-1)
			c.Close()
			select {
			case <-stop:
				return
			default:
			}
			if err == nil {
				record("got data (unexpected)")
				continue
			}
			record(errKind(err))
			if k := errKind(err); k == "closed" || k == "reset" {
				closeLat.add(took)
			}
		}
	}
	var peak procSample
	samplerDone := make(chan struct{})
	go func() {
		defer close(samplerDone)
		for {
			select {
			case <-stop:
				return
			case <-time.After(250 * time.Millisecond):
			}
			if s, err := sampleProc(p.pid); err == nil {
				peak.rssKiB = max(peak.rssKiB, s.rssKiB)
				peak.pssKiB = max(peak.pssKiB, s.pssKiB)
				peak.fds = max(peak.fds, s.fds)
			}
		}
	}()
	counters := []string{"ListenOverflows", "ListenDrops", "TCPReqQFullDrop", "SyncookiesSent"}
	before, _ := tcpExt(counters...)
	attackStart := time.Now()
	for range slowN {
		wg.Add(1)
		go slowClient()
	}
	for time.Since(attackStart) < 5*time.Second && open.Load() < int64(slowN)*9/10 {
		time.Sleep(50 * time.Millisecond)
	}
	ramp := time.Since(attackStart)
	lat1, t1 := steady(r.dialer, addr, rate, 6*time.Second)
	close(stop)
	wg.Wait()
	<-samplerDone
	attackDur := time.Since(attackStart)
	afterAttack, _ := tcpExt(counters...)
	var drops []string
	for _, c := range counters {
		drops = append(drops, fmt.Sprintf("%s %d", c, afterAttack[c]-before[c]))
	}

	out.row(sc, fmt.Sprintf("slow clients: peak open / target (ramp %s, attack %s)", ms(ramp), ms(attackDur)), fmt.Sprintf("%d / %d", peakOpen.Load(), slowN), verdictInfo)
	out.row(sc, fmt.Sprintf("normal clients, %d/s for 6 s, under attack: latency", rate), dist(lat1), verdictInfo)
	out.row(sc, "normal clients under attack: outcomes", t1.String(), check(len(t1) == 1 && t1["ok"] > 0))
	out.row(sc, "kernel TcpExt counters during the attack (listen queue)", strings.Join(drops, ", "), verdictInfo)
	cl := closeLat.snapshot()
	var minClose time.Duration
	if len(cl) > 0 {
		minClose = slices.Min(cl)
	}
	out.row(sc, fmt.Sprintf("slow clients: time from dial until the proxy closed them (-hello-timeout %s)", helloTimeout), fmt.Sprintf("min %s, %s", ms(minClose), dist(cl)), check(len(cl) > 0 && minClose >= helloTimeout))
	out.row(sc, "slow clients: how each ended (before the attack stopped)", ends.String(), check(ends["timeout"] == 0 && ends["got data (unexpected)"] == 0))
	time.Sleep(3 * time.Second)
	after, err := sampleProc(p.pid)
	if err != nil {
		return err
	}
	out.row(sc, "proxy RSS idle → peak → 3 s after", fmt.Sprintf("%s → %s → %s", kib(base.rssKiB), kib(peak.rssKiB), kib(after.rssKiB)), verdictInfo)
	out.row(sc, "proxy PSS idle → peak → 3 s after", fmt.Sprintf("%s → %s → %s", kib(base.pssKiB), kib(peak.pssKiB), kib(after.pssKiB)), verdictInfo)
	out.row(sc, "proxy fds idle → peak → 3 s after", fmt.Sprintf("%d → %d → %s", base.fds, peak.fds, after.fdKinds()), check(after.noLeakSince(base)))
	p.terminate(10 * time.Second)
	return nil
}

// afterClose runs fn once ch is closed, unless the returned cancel runs
// first.
func afterClose(ch <-chan struct{}, fn func()) (cancel func()) {
	done := make(chan struct{})
	go func() {
		select {
		case <-ch:
			fn()
		case <-done:
		}
	}()
	return func() { close(done) }
}

// fault is one kind of misbehaving peer, tried on many connections.
type fault struct {
	name string
	// try runs one connection; it returns "" when the proxy behaved as
	// expected, otherwise what it did instead.
	try func(d *net.Dialer, addr string) string
}

var faults = []fault{
	{"backend refuses (ACME responder down)", func(d *net.Dialer, addr string) string {
		_, err := openSession(d, addr, acmeHello, cmdEcho, 5*time.Second)
		if k := errKind(err); k != "closed" && k != "reset" {
			return "client got " + k
		}
		return ""
	}},
	{"backend resets mid-stream", func(d *net.Dialer, addr string) string {
		s, err := openSession(d, addr, webHello, cmdResetMid, 5*time.Second)
		if err != nil {
			return "open: " + errKind(err)
		}
		defer s.c.Close()
		s.c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = io.Copy(io.Discard, s.c)
		if k := errKind(err); k == "timeout" {
			return "client not closed"
		}
		return ""
	}},
	{"backend stalls mid-stream, client resets", func(d *net.Dialer, addr string) string {
		s, err := openSession(d, addr, webHello, cmdStall, 5*time.Second)
		if err != nil {
			return "open: " + errKind(err)
		}
		s.c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = io.ReadFull(s.c, make([]byte, stallBytes))
		s.reset()
		if err != nil {
			return "reading: " + errKind(err)
		}
		return ""
	}},
	{"backend streams, client resets mid-stream", func(d *net.Dialer, addr string) string {
		s, err := openSession(d, addr, webHello, cmdBlast, 5*time.Second)
		if err != nil {
			return "open: " + errKind(err)
		}
		s.c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = io.ReadFull(s.c, make([]byte, 256<<10))
		s.reset()
		if err != nil {
			return "reading: " + errKind(err)
		}
		return ""
	}},
	{"client resets mid-hello", func(d *net.Dialer, addr string) string {
		c, err := d.Dial("tcp", addr)
		if err != nil {
			return "dial: " + errKind(err)
		}
		c.Write(webHello[:200])
		time.Sleep(5 * time.Millisecond)
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
		return ""
	}},
	{"client closes before hello", func(d *net.Dialer, addr string) string {
		c, err := d.Dial("tcp", addr)
		if err != nil {
			return "dial: " + errKind(err)
		}
		c.Close()
		return ""
	}},
	{"backend stalls mid-stream, client closes (FIN)", func(d *net.Dialer, addr string) string {
		s, err := openSession(d, addr, webHello, cmdStall, 5*time.Second)
		if err != nil {
			return "open: " + errKind(err)
		}
		s.c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = io.ReadFull(s.c, make([]byte, stallBytes))
		s.c.Close()
		if err != nil {
			return "reading: " + errKind(err)
		}
		return ""
	}},
}

// s4Faults runs each fault on many connections and looks for descriptors,
// threads or goroutines the proxy keeps afterwards.
func (r *runner) s4Faults() error {
	const sc = "4 faults"
	n := r.n(200)
	if err := r.loopbackBackend(); err != nil {
		return err
	}
	addr := r.addr(13)
	// The ACME responder is a port nobody listens on: "backend refuses".
	p, err := r.startProxy(proxyOpts{name: "s4-proxy", flags: []string{"-no-redirect", "-listen", addr,
		"-alpn", r.addr(offRefused), "-fallback", r.addr(offWeb), "-hello-timeout", "2s"}})
	if err != nil {
		return err
	}
	base, err := r.warmBaseline(p, addr, 300*time.Millisecond)
	if err != nil {
		return err
	}
	out.row(sc, "proxy idle: fds / threads", fmt.Sprintf("%s / %d", base.fdKinds(), base.threads), verdictInfo)
	lastStall := time.Time{}
	for _, f := range faults {
		var mu sync.Mutex
		wrong := tally{}
		parallel(n, 50, func(int) {
			if what := f.try(r.dialer, addr); what != "" {
				mu.Lock()
				wrong[what]++
				mu.Unlock()
			}
		})
		if strings.Contains(f.name, "stalls") {
			lastStall = time.Now()
		}
		time.Sleep(700 * time.Millisecond)
		s, err := sampleProc(p.pid)
		if err != nil {
			return fmt.Errorf("after %q: %w (proxy died? %s)", f.name, err, tail(p.stderr()))
		}
		res := "as expected"
		if len(wrong) > 0 {
			res = "unexpected: " + wrong.String()
		}
		verdict := check(len(wrong) == 0 && s.noLeakSince(base))
		if strings.Contains(f.name, "client closes (FIN)") {
			// Half-close is relayed: the proxy keeps both sockets until the
			// stalled backend closes its side. Judged after the stall below.
			verdict = check(len(wrong) == 0)
		}
		out.row(sc, fmt.Sprintf("%s ×%d: client saw; proxy fds / threads 0.7 s later", f.name, n),
			fmt.Sprintf("%s; %s / %d", res, s.fdKinds(), s.threads), verdict)
	}
	time.Sleep(time.Until(lastStall.Add(stallFor + time.Second)))
	final, err := sampleProc(p.pid)
	if err != nil {
		return err
	}
	out.row(sc, "after all faults and the backend's stall: fds / threads (idle was)", fmt.Sprintf("%s / %d (%s / %d)", final.fdKinds(), final.threads, base.fdKinds(), base.threads), check(final.noLeakSince(base)))
	if _, err := exchange(r.dialer, addr, 5*time.Second); err != nil {
		out.row(sc, "normal exchange after the faults", errKind(err), verdictBroken)
	}
	time.Sleep(200 * time.Millisecond)
	g, err := p.goroutines(frameRelay)
	if err != nil {
		out.row(sc, "goroutines after the faults (SIGQUIT dump)", err.Error(), verdictBroken)
		return nil
	}
	// The engine runs one event loop per CPU whatever the load, and the
	// rest are the runtime's and main's; a per-connection leak after
	// these faults would be hundreds. (A dump ends the process, so there
	// is no "before".)
	out.row(sc, "goroutines after the faults (SIGQUIT dump): total / relay event loops",
		fmt.Sprintf("%d / %d", g.total, g.byFrame[frameRelay]),
		check(g.byFrame[frameRelay] <= runtime.NumCPU() && g.total < 30))
	return nil
}

// s5Stop stops the proxy with many connections in flight, once with a
// drain long enough for all of them and once with a short one.
func (r *runner) s5Stop() error {
	n := r.n(1000)
	for _, v := range []struct {
		drain, keepOn time.Duration
	}{{30 * time.Second, 3 * time.Second}, {2 * time.Second, 6 * time.Second}} {
		if err := r.stopWithInFlight(n, v.drain, v.keepOn); err != nil {
			return err
		}
	}
	return nil
}

func (r *runner) stopWithInFlight(n int, drain, keepOn time.Duration) error {
	sc := fmt.Sprintf("5 stop, -drain-timeout %s", drain)
	name := fmt.Sprintf("s5-proxy-%s", drain)
	p, addr, err := r.loopbackProxy(name, 14, 0, "-drain-timeout", drain.String())
	if err != nil {
		return err
	}
	sessions := make([]*session, n)
	var mu sync.Mutex
	opened := tally{}
	parallel(n, 100, func(i int) {
		s, err := openSession(r.dialer, addr, webHello, cmdEcho, 10*time.Second)
		sessions[i] = s
		mu.Lock()
		opened.add(err)
		mu.Unlock()
	})
	defer func() {
		for _, s := range sessions {
			if s != nil {
				s.c.Close()
			}
		}
	}()
	out.row(sc, fmt.Sprintf("%d connections open before stop", n), opened.String(), check(opened["ok"] == n))

	// Every client exchanges 16 bytes every 250 ms until keepOn after the
	// stop, then closes; a failure after the stop is recorded with its time.
	var (
		wg       sync.WaitGroup
		fails    = tally{}
		cutAt    latencies
		cleanly  atomic.Int64
		stopNano atomic.Int64 // when stop was run; 0 before
	)
	for _, s := range sessions {
		if s == nil {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				if at := stopNano.Load(); at != 0 && time.Since(time.Unix(0, at)) > keepOn {
					cleanly.Add(1)
					s.c.Close()
					return
				}
				if err := s.ping(16, 5*time.Second); err != nil {
					mu.Lock()
					fails.add(err)
					mu.Unlock()
					if at := stopNano.Load(); at != 0 {
						cutAt.add(time.Since(time.Unix(0, at)))
					}
					s.c.Close()
					return
				}
				time.Sleep(250 * time.Millisecond)
			}
		}()
	}
	time.Sleep(time.Second)
	stopNano.Store(time.Now().UnixNano())
	type stopResult struct {
		took time.Duration
		out  string
		err  error
	}
	stopped := make(chan stopResult, 1)
	go func() {
		took, o, err := p.stop(drain + 60*time.Second)
		stopped <- stopResult{took, o, err}
	}()
	time.Sleep(500 * time.Millisecond)
	_, newErr := exchange(r.dialer, addr, 2*time.Second)
	wg.Wait()
	res := <-stopped
	procExit := p.waitExit(5 * time.Second)

	if drain > keepOn {
		out.row(sc, fmt.Sprintf("clients keep exchanging %s after stop: finished cleanly / failed", keepOn),
			fmt.Sprintf("%d / %d (%s)", cleanly.Load(), n-int(cleanly.Load()), fails), check(int(cleanly.Load()) == opened["ok"]))
	} else {
		cut := cutAt.snapshot()
		out.row(sc, fmt.Sprintf("clients that want %s more: cut at the deadline / finished", keepOn),
			fmt.Sprintf("%d / %d (%s)", len(cut), cleanly.Load(), fails), check(len(cut) == opened["ok"]))
		out.row(sc, "time from stop until a client was cut", dist(cut), check(len(cut) > 0 && slices.Min(cut) >= drain-300*time.Millisecond))
	}
	out.row(sc, "new connection 0.5 s after stop", errKind(newErr), check(newErr != nil))
	stopVerdict := check(res.err == nil && procExit == nil)
	out.row(sc, "`stop` took (exit status, proxy exited)", fmt.Sprintf("%s (%v, %v)", ms(res.took), errOrOK(res.err), procExit == nil), stopVerdict)
	if d := p.logLines("msg=drained"); len(d) > 0 {
		out.row(sc, "proxy log", trimLogLine(d[0]), verdictInfo)
	}
	if res.err != nil {
		out.row(sc, "`stop` output", res.out, verdictInfo)
	}
	return nil
}

func errOrOK(err error) string {
	if err == nil {
		return "exit 0"
	}
	var ee interface{ ExitCode() int }
	if errors.As(err, &ee) {
		return fmt.Sprintf("exit %d", ee.ExitCode())
	}
	return err.Error()
}

// trimLogLine drops the time= and level= fields of a slog text line.
func trimLogLine(l string) string {
	f := strings.Fields(l)
	kept := f[:0]
	for _, x := range f {
		if !strings.HasPrefix(x, "time=") && !strings.HasPrefix(x, "level=") {
			kept = append(kept, x)
		}
	}
	return strings.Join(kept, " ")
}

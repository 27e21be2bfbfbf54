package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/internal/procstat"
)

// soakConfig is the mixed load of a soak run; the runner passes it on to
// the client process as the same flags.
type soakConfig struct {
	duration  time.Duration // how long the load runs
	interval  time.Duration // between samples
	rate      int           // short connections per second (every 10th to the ACME responder)
	idle      int           // idle connections held at any time, each for 5-60 s
	slow      int           // slowloris clients at any time
	resets    int           // connections per second the backend resets mid-stream
	bulkMiB   int           // size of each bulk download
	bulkEvery time.Duration // pause between bulk downloads (one at a time)
}

func (c *soakConfig) register(fs *flag.FlagSet) {
	fs.DurationVar(&c.duration, "duration", 30*time.Minute, "how long the load runs")
	fs.DurationVar(&c.interval, "interval", 10*time.Second, "time between samples")
	fs.IntVar(&c.rate, "rate", 100, "short connections per second (every 10th offers acme-tls/1)")
	fs.IntVar(&c.idle, "idle", 2000, "idle connections held at any time, each for 5-60 s, then replaced")
	fs.IntVar(&c.slow, "slow", 100, "slowloris clients (3 bytes of a record header, reconnecting when closed)")
	fs.IntVar(&c.resets, "resets", 5, "connections per second the web server resets mid-stream")
	fs.IntVar(&c.bulkMiB, "bulk-mib", 64, "size of each bulk download")
	fs.DurationVar(&c.bulkEvery, "bulk-every", 5*time.Second, "pause between bulk downloads (one at a time)")
}

func (c soakConfig) args() []string {
	return []string{"-duration", c.duration.String(), "-interval", c.interval.String(),
		"-rate", strconv.Itoa(c.rate), "-idle", strconv.Itoa(c.idle), "-slow", strconv.Itoa(c.slow),
		"-resets", strconv.Itoa(c.resets), "-bulk-mib", strconv.Itoa(c.bulkMiB), "-bulk-every", c.bulkEvery.String()}
}

// soakSample is one row of the soak table.
type soakSample struct {
	At        float64 `json:"at"` // seconds since the load started
	RSSKiB    int64   `json:"rss_kib"`
	FDs       int     `json:"fds"`
	Sockets   int     `json:"sockets"`
	Pipes     int     `json:"pipes"`
	Threads   int     `json:"threads"`
	Conntrack int     `json:"conntrack"` // entries in the server namespace
	CPU       float64 `json:"cpu_pct"`   // proxy CPU since the previous sample, 100 = one core
	Done      int64   `json:"done"`      // client connections finished so far
	Failed    int64   `json:"failed"`    // of those, how many did not behave as expected
	cpu       int64   // utime+stime ticks
}

// SoakResult is the last line a soak prints (prefixed "SOAK-RESULT "), for
// the CI test that asserts on it.
type SoakResult struct {
	Baseline       soakSample         `json:"baseline"` // fresh proxy after one exchange
	Peak           soakSample         `json:"peak"`     // per column maximum under load
	After          soakSample         `json:"after"`    // once the clients have gone
	Samples        []soakSample       `json:"samples"`
	SlopesPerHour  map[string]float64 `json:"slopes_per_hour"` // least squares, under load
	GoroutinesRef  int                `json:"goroutines_ref"`  // a fresh proxy after one exchange; the runtime's own not counted
	GoroutinesEnd  int                `json:"goroutines_end"`  // the soaked proxy at the end
	RelayLoopsEnd  int                `json:"relay_loops_end"`
	Clients        map[string]tally   `json:"clients"` // outcomes by kind of client
	ClientFailures int64              `json:"client_failures"`
	Config         map[string]string  `json:"config"`
}

// soakMain runs the proxy in a server namespace under mixed load from a
// client namespace for -duration, sampling it every -interval.
func soakMain(args []string) error {
	fs := flag.NewFlagSet("soak", flag.ExitOnError)
	r := &runner{dialer: &net.Dialer{}}
	var cfg soakConfig
	cfg.register(fs)
	fs.StringVar(&r.bin, "bin", "", "acme-alpn-proxy binary")
	fs.StringVar(&r.work, "work", "", "directory for logs, pid files and outputs")
	pidsFile := fs.String("pids", "", "append the PID of every started process to this file")
	fs.StringVar(&r.nsFile, "netns-file", "", "append the name of every created netns to this file")
	mode := fs.String("mode", "tproxy", "interception mode of the proxy")
	fs.Parse(args)
	if r.bin == "" || r.work == "" {
		return errors.New("-bin and -work are required")
	}
	var err error
	if r.self, err = os.Executable(); err != nil {
		return err
	}
	r.procs = &children{pidsFile: *pidsFile, work: r.work}
	r.cleanupOnExit(cfg.duration + 10*time.Minute)
	defer r.cleanup()

	p, err := r.newPair()
	if err != nil {
		return err
	}
	if err := r.serverSide(p, "soak-backend", "-lifetime", (cfg.duration + 10*time.Minute).String()); err != nil {
		return err
	}
	res := SoakResult{Config: map[string]string{"mode": *mode}}
	for i := 0; i+1 < len(cfg.args()); i += 2 {
		res.Config[strings.TrimPrefix(cfg.args()[i], "-")] = cfg.args()[i+1]
	}

	// The goroutine count has no outside view but the SIGQUIT dump, which
	// ends the process: a reference proxy, identical and after one
	// exchange, gives the baseline.
	ref, err := r.warmProxy(p, "soak-ref", *mode)
	if err != nil {
		return err
	}
	g, err := ref.goroutines(frameRelay)
	if err != nil {
		return fmt.Errorf("reference proxy: %w", err)
	}
	res.GoroutinesRef = g.own()

	px, err := r.warmProxy(p, "soak-proxy", *mode)
	if err != nil {
		return err
	}
	if res.Baseline, err = r.soakSample(px.pid, p.srv, 0, nil); err != nil {
		return err
	}
	cl, err := r.procs.spawn("soak-clients", inNetns(p.cli, append([]string{r.self, "netclient", "soak", "-target", srvIP + ":443"}, cfg.args()...)))
	if err != nil {
		return err
	}
	if err := cl.waitOutput("running", 10*time.Second); err != nil {
		return err
	}
	start := time.Now()
	fmt.Printf("soak: %s, proxy mode %s (pid %d), %s\n\n", time.Now().UTC().Format(time.RFC3339), *mode, px.pid, strings.Join(cfg.args(), " "))
	fmt.Println("| t (s) | RSS MiB | fds (sockets/pipes) | threads | conntrack | CPU % | conns done | failed |")
	fmt.Println("|---:|---:|---|---:|---:|---:|---:|---:|")
	printRow := func(s soakSample) {
		fmt.Printf("| %.0f | %.1f | %d (%d/%d) | %d | %d | %.1f | %d | %d |\n", s.At, float64(s.RSSKiB)/1024, s.FDs, s.Sockets, s.Pipes, s.Threads, s.Conntrack, s.CPU, s.Done, s.Failed)
	}
	printRow(res.Baseline)
	prev := &res.Baseline
	prevAt := time.Now()
	for next := start.Add(cfg.interval); ; next = next.Add(cfg.interval) {
		time.Sleep(time.Until(next))
		if !cl.running() {
			break
		}
		s, err := r.soakSample(px.pid, p.srv, time.Since(start), cl)
		if err != nil {
			return fmt.Errorf("proxy gone under load: %w; log: %s", err, tail(px.log()))
		}
		s.CPU = 100 * float64(s.cpu-prev.cpu) / procstat.UserHZ / time.Since(prevAt).Seconds()
		prevAt = time.Now()
		printRow(s)
		res.Samples = append(res.Samples, s)
		prev = &res.Samples[len(res.Samples)-1]
		if time.Since(start) >= cfg.duration {
			break
		}
	}
	if err := cl.waitExit(2 * time.Minute); err != nil {
		return err
	}
	// The clients have closed everything; slowloris connections the proxy
	// has not timed out yet go within -hello-timeout (2 s).
	var after soakSample
	for deadline := time.Now().Add(30 * time.Second); ; {
		if after, err = r.soakSample(px.pid, p.srv, time.Since(start), cl); err != nil {
			return err
		}
		if after.Sockets <= res.Baseline.Sockets || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Second)
	}
	res.After = after
	fmt.Println()
	fmt.Println("| after the clients left | RSS MiB | fds (sockets/pipes) | threads | conntrack |")
	fmt.Println("|---|---:|---|---:|---:|")
	fmt.Printf("| baseline → peak → after | %.1f → %.1f → %.1f | %d → %d → %d (%d/%d) | %d → %d → %d | %d → %d → %d |\n",
		mib(res.Baseline.RSSKiB), mib(peakOf(res.Samples).RSSKiB), mib(after.RSSKiB),
		res.Baseline.FDs, peakOf(res.Samples).FDs, after.FDs, after.Sockets, after.Pipes,
		res.Baseline.Threads, peakOf(res.Samples).Threads, after.Threads,
		res.Baseline.Conntrack, peakOf(res.Samples).Conntrack, after.Conntrack)
	res.Peak = peakOf(res.Samples)

	g, err = px.goroutines(frameRelay)
	if err != nil {
		return fmt.Errorf("goroutine dump at the end: %w", err)
	}
	res.GoroutinesEnd, res.RelayLoopsEnd = g.own(), g.byFrame[frameRelay]
	fmt.Printf("\ngoroutines (SIGQUIT dump, the runtime's own not counted): fresh proxy after one exchange %d; soaked proxy at the end %d (relay event loops %d; with the runtime's %d)\n",
		res.GoroutinesRef, res.GoroutinesEnd, res.RelayLoopsEnd, g.total)

	// The first minutes are a ramp, not a trend: the idle holders open over
	// 10 s and conntrack keeps closed connections for 120 s (TIME_WAIT).
	warmUp := min(soakWarmUp, cfg.duration/2)
	var steadySamples []soakSample
	for _, s := range res.Samples {
		if s.At >= warmUp.Seconds() {
			steadySamples = append(steadySamples, s)
		}
	}
	res.SlopesPerHour = map[string]float64{}
	fmt.Printf("\nleast-squares slope under load after the first %v (per hour):\n", warmUp)
	for _, col := range []struct {
		name string
		get  func(soakSample) float64
		unit string
	}{
		{"rss_mib", func(s soakSample) float64 { return mib(s.RSSKiB) }, "MiB"},
		{"fds", func(s soakSample) float64 { return float64(s.FDs) }, "fds"},
		{"threads", func(s soakSample) float64 { return float64(s.Threads) }, "threads"},
		{"conntrack", func(s soakSample) float64 { return float64(s.Conntrack) }, "entries"},
	} {
		xs, ys := make([]float64, len(steadySamples)), make([]float64, len(steadySamples))
		for i, s := range steadySamples {
			xs[i], ys[i] = s.At/3600, col.get(s)
		}
		slope := leastSquaresSlope(xs, ys)
		res.SlopesPerHour[col.name] = slope
		fmt.Printf("  %-9s %+.2f %s/h\n", col.name, slope, col.unit)
	}

	res.Clients = map[string]tally{}
	for line := range strings.Lines(cl.stdout()) {
		if rest, ok := strings.CutPrefix(line, "outcomes "); ok {
			if err := json.Unmarshal([]byte(rest), &res.Clients); err != nil {
				return fmt.Errorf("client outcomes: %w", err)
			}
		}
	}
	fmt.Println("\nclient outcomes:")
	for _, kind := range sortedKeys(res.Clients) {
		fmt.Printf("  %-8s %s\n", kind, res.Clients[kind])
	}
	if len(res.Samples) > 0 {
		res.ClientFailures = res.Samples[len(res.Samples)-1].Failed
	}
	b, _ := json.Marshal(res)
	fmt.Printf("\nSOAK-RESULT %s\n", b)
	return nil
}

// soakWarmUp is left out of the slopes (see there).
const soakWarmUp = 3 * time.Minute

func mib(k int64) float64 { return float64(k) / 1024 }

// warmProxy starts an intercepting proxy, makes one web and one ACME
// exchange through it and lets it settle.
func (r *runner) warmProxy(p *pair, name, mode string) (*proxyProc, error) {
	px, err := r.interceptingProxy(p, name, mode)
	if err != nil {
		return nil, err
	}
	if err := r.warm(p); err != nil {
		return nil, err
	}
	time.Sleep(time.Second)
	return px, nil
}

// warm makes one web and one ACME exchange from the client namespace.
func (r *runner) warm(p *pair) error {
	c, err := r.procs.spawn("soak-warm", inNetns(p.cli, []string{r.self, "netclient", "warm", "-target", srvIP + ":443"}))
	if err != nil {
		return err
	}
	if err := c.waitExit(30 * time.Second); err != nil {
		return err
	}
	if c.waitErr != nil {
		return fmt.Errorf("warm-up exchange through the proxy: %v: %s", c.waitErr, tail(c.stderr()))
	}
	return nil
}

// soakSample samples the proxy from /proc, the conntrack table of ns, and
// the client's last progress line.
func (r *runner) soakSample(pid int, ns string, at time.Duration, cl *child) (soakSample, error) {
	ps, err := sampleProc(pid)
	if err != nil {
		return soakSample{}, err
	}
	s := soakSample{At: at.Seconds(), RSSKiB: ps.rssKiB, FDs: ps.fds, Sockets: ps.sockets, Pipes: ps.pipes, Threads: ps.threads, cpu: ps.cpuTicks}
	count, err := sh("ip", "netns", "exec", ns, "cat", "/proc/sys/net/netfilter/nf_conntrack_count")
	if err == nil {
		s.Conntrack = atoiOr(strings.TrimSpace(count), -1)
	}
	if cl != nil {
		var last string
		for line := range strings.Lines(cl.stdout()) {
			if strings.HasPrefix(line, "progress ") {
				last = line
			}
		}
		fmt.Sscanf(last, "progress %d %d", &s.Done, &s.Failed)
	}
	return s, nil
}

func peakOf(samples []soakSample) soakSample {
	var p soakSample
	for _, s := range samples {
		p.RSSKiB = max(p.RSSKiB, s.RSSKiB)
		p.FDs = max(p.FDs, s.FDs)
		p.Sockets = max(p.Sockets, s.Sockets)
		p.Pipes = max(p.Pipes, s.Pipes)
		p.Threads = max(p.Threads, s.Threads)
		p.Conntrack = max(p.Conntrack, s.Conntrack)
		p.CPU = max(p.CPU, s.CPU)
	}
	return p
}

// leastSquaresSlope fits y = a + b·x and returns b (0 for fewer than two
// distinct x).
func leastSquaresSlope(xs, ys []float64) float64 {
	n := float64(len(xs))
	var sx, sy, sxx, sxy float64
	for i := range xs {
		sx += xs[i]
		sy += ys[i]
		sxx += xs[i] * xs[i]
		sxy += xs[i] * ys[i]
	}
	den := n*sxx - sx*sx
	if n < 2 || den == 0 {
		return 0
	}
	return (n*sxy - sx*sy) / den
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sortStrings(keys)
	return keys
}

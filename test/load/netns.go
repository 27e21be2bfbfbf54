package main

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"
)

// Addresses of the namespace pair (own namespaces only: 198.18.0.0/15).
const (
	srvIP = "198.18.0.1"
	cliIP = "198.18.0.2"
)

func randHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func sh(argv ...string) (string, error) {
	o, err := exec.Command(argv[0], argv[1:]...).CombinedOutput()
	if err != nil {
		return string(o), fmt.Errorf("%s: %v: %s", strings.Join(argv, " "), err, strings.TrimSpace(string(o)))
	}
	return string(o), nil
}

func (r *runner) newNetns(role string) (string, error) {
	name := fmt.Sprintf("ld-%s-%s", role, randHex(3))
	if _, err := sh("ip", "netns", "add", name); err != nil {
		return "", err
	}
	r.mu.Lock()
	r.namespaces = append(r.namespaces, name)
	r.mu.Unlock()
	if r.nsFile != "" {
		if f, err := os.OpenFile(r.nsFile, os.O_APPEND|os.O_WRONLY|os.O_CREATE, 0o644); err == nil {
			fmt.Fprintln(f, name)
			f.Close()
		}
	}
	_, err := sh("ip", "-n", name, "link", "set", "lo", "up")
	return name, err
}

func deleteNetns(name string) {
	if _, err := sh("ip", "netns", "del", name); err != nil {
		logf("%v", err)
	}
}

// pair is a server and a client namespace joined by a veth link. The
// server runs the web server on srvIP:443, the ACME responder on
// 127.0.0.1:31443 and the proxy; clients dial srvIP:443 as from outside.
type pair struct{ srv, cli string }

func (r *runner) newPair() (*pair, error) {
	srv, err := r.newNetns("s")
	if err != nil {
		return nil, err
	}
	cli, err := r.newNetns("c")
	if err != nil {
		return nil, err
	}
	p := &pair{srv, cli}
	steps := [][]string{
		{"ip", "-n", srv, "link", "add", "ldv", "type", "veth", "peer", "name", "ldv", "netns", cli},
		{"ip", "-n", srv, "addr", "add", srvIP + "/24", "dev", "ldv"},
		{"ip", "-n", cli, "addr", "add", cliIP + "/24", "dev", "ldv"},
		{"ip", "-n", srv, "link", "set", "ldv", "up"},
		{"ip", "-n", cli, "link", "set", "ldv", "up"},
	}
	for _, s := range steps {
		if _, err := sh(s...); err != nil {
			return nil, err
		}
	}
	return p, nil
}

// serverSide starts the backends in the server namespace; extra are more
// backend flags.
func (r *runner) serverSide(p *pair, name string, extra ...string) error {
	argv := append([]string{r.self, "backend", "-web", srvIP + ":443", "-acme", "127.0.0.1:31443", "-stall", stallFor.String()}, extra...)
	c, err := r.procs.spawn(name, inNetns(p.srv, argv))
	if err != nil {
		return err
	}
	return c.waitOutput("ready", 10*time.Second)
}

func (r *runner) interceptingProxy(p *pair, name, mode string, extra ...string) (*proxyProc, error) {
	flags := append([]string{"-listen", ":21443", "-backend", "nft", "-mode", mode, "-hello-timeout", "2s"}, extra...)
	// The pair is IPv4 only; preflight would miss a web server on [::]:443.
	return r.startProxy(proxyOpts{name: name, ns: p.srv, flags: flags, env: []string{"ACME_ALPN_PROXY_DISABLEV6=y"}})
}

// request is one client connection's record, as netclient prints it.
type request struct {
	Long   bool   `json:"long,omitempty"` // opened before the kill, kept open
	Wait   bool   `json:"wait,omitempty"` // long, idle: waits for the server to speak
	Start  int64  `json:"start"`          // unix ns
	End    int64  `json:"end"`
	Result string `json:"result"` // errKind, "ok" when every step worked
	Step   string `json:"step,omitempty"`
	Direct bool   `json:"direct"` // the web server saw the client's own address
	Local  string `json:"local,omitempty"`
	Err    string `json:"err,omitempty"`
}

// s6Kill9 kills the proxy with SIGKILL while clients keep connecting
// through the interception; the kernel drops the owner table with the
// process, so new connections must reach the web server at once.
func (r *runner) s6Kill9() error {
	for _, mode := range []string{"tproxy", "redirect"} {
		if err := r.kill9(mode); err != nil {
			return fmt.Errorf("%s: %w", mode, err)
		}
	}
	return nil
}

func (r *runner) kill9(mode string) error {
	sc := "6 kill -9 (" + mode + ")"
	p, err := r.newPair()
	if err != nil {
		return err
	}
	if err := r.serverSide(p, "s6-backend-"+mode); err != nil {
		return err
	}
	px, err := r.interceptingProxy(p, "s6-proxy-"+mode, mode)
	if err != nil {
		return err
	}
	rate := max(1, int(200*r.scale))
	cl, err := r.procs.spawn("s6-clients-"+mode, inNetns(p.cli, []string{r.self, "netclient", "killload",
		"-target", srvIP + ":443", "-rate", fmt.Sprint(rate), "-duration", "6s", "-long", fmt.Sprint(r.n(50)), "-waiting", fmt.Sprint(r.n(50))}))
	if err != nil {
		return err
	}
	if err := cl.waitOutput("running", 10*time.Second); err != nil {
		return err
	}
	time.Sleep(3 * time.Second)
	killedAt := time.Now()
	if err := syscallKill(px.pid); err != nil {
		return err
	}
	px.waitExit(5 * time.Second)
	exitedAt := time.Now() // the owner table goes when the exiting process's netlink socket closes
	statusOut, statusErr := exec.Command("ip", "netns", "exec", p.srv, r.bin, "-pidfile", px.pidfile, "status").CombinedOutput()
	tables, _ := sh("ip", "netns", "exec", p.srv, "nft", "list", "tables")
	if err := cl.waitExit(30 * time.Second); err != nil {
		return err
	}
	reqs, err := parseRequests(cl.stdout())
	if err != nil {
		return err
	}
	k, x := killedAt.UnixNano(), exitedAt.UnixNano()
	before, dying, after, long, waiting := tally{}, tally{}, tally{}, tally{}, tally{}
	var told latencies
	var viaProxyAfter, directBefore, hung int
	var firstAfter *request
	for i := range reqs {
		q := &reqs[i]
		key := q.Result
		if q.Result != "ok" {
			key += " at " + q.Step
		}
		switch {
		case q.Wait:
			if q.Result == "ok" {
				key = "never told (still open at the end)"
			} else if q.Step == "waiting" && q.Result != "timeout" {
				told.add(time.Duration(q.End - k))
			}
			waiting[key]++
		case q.Long:
			long[key]++
		case q.Start < k:
			if q.Result != "ok" && q.End >= k {
				key += " (in flight at kill)"
			}
			before[key]++
			if q.Direct {
				directBefore++
			}
		case q.Start < x:
			dying[key]++
			if q.Result == "timeout" {
				hung++
			}
		default:
			after[key]++
			if q.Result == "timeout" {
				hung++
			}
			if q.Result == "ok" && !q.Direct {
				viaProxyAfter++
			}
			if firstAfter == nil || q.Start < firstAfter.Start {
				firstAfter = q
			}
		}
	}
	out.row(sc, fmt.Sprintf("requests started before the kill (%d/s; each: hello, echo, 300 ms, echo)", rate), before.String(), check(directBefore == 0))
	out.row(sc, "long-lived connections exchanging every 100 ms at the kill", long.String(), verdictInfo)
	toldAfter := told.snapshot()
	// Each must learn at once, by the FIN or reset the kernel sends when it
	// closes the dead proxy's sockets: in redirect mode these need the
	// reverse NAT, gone with the owner table (README, Crash safety).
	toldVerdict := check(len(toldAfter) == r.n(50))
	out.row(sc, "idle connections waiting for the server at the kill: how they learnt (time after the kill)", fmt.Sprintf("%s; %s", waiting, dist(toldAfter)), toldVerdict)
	out.row(sc, fmt.Sprintf("requests started while the killed proxy exited (%s)", ms(exitedAt.Sub(killedAt))), dying.String(), verdictInfo)
	out.row(sc, "requests started after it exited", after.String(), check(after["ok"] > 0 && len(after) == 1))
	out.row(sc, "of those, relayed by a proxy instead of direct", fmt.Sprint(viaProxyAfter), check(viaProxyAfter == 0))
	out.row(sc, "connections started at or after the kill that hung (connected, then silence until the client's 3 s timeout) instead of failing fast", fmt.Sprint(hung), check(hung == 0))
	if firstAfter != nil {
		out.row(sc, "first request after the exit", fmt.Sprintf("started %s after the kill, %s, direct=%v", ms(time.Duration(firstAfter.Start-k)), firstAfter.Result, firstAfter.Direct), check(firstAfter.Result == "ok"))
	}
	st := "exit 0"
	if statusErr != nil {
		st = errOrOK(statusErr)
	}
	out.row(sc, "`status` and nft tables right after the kill", fmt.Sprintf("%s: %s; tables: %s", st, oneLine(string(statusOut)), oneLine(tables)), check(!strings.Contains(tables, "acme-alpn-proxy")))
	return nil
}

func oneLine(s string) string {
	s = strings.Join(strings.Fields(s), " ")
	if s == "" {
		return "(none)"
	}
	return s
}

func parseRequests(stdout string) ([]request, error) {
	var reqs []request
	for line := range strings.Lines(stdout) {
		if !strings.HasPrefix(line, "{") {
			continue
		}
		var q request
		if err := json.Unmarshal([]byte(line), &q); err != nil {
			return nil, err
		}
		reqs = append(reqs, q)
	}
	if len(reqs) == 0 {
		return nil, errors.New("client printed no results")
	}
	return reqs, nil
}

// s7StaleConntrack checks that after `stop` a client reusing its source
// port reaches the web server, in redirect mode where conntrack entries of
// redirected connections outlive the proxy. It runs without and with a
// host firewall that keeps conntrack active (ct state rule).
func (r *runner) s7StaleConntrack() error {
	for _, fw := range []bool{false, true} {
		p, err := r.newPair()
		if err != nil {
			return err
		}
		tag := "nofw"
		if fw {
			tag = "fw"
			rules := "table inet ldfw { chain input { type filter hook input priority 0; policy accept; ct state established,related accept; }; }"
			if _, err := sh("ip", "netns", "exec", p.srv, "nft", rules); err != nil {
				return err
			}
		}
		if err := r.serverSide(p, "s7-backend-"+tag); err != nil {
			return err
		}
		for i, how := range []string{"clean", "rst", "cut", "srvrst", "srvrst+kill9", "srvrst+kill9+stop"} {
			if err := r.reuseAfterStop(p, fw, how, 40000+i); err != nil {
				return fmt.Errorf("%s/%s: %w", tag, how, err)
			}
		}
	}
	return nil
}

func (r *runner) reuseAfterStop(p *pair, fw bool, how string, port int) error {
	sc := "7 stale conntrack (redirect)"
	if fw {
		sc += ", host firewall uses ct"
	}
	name := fmt.Sprintf("s7-%s-%v", how, fw)
	px, err := r.interceptingProxy(p, name+"-proxy", "redirect", "-drain-timeout", "1s")
	if err != nil {
		return err
	}
	client := func(name, action string) (*child, error) {
		return r.procs.spawn(name, inNetns(p.cli, []string{r.self, "netclient", "reuse", "-target", srvIP + ":443", "-port", fmt.Sprint(port), "-action", action}))
	}
	action, _, _ := strings.Cut(how, "+")
	kill := strings.Contains(how, "+kill9")
	stopAfterKill := strings.HasSuffix(how, "+stop")
	first, err := client(name+"-first", action)
	if err != nil {
		return err
	}
	if how == "cut" {
		if err := first.waitOutput("held", 10*time.Second); err != nil {
			return err
		}
	} else if err := first.waitExit(15 * time.Second); err != nil {
		return err
	}
	ctBefore := countConntrack(p.srv)
	var (
		took    time.Duration
		stopOut string
		stopErr error
	)
	if kill {
		start := time.Now()
		syscallKill(px.pid)
		px.waitExit(5 * time.Second)
		took = time.Since(start)
		if stopAfterKill {
			// `stop` with no instance running cleans up after a crash.
			_, stopOut, stopErr = px.stop(time.Minute)
		}
	} else {
		took, stopOut, stopErr = px.stop(time.Minute)
	}
	if err := first.waitExit(15 * time.Second); err != nil {
		return err
	}
	firstReq, err := parseRequests(first.stdout())
	if err != nil {
		return err
	}
	stale := countConntrack(p.srv)
	second, err := client(name+"-second", "probe")
	if err != nil {
		return err
	}
	if err := second.waitExit(15 * time.Second); err != nil {
		return err
	}
	secondReq, err := parseRequests(second.stdout())
	if err != nil {
		return err
	}
	f, s := firstReq[len(firstReq)-1], secondReq[len(secondReq)-1]
	firstDesc := fmt.Sprintf("%s, via proxy=%v", f.Result, !f.Direct)
	if f.Err != "" {
		firstDesc += " (" + f.Err + ")"
	}
	if stopErr != nil {
		firstDesc += fmt.Sprintf("; stop failed: %v %s", stopErr, stopOut)
	}
	ending := "stop"
	switch {
	case stopAfterKill:
		ending = "kill -9, then `stop`"
	case kill:
		ending = "kill -9"
	}
	out.row(sc, fmt.Sprintf("%s: first connection from :%d (then %s took %s); conntrack entries for :21443 before → after", how, port, ending, ms(took)),
		fmt.Sprintf("%s; %d → %d", firstDesc, ctBefore, stale), check(!f.Direct && stopErr == nil && f.Result == "ok"))
	verdict := check(s.Result == "ok" && s.Direct)
	if kill && !stopAfterKill {
		// A killed proxy cannot delete its entries: this row shows what the
		// kernel does then, for comparison with the rows above.
		verdict = verdictInfo
	}
	desc := fmt.Sprintf("%s, direct to web=%v", s.Result, s.Direct)
	if s.Err != "" {
		desc += " (" + s.Err + ")"
	}
	out.row(sc, fmt.Sprintf("%s: same source port after %s", how, ending), desc, verdict)
	return nil
}

// countConntrack counts the namespace's TCP conntrack entries that involve
// the proxy port, i.e. redirected connections.
func countConntrack(ns string) int {
	ct, _ := sh("ip", "netns", "exec", ns, "conntrack", "-L", "-p", "tcp")
	n := 0
	for line := range strings.Lines(ct) {
		if strings.Contains(line, "port=21443") {
			n++
		}
	}
	return n
}

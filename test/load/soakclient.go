package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// soakClients is the client side of a soak: every kind of client runs in
// its own goroutines until the duration is over.
type soakClients struct {
	cfg    soakConfig
	target string
	d      net.Dialer
	stop   chan struct{}
	wg     sync.WaitGroup

	mu           sync.Mutex
	outcomes     map[string]tally
	done, failed atomic.Int64
}

// record counts one finished client connection of kind; ok says whether it
// behaved as it should (what a user would call a failure otherwise).
func (s *soakClients) record(kind, outcome string, ok bool) {
	s.mu.Lock()
	if s.outcomes[kind] == nil {
		s.outcomes[kind] = tally{}
	}
	s.outcomes[kind][outcome]++
	s.mu.Unlock()
	s.done.Add(1)
	if !ok {
		s.failed.Add(1)
	}
}

func (s *soakClients) stopped() bool {
	select {
	case <-s.stop:
		return true
	default:
		return false
	}
}

// sleep waits d or until the soak ends; false when it ended.
func (s *soakClients) sleep(d time.Duration) bool {
	select {
	case <-s.stop:
		return false
	case <-time.After(d):
		return true
	}
}

func soakClientMain(args []string) error {
	fs := flag.NewFlagSet("netclient soak", flag.ExitOnError)
	s := &soakClients{stop: make(chan struct{}), outcomes: map[string]tally{}}
	s.cfg.register(fs)
	fs.StringVar(&s.target, "target", srvIP+":443", "address the clients dial")
	fs.Parse(args)

	s.go_(s.cfg.idle, s.idleHolder)
	s.go_(s.cfg.slow, s.slowloris)
	s.go_(1, s.bulk)
	s.go_(1, func() { s.atRate(s.cfg.rate, s.short) })
	s.go_(1, func() { s.atRate(s.cfg.resets, s.backendReset) })
	fmt.Println("running")
	start := time.Now()
	tick := time.NewTicker(time.Second)
	for time.Since(start) < s.cfg.duration {
		<-tick.C
		fmt.Printf("progress %d %d\n", s.done.Load(), s.failed.Load())
	}
	tick.Stop()
	close(s.stop)
	s.wg.Wait()
	fmt.Printf("progress %d %d\n", s.done.Load(), s.failed.Load())
	b, _ := json.Marshal(s.outcomes)
	fmt.Printf("outcomes %s\n", b)
	return nil
}

// go_ runs n copies of fn.
func (s *soakClients) go_(n int, fn func()) {
	for range n {
		s.wg.Add(1)
		go func() { defer s.wg.Done(); fn() }()
	}
}

// atRate starts fn rate times a second, each in its own goroutine, on
// schedule whatever the proxy's speed.
func (s *soakClients) atRate(rate int, fn func(i int)) {
	if rate <= 0 {
		return
	}
	interval := time.Second / time.Duration(rate)
	start := time.Now()
	for i := 0; ; i++ {
		if !s.sleep(time.Until(start.Add(time.Duration(i) * interval))) {
			return
		}
		s.go_(1, func() { fn(i) })
	}
}

// short is one normal request; every 10th offers acme-tls/1 and must reach
// the ACME responder.
func (s *soakClients) short(i int) {
	hello, want, kind := webHello, byte('W'), "short"
	if i%10 == 9 {
		hello, want, kind = acmeHello, 'A', "acme"
	}
	ss, err := openSession(&s.d, s.target, hello, cmdEcho, 5*time.Second)
	if err == nil {
		if ss.tag != want {
			err = fmt.Errorf("reached backend %c", ss.tag)
		} else {
			err = ss.ping(16, 5*time.Second)
		}
		ss.c.Close()
	}
	s.record(kind, errKind(err), err == nil)
}

// idleHolder keeps one connection open and silent for 5-60 s, checks it
// still works, closes it and opens the next.
func (s *soakClients) idleHolder() {
	if !s.sleep(rand.N(10 * time.Second)) { // the first 2,000 spread over 10 s
		return
	}
	for !s.stopped() {
		ss, err := openSession(&s.d, s.target, webHello, cmdEcho, 10*time.Second)
		if err == nil {
			if err = ss.ping(16, 10*time.Second); err == nil {
				s.sleep(5*time.Second + rand.N(55*time.Second))
				err = ss.ping(16, 10*time.Second)
			}
			ss.c.Close()
		}
		s.record("idle", errKind(err), err == nil)
		if err != nil {
			s.sleep(time.Second)
		}
	}
}

// slowloris sends 3 bytes of a record header and waits to be closed at the
// proxy's -hello-timeout, then does it again.
func (s *soakClients) slowloris() {
	if !s.sleep(rand.N(10 * time.Second)) {
		return
	}
	for !s.stopped() {
		c, err := s.d.Dial("tcp", s.target)
		if err != nil {
			s.record("slow", "dial: "+errKind(err), false)
			s.sleep(time.Second)
			continue
		}
		c.Write([]byte{recordHandshake, 3, 1})
		cancel := afterClose(s.stop, func() { c.SetReadDeadline(time.Unix(1, 0)) })
		c.SetReadDeadline(time.Now().Add(30 * time.Second))
		_, err = c.Read(make([]byte, 1))
		cancel()
		c.Close()
		if s.stopped() {
			return
		}
		k := errKind(err)
		s.record("slow", "closed by proxy: "+k, k == "closed" || k == "reset")
	}
}

// bulk downloads bulkMiB from the web server, one at a time, and closes
// before the server is done (it writes until its write fails).
func (s *soakClients) bulk() {
	for s.sleep(s.cfg.bulkEvery) {
		ss, err := openSession(&s.d, s.target, webHello, cmdBlast, 10*time.Second)
		if err == nil {
			ss.c.SetReadDeadline(time.Now().Add(2 * time.Minute))
			var n int64
			n, err = io.CopyN(io.Discard, ss.c, int64(s.cfg.bulkMiB)<<20)
			if err == nil && n != int64(s.cfg.bulkMiB)<<20 {
				err = errors.New("short read")
			}
			ss.c.Close()
		}
		s.record("bulk", errKind(err), err == nil)
	}
}

// backendReset asks the web server to reset the connection mid-stream: the
// client must be told (reset or close), never left hanging.
func (s *soakClients) backendReset(int) {
	ss, err := openSession(&s.d, s.target, webHello, cmdResetMid, 5*time.Second)
	if err != nil {
		s.record("reset", "open: "+errKind(err), false)
		return
	}
	ss.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err = io.Copy(io.Discard, ss.c)
	ss.c.Close()
	k := errKind(err)
	if err == nil {
		k = "closed"
	}
	s.record("reset", "told: "+k, k == "reset" || k == "closed")
}

// warmMain makes one web and one ACME exchange and fails unless each
// reached its backend.
func warmMain(args []string) error {
	fs := flag.NewFlagSet("netclient warm", flag.ExitOnError)
	target := fs.String("target", srvIP+":443", "address to dial")
	fs.Parse(args)
	d := &net.Dialer{}
	for _, c := range []struct {
		hello []byte
		tag   byte
	}{{webHello, 'W'}, {acmeHello, 'A'}} {
		ss, err := openSession(d, *target, c.hello, cmdEcho, 5*time.Second)
		if err != nil {
			return err
		}
		err = ss.ping(16, 5*time.Second)
		ss.c.Close()
		if err != nil {
			return err
		}
		if ss.tag != c.tag {
			return fmt.Errorf("reached backend %c, want %c", ss.tag, c.tag)
		}
	}
	return nil
}

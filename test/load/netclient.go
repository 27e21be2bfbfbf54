package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"
)

// netclientMain runs clients inside the client namespace and prints one
// JSON line per connection (see request).
func netclientMain(args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("netclient killload|reuse|soak|warm ...")
	}
	switch args[0] {
	case "soak":
		return soakClientMain(args[1:])
	case "warm":
		return warmMain(args[1:])
	}
	fs := flag.NewFlagSet("netclient", flag.ExitOnError)
	target := fs.String("target", srvIP+":443", "address the clients dial")
	rate := fs.Int("rate", 200, "killload: new connections per second")
	dur := fs.Duration("duration", 6*time.Second, "killload: how long")
	long := fs.Int("long", 50, "killload: connections exchanging throughout")
	waiting := fs.Int("waiting", 50, "killload: idle connections waiting for the server throughout")
	port := fs.Int("port", 40000, "reuse: the fixed local port")
	action := fs.String("action", "clean", "reuse: clean|rst|cut|probe")
	fs.Parse(args[1:])
	enc := &jsonOut{enc: json.NewEncoder(os.Stdout)}
	switch args[0] {
	case "killload":
		return killLoad(enc, *target, *rate, *dur, *long, *waiting)
	case "reuse":
		return reuse(enc, *target, *port, *action)
	}
	return fmt.Errorf("unknown netclient mode %q", args[0])
}

type jsonOut struct {
	mu  sync.Mutex
	enc *json.Encoder
}

func (j *jsonOut) put(q request) {
	j.mu.Lock()
	j.enc.Encode(q)
	j.mu.Unlock()
}

// direct tells whether the backend saw the client's own address, i.e. the
// connection was not relayed.
func (s *session) direct() bool { return s.peer == s.c.LocalAddr().String() }

// killLoad keeps long connections open and starts rate short requests per
// second for dur; the runner kills the proxy in the middle.
func killLoad(j *jsonOut, target string, rate int, dur time.Duration, long, waiting int) error {
	d := &net.Dialer{}
	var wg sync.WaitGroup
	start := time.Now()
	for range waiting {
		wg.Add(1)
		go func() {
			defer wg.Done()
			q := request{Long: true, Wait: true, Start: time.Now().UnixNano(), Step: "open"}
			s, err := openSession(d, target, webHello, cmdEcho, 3*time.Second)
			if err == nil {
				q.Direct = s.direct()
				q.Step = "echo"
				if err = s.ping(16, 3*time.Second); err == nil {
					// Like a client awaiting a slow response: it sends nothing
					// and learns of the proxy's death only from a FIN or RST.
					q.Step = "waiting"
					s.c.SetReadDeadline(start.Add(dur + 2*time.Second))
					_, err = s.c.Read(make([]byte, 1))
					if errKind(err) == "timeout" {
						err = nil // still open: never told
					} else if err == nil {
						err = errors.New("unexpected data")
					}
				}
				s.c.Close()
			}
			q.End, q.Result = time.Now().UnixNano(), errKind(err)
			if err != nil {
				q.Err = err.Error()
			}
			j.put(q)
		}()
	}
	for range long {
		wg.Add(1)
		go func() {
			defer wg.Done()
			q := request{Long: true, Start: time.Now().UnixNano(), Step: "open"}
			s, err := openSession(d, target, webHello, cmdEcho, 3*time.Second)
			if err == nil {
				q.Direct = s.direct()
				q.Step = "echo"
				for time.Since(start) < dur && err == nil {
					if err = s.ping(16, 3*time.Second); err == nil {
						time.Sleep(100 * time.Millisecond)
					}
				}
				s.c.Close()
			}
			q.End, q.Result = time.Now().UnixNano(), errKind(err)
			j.put(q)
		}()
	}
	fmt.Println("running")
	interval := time.Second / time.Duration(rate)
	for i := 0; ; i++ {
		at := start.Add(time.Duration(i) * interval)
		if at.Sub(start) >= dur {
			break
		}
		time.Sleep(time.Until(at))
		wg.Add(1)
		go func() {
			defer wg.Done()
			q := request{Start: time.Now().UnixNano(), Step: "open"}
			s, err := openSession(d, target, webHello, cmdEcho, 3*time.Second)
			if err == nil {
				q.Direct = s.direct()
				q.Step = "first echo"
				if err = s.ping(16, 3*time.Second); err == nil {
					time.Sleep(300 * time.Millisecond)
					q.Step = "second echo"
					err = s.ping(16, 3*time.Second)
				}
				s.c.Close()
			}
			q.End, q.Result = time.Now().UnixNano(), errKind(err)
			if err != nil {
				q.Err = err.Error()
			}
			if s != nil {
				q.Local = s.c.LocalAddr().String()
			}
			j.put(q)
		}()
	}
	wg.Wait()
	return nil
}

// reuse makes one connection from a fixed local port (SO_REUSEADDR), as a
// client whose port allocation wraps around or that binds on purpose.
func reuse(j *jsonOut, target string, port int, action string) error {
	d := &net.Dialer{
		LocalAddr: &net.TCPAddr{IP: net.ParseIP(cliIP), Port: port},
		Control: func(_, _ string, c syscall.RawConn) error {
			var serr error
			c.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1) })
			return serr
		},
	}
	q := request{Start: time.Now().UnixNano(), Step: "open"}
	cmd := byte(cmdEcho)
	switch action {
	case "clean":
		cmd = cmdServerClose
	case "srvrst":
		cmd = cmdResetMid
	}
	s, err := openSession(d, target, webHello, cmd, 3*time.Second)
	if err == nil {
		q.Direct = s.direct()
		switch action {
		case "clean": // the server closes first: no TIME_WAIT on our side
			q.Step = "server close"
			s.c.SetReadDeadline(time.Now().Add(3 * time.Second))
			_, err = io.Copy(io.Discard, s.c)
			s.c.Close()
		case "rst":
			q.Step = "echo"
			err = s.ping(16, 3*time.Second)
			s.reset()
		case "cut": // stays until the proxy's drain deadline cuts it
			q.Step = "echo"
			if err = s.ping(16, 3*time.Second); err == nil {
				fmt.Println("held")
				q.Step = "held until cut"
				s.c.SetReadDeadline(time.Now().Add(20 * time.Second))
				_, err = io.Copy(io.Discard, s.c)
				if err == nil {
					err = io.EOF // cut as expected: closed by the proxy
				}
			}
			s.c.Close()
		case "srvrst": // the web server resets; the proxy passes it on
			q.Step = "server reset"
			s.c.SetReadDeadline(time.Now().Add(3 * time.Second))
			_, err = io.Copy(io.Discard, s.c)
			if errKind(err) == "reset" {
				err = nil // the reset is what this client wanted
			} else if err == nil {
				err = errors.New("closed without reset")
			}
			s.c.Close()
		case "probe":
			q.Step = "echo"
			err = s.ping(16, 3*time.Second)
			s.c.Close()
		}
	}
	q.End, q.Result = time.Now().UnixNano(), errKind(err)
	if err != nil {
		q.Err = err.Error()
	}
	if action == "cut" && q.Result == "closed" {
		q.Result = "ok"
	}
	j.put(q)
	return nil
}

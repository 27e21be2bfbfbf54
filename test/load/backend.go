package main

import (
	"flag"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/internal/acceptloop"
)

// Commands a client sends right after its ClientHello; they choose how the
// backend behaves, so one backend process serves every fault scenario.
const (
	cmdEcho        = 'E' // header, then echo until EOF
	cmdResetMid    = 'R' // header, 4 KiB, then RST
	cmdStall       = 'S' // header, 64 KiB, then silence for -stall, then close
	cmdBlast       = 'B' // header, then write until the write fails
	cmdServerClose = 'C' // header, then close first (FIN)
)

const (
	resetMidBytes = 4 << 10
	stallBytes    = 64 << 10
)

// backendMain serves the web (tag W) and ACME (tag A) addresses. Its answer
// starts with a header line "TAG PEER\n", PEER being the address the backend
// sees: the client's own address when the connection came straight from
// the client, the proxy's when it was relayed.
func backendMain(args []string) error {
	fs := flag.NewFlagSet("backend", flag.ExitOnError)
	web := fs.String("web", "127.0.0.1:25301", "web server address (tag W)")
	acme := fs.String("acme", "127.0.0.1:25302", "ACME responder address (tag A)")
	stall := fs.Duration("stall", 5*time.Second, "how long a stalled answer stays silent")
	lifetime := fs.Duration("lifetime", 20*time.Minute, "exit after this long (a safety net)")
	fs.Parse(args)
	errc := make(chan error, 2)
	for _, l := range []struct {
		addr string
		tag  byte
	}{{*web, 'W'}, {*acme, 'A'}} {
		ln, err := net.Listen("tcp", l.addr)
		if err != nil {
			return err
		}
		go func() { errc <- acceptloop.Serve(ln, func(c net.Conn) { serveBackend(c, l.tag, *stall) }) }()
	}
	fmt.Println("ready")
	select {
	case err := <-errc:
		return err
	case <-time.After(*lifetime):
		return nil
	}
}

func serveBackend(c net.Conn, tag byte, stall time.Duration) {
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := readHello(c); err != nil {
		return
	}
	var cmd [1]byte
	if _, err := io.ReadFull(c, cmd[:]); err != nil {
		return
	}
	c.SetReadDeadline(time.Time{})
	if _, err := fmt.Fprintf(c, "%c %s\n", tag, c.RemoteAddr()); err != nil {
		return
	}
	switch cmd[0] {
	case cmdEcho:
		// A plain buffer, not io.Copy: TCPConn to TCPConn would splice and
		// hold two pipes (4 fds) per idle connection, and 8,000 held
		// connections would run this process out of descriptors.
		buf := make([]byte, 512)
		for {
			n, err := c.Read(buf)
			if n > 0 {
				if _, werr := c.Write(buf[:n]); werr != nil {
					return
				}
			}
			if err != nil {
				return
			}
		}
	case cmdResetMid:
		c.Write(make([]byte, resetMidBytes))
		c.(*net.TCPConn).SetLinger(0)
	case cmdStall:
		c.Write(make([]byte, stallBytes))
		time.Sleep(stall)
	case cmdBlast:
		buf := make([]byte, 32<<10)
		c.SetWriteDeadline(time.Now().Add(time.Minute))
		for {
			if _, err := c.Write(buf); err != nil {
				return
			}
		}
	case cmdServerClose:
	}
}

package main

import (
	"encoding/binary"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/internal/acceptloop"
)

const (
	helloTimeout   = 10 * time.Second
	maxDownloadDur = 60 * time.Second
	ioBufSize      = 256 << 10
)

// runBackend serves the web and ACME addresses the proxies route to. It is
// one process apart from the clients so that 5,000 idle connections cost
// each process 5,000 descriptors, not 10,000.
func runBackend(args []string) error {
	fs := flag.NewFlagSet("backend", flag.ExitOnError)
	web := fs.String("web", "127.0.0.1:24101", "address of the web (fallback) backend; answers tag W")
	acme := fs.String("acme", "127.0.0.1:24102", "address of the ACME backend; answers tag A")
	lifetime := fs.Duration("timeout", 30*time.Minute, "exit after this long")
	fs.Parse(args)
	errc := make(chan error, 2)
	for addr, tag := range map[string]byte{*web: tagWeb, *acme: tagACME} {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return err
		}
		go func() { errc <- acceptloop.Serve(ln, func(c net.Conn) { backendConn(c, tag) }) }()
	}
	fmt.Fprintln(os.Stderr, "backend ready")
	select {
	case err := <-errc:
		return err
	case <-time.After(*lifetime):
		return nil
	}
}

func backendConn(c net.Conn, tag byte) {
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(helloTimeout))
	if _, _, err := readHello(c); err != nil {
		return
	}
	var cmd [1]byte
	if _, err := io.ReadFull(c, cmd[:]); err != nil {
		return
	}
	c.SetReadDeadline(time.Time{})
	switch cmd[0] {
	case cmdPing:
		c.Write([]byte{tag})
	case cmdHold:
		if _, err := c.Write([]byte{tag}); err != nil {
			return
		}
		// Idle until told to close: any byte or EOF ends it.
		var b [1]byte
		c.Read(b[:])
	case cmdUpload:
		buf := make([]byte, ioBufSize)
		var n int64
		for {
			m, err := c.Read(buf)
			n += int64(m)
			if err != nil {
				if err != io.EOF {
					return
				}
				break
			}
		}
		var out [8]byte
		binary.BigEndian.PutUint64(out[:], uint64(n))
		c.Write(out[:])
	case cmdDownload:
		var d [4]byte
		c.SetReadDeadline(time.Now().Add(helloTimeout))
		if _, err := io.ReadFull(c, d[:]); err != nil {
			return
		}
		dur := min(time.Duration(binary.BigEndian.Uint32(d[:]))*time.Millisecond, maxDownloadDur)
		end := time.Now().Add(dur)
		c.SetWriteDeadline(end.Add(helloTimeout))
		buf := make([]byte, ioBufSize)
		for time.Now().Before(end) {
			if _, err := c.Write(buf); err != nil {
				return
			}
		}
	}
}

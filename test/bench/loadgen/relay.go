package main

import (
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/internal/acceptloop"
)

// runNaiveRelay is the reference point the issue asks for: the same sniff
// and route as acme-alpn-proxy, relayed the obvious way with two io.Copy
// goroutines (which Go turns into splice(2) between TCP sockets).
func runNaiveRelay(args []string) error {
	fs := flag.NewFlagSet("naive-relay", flag.ExitOnError)
	listen := fs.String("listen", "127.0.0.1:24110", "listen address")
	acme := fs.String("alpn", "127.0.0.1:24102", "backend for ALPN acme-tls/1")
	fallback := fs.String("fallback", "127.0.0.1:24101", "backend for everything else")
	lifetime := fs.Duration("timeout", 30*time.Minute, "exit after this long")
	fs.Parse(args)
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	fmt.Fprintln(os.Stderr, "naive-relay ready")
	errc := make(chan error, 1)
	go func() {
		errc <- acceptloop.Serve(ln, func(c net.Conn) { naiveRelay(c.(*net.TCPConn), *acme, *fallback) })
	}()
	select {
	case err := <-errc:
		return err
	case <-time.After(*lifetime):
		return nil
	}
}

func naiveRelay(client *net.TCPConn, acme, fallback string) {
	defer client.Close()
	client.SetReadDeadline(time.Now().Add(helloTimeout))
	raw, msg, err := readHello(client)
	if err != nil {
		return
	}
	alpn, err := helloALPN(msg)
	if err != nil {
		return
	}
	client.SetReadDeadline(time.Time{})
	target := fallback
	if slices.Contains(alpn, "acme-tls/1") {
		target = acme
	}
	bc, err := net.DialTimeout("tcp", target, 5*time.Second)
	if err != nil {
		return
	}
	backend := bc.(*net.TCPConn)
	defer backend.Close()
	if _, err := backend.Write(raw); err != nil {
		return
	}
	var wg sync.WaitGroup
	pipe := func(dst, src *net.TCPConn) {
		defer wg.Done()
		if _, err := io.Copy(dst, src); err != nil {
			// A reset on one side ends both, or the other copy could block forever.
			client.Close()
			backend.Close()
			return
		}
		dst.CloseWrite()
	}
	wg.Add(2)
	go pipe(backend, client)
	go pipe(client, backend)
	wg.Wait()
}

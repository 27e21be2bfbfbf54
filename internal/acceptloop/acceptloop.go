// Package acceptloop is the accept loop of the benchmark and load tools'
// backends: they push descriptor limits on purpose, so running out of
// descriptors is waited out rather than ending the server.
package acceptloop

import (
	"errors"
	"net"
	"syscall"
	"time"
)

// Serve accepts on ln and runs handle on each connection in a goroutine
// until ln fails for good (e.g. is closed); EMFILE and ENFILE are retried
// after a short pause.
func Serve(ln net.Listener, handle func(net.Conn)) error {
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			return err
		}
		go handle(c)
	}
}

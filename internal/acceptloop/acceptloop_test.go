package acceptloop

import (
	"net"
	"testing"
)

func TestServeHandlesUntilClosed(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	handled := make(chan struct{}, 1)
	done := make(chan error, 1)
	go func() { done <- Serve(ln, func(c net.Conn) { c.Close(); handled <- struct{}{} }) }()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	<-handled
	ln.Close()
	if err := <-done; err == nil {
		t.Fatal("Serve returned nil after its listener closed")
	}
}

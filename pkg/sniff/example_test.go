package sniff_test

import (
	"bytes"
	"fmt"
	"io"
	"strings"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/sniff"
)

// A plain-text client is recognised from its first byte, which is all that
// is taken from the stream; the rest stays for the fallback backend.
func ExampleRead() {
	conn := strings.NewReader("GET / HTTP/1.1\r\nHost: example.org\r\n\r\n")

	hello, err := sniff.Read(conn)
	defer hello.Release()
	if err != nil {
		fmt.Println("read:", err)
		return
	}
	route := "web server"
	if hello.OffersACME() {
		route = "ACME responder"
	}
	var backend bytes.Buffer
	backend.Write(hello.Raw) // the sniffed bytes first
	io.Copy(&backend, conn)  // then the rest of the stream

	fmt.Println(hello.Kind, "->", route)
	fmt.Printf("%q\n", backend.String())
	// Output:
	// not TLS -> web server
	// "GET / HTTP/1.1\r\nHost: example.org\r\n\r\n"
}

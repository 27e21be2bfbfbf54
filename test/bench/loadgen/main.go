// Command loadgen drives the loopback benchmark of acme-alpn-proxy against
// other ALPN-routing TCP proxies (see ../run.sh). Every client sends a real
// TLS ClientHello first, as browsers and ACME servers do, so each proxy does
// its full sniff-and-route work before relaying.
//
// Subcommands:
//
//	backend      TCP server behind the proxies: reads the hello and a command byte, then answers, sinks or sources
//	naive-relay  reference ALPN router built on io.Copy
//	bulk         throughput of N parallel streams (upload or download)
//	cps          connections per second and latency at a fixed concurrency
//	idle         memory and file descriptors of the proxy per idle connection
//	report       turns the JSON lines of the other modes into a markdown table
//
// Client modes print one JSON line each. Everything is bounded in time and
// count and talks to loopback only.
package main

import (
	"fmt"
	"os"
)

// Commands the client sends right after its ClientHello. Wherever a
// connection ends on the backend's initiative, the backend closes first, so
// the TIME_WAIT sockets sit on the listening ports and thousands of short
// connections do not use up the machine's ephemeral ports (which would break
// every other program on it that binds port 0).
const (
	cmdPing     = 'P' // backend answers its tag byte and closes
	cmdHold     = 'H' // backend answers its tag byte, then closes once the client sends cmdRelease or EOF
	cmdRelease  = 'R'
	cmdUpload   = 'U' // backend sinks until EOF, then answers the count (8 bytes)
	cmdDownload = 'D' // followed by a uint32 duration in ms: backend sources that long, then closes
)

// Tags the backend answers a ping with, so clients can check the route taken.
const (
	tagWeb  = 'W'
	tagACME = 'A'
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	cmds := map[string]func([]string) error{
		"backend":     runBackend,
		"naive-relay": runNaiveRelay,
		"bulk":        runBulk,
		"cps":         runCPS,
		"idle":        runIdle,
		"report":      runReport,
	}
	run, ok := cmds[os.Args[1]]
	if !ok {
		usage()
	}
	if err := run(os.Args[2:]); err != nil {
		fmt.Fprintf(os.Stderr, "loadgen %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: loadgen backend|naive-relay|bulk|cps|idle|report [flags]  (-h for flags)")
	os.Exit(2)
}

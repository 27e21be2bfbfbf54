// Command load measures acme-alpn-proxy under load, faults and hostile
// clients, and prints what it measured as markdown table rows. It is not a
// pass/fail test: the numbers are for a human to judge, and the "ok" column
// only flags correctness properties (a connection that should have worked
// and did not), never a timing.
//
// Subcommands:
//
//	load run -bin PROXY [-scenarios 1,2,...]   run scenarios, print rows
//	load backend -web ADDR -acme ADDR          the backends (own process)
//	load soak -bin PROXY [-duration 30m]       mixed load for a long time, sampled
//	load netclient MODE ...                    clients run inside a netns
//
// test/load/run.sh builds everything, sets up a private network namespace
// for the loopback scenarios and prints the table.
package main

import (
	"fmt"
	"os"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: load run|backend|netclient ...")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "run":
		err = runMain(os.Args[2:])
	case "backend":
		err = backendMain(os.Args[2:])
	case "soak":
		err = soakMain(os.Args[2:])
	case "netclient":
		err = netclientMain(os.Args[2:])
	default:
		err = fmt.Errorf("unknown subcommand %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "load:", err)
		os.Exit(1)
	}
}

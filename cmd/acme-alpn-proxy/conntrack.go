package main

import (
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"
)

// Our NAT rules need connection tracking, and while any rule needs it the
// kernel tracks every connection of the network namespace, not only ours.
// On a host that did not track before, each closed TCP connection now
// holds a table entry for nf_conntrack_tcp_timeout_time_wait (120 s), so a
// busy host can fill nf_conntrack_max, and then the kernel drops new
// connections on every port. start warns when it turns tracking on.

const conntrackSysctls = "/proc/sys/net/netfilter/"

// conntrackTable is the namespace's conntrack table as the sysctls show it.
type conntrackTable struct {
	loaded   bool // false until the conntrack module is loaded
	count    int
	max      int
	timeWait int // seconds a closed TCP connection stays tracked
}

func readConntrackTable() conntrackTable {
	read := func(name string) (int, bool) {
		b, err := os.ReadFile(conntrackSysctls + name)
		if err != nil {
			return 0, false
		}
		n, err := strconv.Atoi(strings.TrimSpace(string(b)))
		return n, err == nil
	}
	var t conntrackTable
	t.count, t.loaded = read("nf_conntrack_count")
	t.max, _ = read("nf_conntrack_max")
	t.timeWait, _ = read("nf_conntrack_tcp_timeout_time_wait")
	return t
}

// turnedOn reports whether tracking was off before our rules: the module
// not loaded, or an empty table (nothing tracked, though the host has
// traffic). An idle host with tracking on may look off too; the warning
// is then merely unneeded.
func (before conntrackTable) turnedOn() bool { return !before.loaded || before.count == 0 }

// capacity is how many new connections per second, on any port, the table
// holds in steady state: each stays about timeWait seconds after closing
// (the kernel's default, 120 s, if unreadable).
func (t conntrackTable) capacity() int {
	tw := t.timeWait
	if tw <= 0 {
		tw = 120
	}
	return t.max / tw
}

// warnIfConntrackTurnedOn logs, after the install, when our rules turned
// tracking on for the whole namespace.
func warnIfConntrackTurnedOn(log *slog.Logger, before conntrackTable) {
	if !before.turnedOn() {
		return
	}
	now := readConntrackTable()
	if !now.loaded {
		return
	}
	log.Warn("connection tracking was off here; our rules turn it on for every connection of this network namespace while the proxy runs",
		"nf_conntrack_max", now.max,
		"capacity", fmt.Sprintf("about %d new connections/s on any port (each stays tracked %d s after closing); past that the kernel drops new connections", now.capacity(), now.timeWait),
		"fix", "raise net.netfilter.nf_conntrack_max on a busier host")
}

// String is the table's use for status.
func (t conntrackTable) String() string {
	return fmt.Sprintf("conntrack entries: %d of %d (about %d new connections/s sustainable)", t.count, t.max, t.capacity())
}

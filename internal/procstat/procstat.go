// Package procstat reads what the benchmark and load tools charge to a
// process from /proc: CPU time, memory fields and descriptors.
package procstat

import (
	"bytes"
	"fmt"
	"strconv"
	"strings"
)

// UserHZ is the unit of utime and stime in /proc/PID/stat; the kernel fixes
// it at 100 for user space on every architecture that exports it.
const UserHZ = 100

// CPUTicks returns utime+stime from a /proc/PID/stat line. The command name
// may hold spaces and parentheses, so fields count from the last ')'.
func CPUTicks(stat []byte) (int64, error) {
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, fmt.Errorf("malformed stat")
	}
	f := strings.Fields(string(stat[i+1:]))
	// After ')': state(3) ... utime(14) stime(15), i.e. indexes 11 and 12.
	if len(f) < 13 {
		return 0, fmt.Errorf("stat has %d fields after comm", len(f))
	}
	u, err1 := strconv.ParseInt(f[11], 10, 64)
	s, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("stat utime/stime: %q %q", f[11], f[12])
	}
	return u + s, nil
}

// Field returns the number after a "Name:" line of a /proc key-value file
// (status, smaps_rollup); for sizes it is in KiB.
func Field(b []byte, name string) (int64, error) {
	for line := range strings.Lines(string(b)) {
		if rest, ok := strings.CutPrefix(line, name); ok {
			f := strings.Fields(rest)
			if len(f) == 0 {
				break
			}
			return strconv.ParseInt(f[0], 10, 64)
		}
	}
	return 0, fmt.Errorf("no %s line", strings.TrimSuffix(name, ":"))
}

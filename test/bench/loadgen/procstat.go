package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/internal/procstat"
)

// procUsage is what the benchmark charges to a proxy: the sum over its
// processes (nginx has a master and workers).
type procUsage struct {
	cpuTicks int64 // utime+stime
	pssKiB   int64
	fds      int
}

func readUsage(pids []int) (procUsage, error) {
	var u procUsage
	for _, pid := range pids {
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return u, err
		}
		ticks, err := procstat.CPUTicks(stat)
		if err != nil {
			return u, fmt.Errorf("pid %d: %w", pid, err)
		}
		rollup, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
		if err != nil {
			return u, err
		}
		pss, err := procstat.Field(rollup, "Pss:")
		if err != nil {
			return u, fmt.Errorf("pid %d: %w", pid, err)
		}
		fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
		if err != nil {
			return u, err
		}
		u.cpuTicks += ticks
		u.pssKiB += pss
		u.fds += len(fds)
	}
	return u, nil
}

// parsePIDs parses the -watch flag: comma-separated PIDs, empty for none.
func parsePIDs(s string) ([]int, error) {
	var pids []int
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		pid, err := strconv.Atoi(f)
		if err != nil || pid <= 0 {
			return nil, fmt.Errorf("bad pid %q", f)
		}
		pids = append(pids, pid)
	}
	return pids, nil
}

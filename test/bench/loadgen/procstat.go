package main

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// userHZ is the unit of utime/stime in /proc/PID/stat; the kernel fixes it
// at 100 for user space on every architecture Linux exports it for.
const userHZ = 100

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
		ticks, err := parseStatCPU(stat)
		if err != nil {
			return u, fmt.Errorf("pid %d: %w", pid, err)
		}
		rollup, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
		if err != nil {
			return u, err
		}
		pss, err := parsePSS(rollup)
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

// parseStatCPU returns utime+stime from a /proc/PID/stat line. The command
// name may contain spaces and parentheses, so fields are counted after the
// last ')'.
func parseStatCPU(stat []byte) (int64, error) {
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, fmt.Errorf("malformed stat")
	}
	f := strings.Fields(string(stat[i+1:]))
	// f[0] is field 3 (state); utime and stime are fields 14 and 15.
	if len(f) < 13 {
		return 0, fmt.Errorf("stat has %d fields after comm", len(f))
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("malformed utime/stime %q %q", f[11], f[12])
	}
	return ut + st, nil
}

// parsePSS returns the Pss line of smaps_rollup in KiB.
func parsePSS(rollup []byte) (int64, error) {
	sc := bufio.NewScanner(bytes.NewReader(rollup))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) >= 2 && f[0] == "Pss:" {
			return strconv.ParseInt(f[1], 10, 64)
		}
	}
	return 0, fmt.Errorf("no Pss line in smaps_rollup")
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

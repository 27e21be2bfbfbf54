package main

import (
	"fmt"
	"strconv"
)

// sourceMode is -fallback-source: from which address the web server sees
// proxied (non-ACME) connections come.
type sourceMode string

const (
	// sourceClient dials the web server from the client's own address
	// where the return path works, else from this host's (one log line
	// says why).
	sourceClient sourceMode = "client"
	// sourceHost dials from this host's address, as before.
	sourceHost sourceMode = "host"
)

func parseSourceMode(s string) (sourceMode, error) {
	switch m := sourceMode(s); m {
	case sourceClient, sourceHost:
		return m, nil
	}
	return "", fmt.Errorf("-fallback-source %q: want client or host", s)
}

// Defaults for the return path's mark bit and routing table. Bit 12
// (0x1000) is clear of the marks of Kubernetes (0x4000, 0x8000), CNI
// portmap (0x2000), AWS VPC CNI (0x80), Cilium's proxy bits (0xf00),
// Weave and Tailscale (0x20000–0xff0000), Calico (0xffff0000) and
// wg-quick (the whole value 0xca6c, matched exactly); Docker sets no
// marks on bridge traffic. Table 21443 is not wg-quick's 51820,
// Tailscale's 52 or Cilium's 2004/2005. The rule's priority 1000 puts it
// after the local table and before the rules of VPNs (Tailscale
// 5210–5270, wg-quick ~32765) that could route a client's address away.
const (
	defaultReturnMark    = 0x1000
	defaultReturnTable   = 21443
	returnRulePriority   = 1000
	returnMarkFlagUsage  = "packet `mark` bit(s) of the return path for -fallback-source client (only these bits are touched)"
	returnTableFlagUsage = "routing `table` of the return path for -fallback-source client"
)

// parseMark reads a mark such as 0x1000 (any base strconv accepts).
func parseMark(s string) (uint32, error) {
	v, err := strconv.ParseUint(s, 0, 32)
	if err != nil || v == 0 {
		return 0, fmt.Errorf("-return-mark %q: want a non-zero 32-bit value such as 0x1000", s)
	}
	return uint32(v), nil
}

package main

import (
	"fmt"
	"strconv"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/proxyproto"
)

// fallbackSource is -fallback-source: how the web server learns each
// fallback connection's client address.
type fallbackSource uint8

const (
	// sourceClient dials the web server from the client's own address
	// where the return path works, else from this host's (one log line
	// says why).
	sourceClient fallbackSource = iota
	// sourceHost dials plainly: the web server sees this host's address.
	sourceHost
	// sourceProxyV1 and sourceProxyV2 dial plainly and send a PROXY
	// protocol header naming the client and the address it dialed; the
	// web server must be configured to expect it on that port.
	sourceProxyV1
	sourceProxyV2
)

var fallbackSourceNames = [...]string{
	sourceClient:  "client",
	sourceHost:    "host",
	sourceProxyV1: "proxy-v1",
	sourceProxyV2: "proxy-v2",
}

func (s fallbackSource) String() string { return fallbackSourceNames[s] }

// header is the PROXY protocol version s sends; 0 for none.
func (s fallbackSource) header() proxyproto.Version {
	switch s {
	case sourceProxyV1:
		return proxyproto.V1
	case sourceProxyV2:
		return proxyproto.V2
	}
	return 0
}

// sourceOf is the source that sends header v.
func sourceOf(v proxyproto.Version) fallbackSource {
	switch v {
	case proxyproto.V1:
		return sourceProxyV1
	case proxyproto.V2:
		return sourceProxyV2
	}
	return sourceHost
}

func parseFallbackSource(v string) (fallbackSource, error) {
	for s, name := range fallbackSourceNames {
		if v == name {
			return fallbackSource(s), nil
		}
	}
	return 0, fmt.Errorf("-fallback-source %q: want client, host, proxy-v1 or proxy-v2", v)
}

// parseHeaderVersion parses -alpn-proxy-protocol: off, v1 or v2.
func parseHeaderVersion(flagName, v string) (proxyproto.Version, error) {
	for _, version := range []proxyproto.Version{0, proxyproto.V1, proxyproto.V2} {
		if v == version.String() {
			return version, nil
		}
	}
	return 0, fmt.Errorf("%s %q: want off, v1 or v2", flagName, v)
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

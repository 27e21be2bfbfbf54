package main

import (
	"fmt"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/proxyproto"
)

// fallbackSource is -fallback-source: how the web server learns each
// fallback connection's client address.
type fallbackSource uint8

const (
	// sourceHost dials plainly: the web server sees this host's address.
	sourceHost fallbackSource = iota
	// sourceProxyV1 and sourceProxyV2 dial plainly and send a PROXY
	// protocol header naming the client and the address it dialed; the
	// web server must be configured to expect it on that port.
	sourceProxyV1
	sourceProxyV2
)

var fallbackSourceNames = [...]string{
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
	return 0, fmt.Errorf("-fallback-source %q: want host, proxy-v1 or proxy-v2", v)
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

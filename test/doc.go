// Package e2e holds the end-to-end tests of acme-alpn-proxy: they build the
// real binary and run it, as root, in network namespaces created per test,
// with TLS web and ACME servers and clients in those namespaces.
//
// The harness (harness_test.go, servers_test.go) is meant to be reused by
// every e2e test file in this directory:
//
//	func TestSomething(t *testing.T) {
//		forEachVariant(t, func(t *testing.T, v Variant) {
//			s := NewSite(t)               // server + client netns, web on :443, ACME on 127.0.0.1:31443
//			p := s.NewProxy(t, v)         // not started yet; its own pidfile
//			p.Start()                     // foreground `start`, waits for status 0 and msg=ready
//			a, err := s.Cli.Request(ctx, s.ServerAddr(IPv4, 443), []string{"acme-tls/1"})
//			// a.Server == "acme"
//			p.Stop()
//		})
//	}
//
// Everything a test creates (namespaces, processes, rules) is removed by
// t.Cleanup, also when the test fails; a failing test logs the proxy's
// output. Without root or without ip/nft the tests skip, unless CI=true,
// where they fail.
//
// The (backend, mode) matrix is the single list `variants` in
// harness_test.go; iptables variants run the proxy with -backend iptables
// and a PATH whose iptables/ip6tables(-save/-restore) point at the legacy
// or nft flavour. ACME_ALPN_PROXY_E2E_BIN=path tests a prebuilt binary
// instead of building ./cmd/acme-alpn-proxy.
package e2e

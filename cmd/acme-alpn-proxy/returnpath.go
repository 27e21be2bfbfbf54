package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/intercept"
	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/policyroute"
)

// The start-time proof dials the web server from documentation addresses
// (RFC 5737, RFC 3849): never a real client's, and never routed anywhere.
var (
	proofSource4 = netip.MustParseAddr("192.0.2.1")
	proofSource6 = netip.MustParseAddr("2001:db8::1")
)

const proofTimeout = 3 * time.Second

func (cfg config) routeConfig() policyroute.Config {
	return policyroute.Config{Mark: cfg.returnMark, Table: cfg.returnTable, Priority: returnRulePriority}
}

// setupReturnPath prepares dialing the web server from clients' addresses:
// policy routing, the return-path rules (without any interception yet),
// and a real transparent connection to the web server through them. It
// returns the mark to dial with, or 0 when the web server will see this
// host's address, after saying why in one log line.
func (in *instance) setupReturnPath(families []intercept.Family, fallback netip.AddrPort) uint32 {
	cfg, log := in.cfg, in.log
	if cfg.source != sourceClient {
		if es, err := removeStaleRoutes(cfg); err == nil && len(es) > 0 {
			log.Info("removed policy routing a killed instance left", "entries", len(es))
		}
		return 0
	}
	hostMode := func(why string, err error) uint32 {
		attrs := []any{"why", why}
		if err != nil {
			attrs = append(attrs, "err", err)
		}
		log.Warn("the web server sees this host's address, not the client's (-fallback-source host behaviour)", attrs...)
		return 0
	}
	if fallback.IsValid() && fallback.Addr().IsLoopback() {
		// Checked here (kernel 6.x): a reply from 127.0.0.1 to another
		// address is never routed, so the check below would only time out.
		return hostMode("-fallback is a loopback address: the kernel does not route its replies to a client's address", nil)
	}
	if fallback.IsValid() && !isLocalAddr(fallback.Addr()) {
		return hostMode("-fallback is on another host: replies to a client's address would bypass the proxy", nil)
	}
	targets, err := proofTargets(fallback, cfg.port, families)
	if err != nil {
		return hostMode("no address of the web server to check the return path with", err)
	}
	if err := withRoutes(func(c routeConn) error { return policyroute.Install(c, cfg.routeConfig()) }); err != nil {
		return hostMode("policy routing could not be added", err)
	}
	in.routes = true
	undo := func() {
		if err := in.removeRoutes(); err != nil {
			log.Warn("removing policy routing failed", "err", err)
		}
	}
	rs, err := intercept.Build(intercept.Config{Mode: intercept.Redirect, Port: cfg.port, ListenPort: cfg.listenPort,
		Families: families, ReturnMark: cfg.returnMark})
	if err == nil {
		err = in.ic.Install(rs.ReturnOnly())
	}
	if err != nil {
		undo()
		return hostMode("the return-path rules could not be installed", err)
	}
	for _, t := range targets {
		if err := proveReturnPath(t, cfg.returnMark); err != nil {
			undo()
			return hostMode(fmt.Sprintf("a connection from a test address to the web server at %s failed, so replies to clients would not come back", t), err)
		}
	}
	log.Info("the web server sees each client's own address", "checked", fmt.Sprint(targets),
		"mark", fmt.Sprintf("%#x", cfg.returnMark), "table", cfg.returnTable)
	return cfg.returnMark
}

// removeRoutes removes our policy routing if this instance added it.
func (in *instance) removeRoutes() error {
	if !in.routes {
		return nil
	}
	in.routes = false
	return withRoutes(func(c routeConn) error {
		_, err := policyroute.Remove(c, in.cfg.routeConfig())
		return err
	})
}

type routeConn = *netlink.Conn

// withRoutes runs fn with a routing netlink socket.
func withRoutes(fn func(c routeConn) error) error {
	c, err := policyroute.Dial()
	if err != nil {
		return err
	}
	defer c.Close()
	return fn(c)
}

// proveReturnPath connects to target from a test address with our mark,
// as the proxy dials from a client's address: the handshake completes
// only if the replies are routed back to us.
func proveReturnPath(target netip.AddrPort, mark uint32) error {
	src := proofSource4
	level, opt := unix.IPPROTO_IP, unix.IP_TRANSPARENT
	if target.Addr().Is6() {
		src, level, opt = proofSource6, unix.IPPROTO_IPV6, unix.IPV6_TRANSPARENT
	}
	d := net.Dialer{
		Timeout:   proofTimeout,
		LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, uint16(1024+rand.N(31744)))),
		Control: func(_, _ string, rc syscall.RawConn) error {
			var serr error
			err := rc.Control(func(fd uintptr) {
				if serr = unix.SetsockoptInt(int(fd), level, opt, 1); serr == nil {
					serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(mark))
				}
			})
			return errors.Join(err, serr)
		},
	}
	c, err := d.DialContext(context.Background(), "tcp", target.String())
	if err != nil {
		return err
	}
	return c.Close()
}

// proofTargets are the web server addresses the proof dials: -fallback,
// or for each family the address the web server listens on (a local
// address of the family when it listens on the wildcard).
func proofTargets(fallback netip.AddrPort, port uint16, families []intercept.Family) ([]netip.AddrPort, error) {
	if fallback.IsValid() {
		return []netip.AddrPort{fallback}, nil
	}
	var out []netip.AddrPort
	for _, f := range families {
		a, err := webServerAddr(f, port)
		if err != nil {
			return nil, err
		}
		out = append(out, netip.AddrPortFrom(a, port))
	}
	return out, nil
}

// webServerAddr picks the address of family f that a client would dial.
func webServerAddr(f intercept.Family, port uint16) (netip.Addr, error) {
	name := "/proc/net/tcp"
	if f == intercept.IPv6 {
		name = "/proc/net/tcp6"
	}
	if a, ok := specificListener(name, port); ok {
		return a, nil
	}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return netip.Addr{}, err
	}
	var loopback netip.Addr
	for _, ia := range addrs {
		p, err := netip.ParsePrefix(ia.String())
		if err != nil {
			continue
		}
		a := p.Addr()
		if a.Is4() != (f == intercept.IPv4) {
			continue
		}
		if a.IsGlobalUnicast() {
			return a, nil
		}
		if a.IsLoopback() {
			loopback = a
		}
	}
	if loopback.IsValid() {
		return loopback, nil
	}
	return netip.Addr{}, fmt.Errorf("no %s address on this host", f)
}

// specificListener returns the address of a listener on port bound to one
// address (not the wildcard), from /proc/net/tcp or tcp6.
func specificListener(name string, port uint16) (netip.Addr, bool) {
	file, err := os.Open(name)
	if err != nil {
		return netip.Addr{}, false
	}
	defer file.Close()
	sc := bufio.NewScanner(file)
	sc.Scan()
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 4 || fields[3] != "0A" {
			continue
		}
		ip, p, ok := strings.Cut(fields[1], ":")
		if n, err := strconv.ParseUint(p, 16, 16); !ok || err != nil || uint16(n) != port {
			continue
		}
		if a, ok := procAddr(ip); ok && !a.IsUnspecified() {
			return a, true
		}
	}
	return netip.Addr{}, false
}

// procAddr decodes /proc/net/tcp's address: the address's 32-bit words,
// each printed as a host-order number.
func procAddr(h string) (netip.Addr, bool) {
	if len(h) != 8 && len(h) != 32 {
		return netip.Addr{}, false
	}
	b := make([]byte, 0, 16)
	for i := 0; i < len(h); i += 8 {
		w, err := strconv.ParseUint(h[i:i+8], 16, 32)
		if err != nil {
			return netip.Addr{}, false
		}
		b = binary.NativeEndian.AppendUint32(b, uint32(w))
	}
	a, _ := netip.AddrFromSlice(b)
	return a.Unmap(), true
}

// isLocalAddr reports whether a is an address of this host.
func isLocalAddr(a netip.Addr) bool {
	if a.IsLoopback() {
		return true
	}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return false
	}
	for _, ia := range addrs {
		if p, err := netip.ParsePrefix(ia.String()); err == nil && p.Addr() == a.Unmap() {
			return true
		}
	}
	return false
}

// describeRoutes lists our policy routing for status; "" when there is none.
func describeRoutes(cfg config) string {
	var es []policyroute.Entry
	if err := withRoutes(func(c routeConn) error {
		var err error
		es, err = policyroute.List(c, cfg.routeConfig())
		return err
	}); err != nil {
		return fmt.Sprintf("  policy routing unreadable: %v\n", err)
	}
	return policyroute.Describe(es)
}

// removeStaleRoutes removes policy routing a killed instance left.
func removeStaleRoutes(cfg config) (es []policyroute.Entry, err error) {
	err = withRoutes(func(c routeConn) error {
		es, err = policyroute.Remove(c, cfg.routeConfig())
		return err
	})
	return es, err
}

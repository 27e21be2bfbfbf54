package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/intercept"
)

// listenSet is the proxy's listeners: one per address family, so each can
// carry its family's transparent option and IPv6 can be absent.
type listenSet struct {
	lns      []*net.TCPListener
	families []intercept.Family // families with a wildcard listener
}

// listenAll opens the listeners. With an empty host it opens 0.0.0.0 and
// [::] (IPV6_V6ONLY); an IPv6 stack that is disabled in the kernel is
// skipped, not an error. transparent sets IP_TRANSPARENT so TPROXY can hand
// us connections addressed to other ports (it needs CAP_NET_ADMIN).
func listenAll(ctx context.Context, addr string, transparent, wantV6 bool) (*listenSet, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	type want struct {
		network, addr string
		family        intercept.Family
	}
	var wants []want
	switch ip := net.ParseIP(host); {
	case host == "":
		wants = append(wants, want{"tcp4", net.JoinHostPort("0.0.0.0", port), intercept.IPv4})
		if wantV6 {
			wants = append(wants, want{"tcp6", net.JoinHostPort("::", port), intercept.IPv6})
		}
	case ip != nil && ip.To4() != nil:
		wants = append(wants, want{"tcp4", addr, intercept.IPv4})
	case ip != nil:
		wants = append(wants, want{"tcp6", addr, intercept.IPv6})
	default:
		wants = append(wants, want{"tcp", addr, 0})
	}
	ls := &listenSet{}
	for _, w := range wants {
		lc := net.ListenConfig{
			// No TCP keepalive on proxied connections (4 setsockopts each):
			// liveness is the peers' business, as with HAProxy and nginx.
			KeepAlive: -1,
			Control: func(network, address string, c syscall.RawConn) error {
				return controlListener(c, w.family, transparent)
			},
		}
		ln, err := lc.Listen(ctx, w.network, w.addr)
		if err != nil {
			if w.family == intercept.IPv6 && host == "" && errors.Is(err, unix.EAFNOSUPPORT) {
				continue // IPv6 disabled in this kernel
			}
			ls.Close()
			if errors.Is(err, unix.EPERM) && transparent {
				return nil, fmt.Errorf("listen %s: setting IP_TRANSPARENT for tproxy: %w (run as root: intercepting needs CAP_NET_ADMIN)", w.addr, err)
			}
			if errors.Is(err, unix.EADDRINUSE) {
				return nil, fmt.Errorf("listen %s: address in use (another program, or another acme-alpn-proxy with a different -pidfile, has it; choose another -listen port)", w.addr)
			}
			if errors.Is(err, unix.EADDRNOTAVAIL) {
				return nil, fmt.Errorf("%w (the -listen address is not on this host)", err)
			}
			return nil, err
		}
		ls.lns = append(ls.lns, ln.(*net.TCPListener))
		if host == "" || net.ParseIP(host).IsUnspecified() {
			ls.families = append(ls.families, w.family)
		}
	}
	return ls, nil
}

func controlListener(c syscall.RawConn, family intercept.Family, transparent bool) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		if family == intercept.IPv6 {
			if serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 1); serr != nil {
				return
			}
		}
		if !transparent {
			return
		}
		if family == intercept.IPv6 {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_TRANSPARENT, 1)
		} else {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_TRANSPARENT, 1)
		}
	})
	if err != nil {
		return err
	}
	return serr
}

// Close closes every listener; Accept loops then return.
func (ls *listenSet) Close() {
	for _, ln := range ls.lns {
		ln.Close()
	}
}

func (ls *listenSet) String() string {
	s := ""
	for i, ln := range ls.lns {
		if i > 0 {
			s += ","
		}
		s += ln.Addr().String()
	}
	return s
}

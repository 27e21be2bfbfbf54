package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/intercept"
)

// listenSet is the proxy's listeners: one per address family, so each can
// carry its family's transparent option and IPv6 can be absent. They are
// bare descriptors, served by the relay engine's event loops rather than
// by Go's netpoller.
type listenSet struct {
	fds      []int
	addrs    []string
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
		fd, err := detach(ln.(*net.TCPListener))
		if err != nil {
			ls.Close()
			return nil, fmt.Errorf("listen %s: %w", w.addr, err)
		}
		ls.fds = append(ls.fds, fd)
		ls.addrs = append(ls.addrs, ln.Addr().String())
		if host == "" || net.ParseIP(host).IsUnspecified() {
			ls.families = append(ls.families, w.family)
		}
	}
	return ls, nil
}

// detach takes the listening socket out of Go's netpoller, keeping a
// duplicate of its descriptor for the relay engine.
func detach(ln *net.TCPListener) (int, error) {
	rc, err := ln.SyscallConn()
	if err != nil {
		ln.Close()
		return -1, err
	}
	dup, derr := -1, error(nil)
	if err := rc.Control(func(fd uintptr) { dup, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		derr = err
	}
	ln.Close() // unregisters it from the netpoller; the duplicate keeps the socket
	return dup, derr
}

func controlListener(c syscall.RawConn, family intercept.Family, transparent bool) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		// Accepted sockets inherit TCP_NODELAY: small TLS flights must
		// not wait on Nagle, and this saves a setsockopt per connection.
		if serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_NODELAY, 1); serr != nil {
			return
		}
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

// Close closes every listener. The engine must have stopped accepting
// from them first. Calling it twice is harmless.
func (ls *listenSet) Close() {
	for _, fd := range ls.fds {
		unix.Close(fd)
	}
	ls.fds = nil
}

func (ls *listenSet) String() string { return strings.Join(ls.addrs, ",") }

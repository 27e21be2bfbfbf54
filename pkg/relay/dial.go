package relay

import (
	"math/rand/v2"
	"net/netip"
	"unsafe"

	"golang.org/x/sys/unix"
)

// DialOptions say how the engine connects to the backend Route chose.
// Route sets them on Conn.Dial; every connection starts with none.
type DialOptions struct {
	// Header is written to the backend before the ClientHello (a PROXY
	// protocol header). It is Route's buffer and must stay unchanged until
	// Done. The engine keeps its capacity for the connection that next
	// reuses the Conn, so Route can append to c.Dial.Header[:0] and
	// allocate nothing once the Conns are warm. It does not count in
	// Conn.Up, which is the client's bytes.
	Header []byte
	// Source: connect from this address (IP_TRANSPARENT), never from the
	// client's port; zero: the kernel picks.
	Source netip.Addr
	// Mark is SO_MARK on the backend socket; 0: none.
	Mark uint32
}

// Source ports for dialing from the client's address come from below the
// ephemeral ranges clients use (Linux 32768–60999, Windows and macOS
// 49152–65535). The web server's socket for our dial has the 4-tuple
// (web:443, client:port); a client that opened a new connection from that
// same port while ours lasts would collide with it, and the intercepted
// socket (web:443, client:its port) would collide with ours if we reused
// the client's port. The kernel cannot see either clash (neither socket
// is bound to the client's address on this side), so we pick the port.
const (
	sourcePortLow   = 1024
	sourcePortCount = 32768 - sourcePortLow
	sourcePortTries = 8
)

// backendSocket opens the socket for c's backend. With c.Dial.Source set
// (and of the backend's family) it is bound transparently to that address
// on a port other than the client's; if that fails for a local reason
// (EADDRINUSE after every try, EADDRNOTAVAIL, EPERM, ...) the connection
// is dialed plainly from this host instead. c.FromClient says which.
func (c *Conn) backendSocket() (int, error) {
	fam := family(c.Backend)
	src := c.Dial.Source.Unmap()
	if src.IsValid() && (src.Is4() == (fam == unix.AF_INET)) {
		fd, err := rawSocket(fam)
		if err != nil {
			return -1, err
		}
		if c.l.bindTransparent(fd, fam, src, c.Dial.Mark, c.Client.Port()) == nil {
			c.FromClient = true
			return fd, nil
		}
		rawClose(fd)
	}
	fd, err := rawSocket(fam)
	if err != nil {
		return -1, err
	}
	if c.Dial.Mark != 0 && !src.IsValid() {
		if err := setsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, int32(c.Dial.Mark)); err != nil {
			rawClose(fd)
			return -1, err
		}
	}
	return fd, nil
}

// bindTransparent binds fd to src on a port that is not avoidPort: pick,
// bind, and pick again while the port is taken.
func (l *loop) bindTransparent(fd, fam int, src netip.Addr, mark uint32, avoidPort uint16) error {
	level, opt := unix.IPPROTO_IP, unix.IP_TRANSPARENT
	if fam == unix.AF_INET6 {
		level, opt = unix.IPPROTO_IPV6, unix.IPV6_TRANSPARENT
	}
	if err := setsockoptInt(fd, level, opt, 1); err != nil {
		return err
	}
	if mark != 0 {
		if err := setsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, int32(mark)); err != nil {
			return err
		}
	}
	var err error
	for range sourcePortTries {
		port := pickSourcePort(avoidPort)
		if err = l.sa.bind(fd, netip.AddrPortFrom(src, port)); err != unix.EADDRINUSE {
			return err
		}
	}
	return err
}

// pickSourcePort returns a random port of the source range other than avoid.
func pickSourcePort(avoid uint16) uint16 {
	for {
		p := uint16(sourcePortLow + rand.Uint32N(sourcePortCount))
		if p != avoid {
			return p
		}
	}
}

func (sa *sockaddr) bind(fd int, addr netip.AddrPort) error {
	sa.set(addr)
	_, _, errno := unix.RawSyscall(unix.SYS_BIND, uintptr(fd), uintptr(unsafe.Pointer(&sa.raw)), uintptr(sa.len))
	if errno != 0 {
		return errno
	}
	return nil
}

func setsockoptInt(fd, level, opt int, v int32) error {
	_, _, errno := unix.RawSyscall6(unix.SYS_SETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt), uintptr(unsafe.Pointer(&v)), 4, 0)
	if errno != 0 {
		return errno
	}
	return nil
}

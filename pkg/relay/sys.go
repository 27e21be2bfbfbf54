package relay

import (
	"encoding/binary"
	"net/netip"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The per-connection system calls take their sockaddr buffers from the
// loop rather than through x/sys/unix's Sockaddr interface, which would
// allocate one per accept, connect and getsockname.

// sockaddr is a buffer for any socket address the kernel hands over.
type sockaddr struct {
	raw unix.RawSockaddrAny
	len uint32
}

// accept4 accepts one connection on the listening socket lfd as a
// non-blocking, close-on-exec socket.
func (sa *sockaddr) accept4(lfd int) (int, netip.AddrPort, error) {
	sa.len = unix.SizeofSockaddrAny
	fd, _, errno := unix.Syscall6(unix.SYS_ACCEPT4, uintptr(lfd), uintptr(unsafe.Pointer(&sa.raw)),
		uintptr(unsafe.Pointer(&sa.len)), unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0, 0)
	if errno != 0 {
		return -1, netip.AddrPort{}, errno
	}
	return int(fd), sa.addrPort(), nil
}

// sockname returns the local address of the socket fd.
func (sa *sockaddr) sockname(fd int) (netip.AddrPort, error) {
	sa.len = unix.SizeofSockaddrAny
	_, _, errno := unix.RawSyscall(unix.SYS_GETSOCKNAME, uintptr(fd), uintptr(unsafe.Pointer(&sa.raw)), uintptr(unsafe.Pointer(&sa.len)))
	if errno != 0 {
		return netip.AddrPort{}, errno
	}
	return sa.addrPort(), nil
}

// connect starts a connection from the non-blocking socket fd to addr;
// it normally returns EINPROGRESS.
func (sa *sockaddr) connect(fd int, addr netip.AddrPort) error {
	sa.set(addr)
	_, _, errno := unix.Syscall(unix.SYS_CONNECT, uintptr(fd), uintptr(unsafe.Pointer(&sa.raw)), uintptr(sa.len))
	if errno != 0 {
		return errno
	}
	return nil
}

func (sa *sockaddr) set(addr netip.AddrPort) {
	sa.raw = unix.RawSockaddrAny{}
	b := (*[unix.SizeofSockaddrAny]byte)(unsafe.Pointer(&sa.raw))
	ip := addr.Addr().Unmap()
	if ip.Is4() {
		binary.NativeEndian.PutUint16(b[0:], unix.AF_INET)
		binary.BigEndian.PutUint16(b[2:], addr.Port())
		a := ip.As4()
		copy(b[4:8], a[:])
		sa.len = unix.SizeofSockaddrInet4
		return
	}
	binary.NativeEndian.PutUint16(b[0:], unix.AF_INET6)
	binary.BigEndian.PutUint16(b[2:], addr.Port())
	a := ip.As16()
	copy(b[8:24], a[:])
	sa.len = unix.SizeofSockaddrInet6
}

func (sa *sockaddr) addrPort() netip.AddrPort {
	b := (*[unix.SizeofSockaddrAny]byte)(unsafe.Pointer(&sa.raw))
	ap, err := parseSockaddr(b[:min(int(sa.len), len(b))])
	if err != nil {
		return netip.AddrPort{}
	}
	return ap
}

// family is the socket domain for connecting to addr.
func family(addr netip.AddrPort) int {
	if addr.Addr().Unmap().Is4() {
		return unix.AF_INET
	}
	return unix.AF_INET6
}

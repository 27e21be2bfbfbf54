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
	fd, _, errno := unix.RawSyscall6(unix.SYS_ACCEPT4, uintptr(lfd), uintptr(unsafe.Pointer(&sa.raw)),
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
	_, _, errno := unix.RawSyscall(unix.SYS_CONNECT, uintptr(fd), uintptr(unsafe.Pointer(&sa.raw)), uintptr(sa.len))
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

// The loop's per-connection calls go through RawSyscall: every socket and
// pipe is non-blocking, so none of them can block, and a plain Syscall
// would tell the scheduler the goroutine may: a long splice (the kernel
// does the loopback receiver's work inline) then gets its P handed to
// another thread, and the runtime's monitor thread polls every 20µs while
// that keeps happening. Only epoll_wait blocks, and it uses Syscall.

func rawRead(fd int, p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	n, _, errno := unix.RawSyscall(unix.SYS_READ, uintptr(fd), uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
	if errno != 0 {
		return 0, errno
	}
	return int(n), nil
}

func rawWrite(fd int, p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	n, _, errno := unix.RawSyscall(unix.SYS_WRITE, uintptr(fd), uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
	if errno != 0 {
		return 0, errno
	}
	return int(n), nil
}

func rawSplice(in, out, n int) (int, error) {
	m, _, errno := unix.RawSyscall6(unix.SYS_SPLICE, uintptr(in), 0, uintptr(out), 0, uintptr(n), spliceFlags)
	if errno != 0 {
		return 0, errno
	}
	return int(m), nil
}

func rawClose(fd int) {
	unix.RawSyscall(unix.SYS_CLOSE, uintptr(fd), 0, 0)
}

func rawShutdownWrite(fd int) {
	unix.RawSyscall(unix.SYS_SHUTDOWN, uintptr(fd), unix.SHUT_WR, 0)
}

func rawSocket(family int) (int, error) {
	fd, _, errno := unix.RawSyscall(unix.SYS_SOCKET, uintptr(family), unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if errno != 0 {
		return -1, errno
	}
	return int(fd), nil
}

// setNoDelay turns off Nagle, so small TLS flights go out at once.
func setNoDelay(fd int) {
	one := int32(1)
	unix.RawSyscall6(unix.SYS_SETSOCKOPT, uintptr(fd), unix.IPPROTO_TCP, unix.TCP_NODELAY, uintptr(unsafe.Pointer(&one)), 4, 0)
}

// setResetOnClose makes close send a reset (SO_LINGER 0).
func setResetOnClose(fd int) {
	l := unix.Linger{Onoff: 1, Linger: 0}
	unix.RawSyscall6(unix.SYS_SETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_LINGER, uintptr(unsafe.Pointer(&l)), unsafe.Sizeof(l), 0)
}

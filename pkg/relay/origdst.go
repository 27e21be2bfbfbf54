package relay

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"unsafe"

	"golang.org/x/sys/unix"
)

// SO_ORIGINAL_DST and IP6T_SO_ORIGINAL_DST share option number 80; they
// differ by level (SOL_IP / SOL_IPV6) and by the sockaddr they return.
const soOriginalDst = 80

// OriginalDst returns the address the client dialed before a NAT
// redirect rewrote it, as recorded by conntrack for c.
//
// It is meant for connections accepted through a NAT redirect. A socket
// accepted through TPROXY needs no lookup: its LocalAddr already is the
// original destination. Connections that conntrack does not track fail
// with ENOENT.
//
// An IPv4 client of a dual-stack (IPv6) listener is looked up as IPv4;
// the result is always unmapped.
func OriginalDst(c *net.TCPConn) (netip.AddrPort, error) {
	la, ok := c.LocalAddr().(*net.TCPAddr)
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("original destination: no local address")
	}
	v4 := la.AddrPort().Addr().Unmap().Is4()
	rc, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	var dst netip.AddrPort
	var derr error
	err = rc.Control(func(fd uintptr) { dst, derr = originalDst(int(fd), v4) })
	if err == nil {
		err = derr
	}
	return dst, err
}

// originalDst asks conntrack, through the socket fd, where its connection
// was addressed before NAT; v4 selects the IPv4 lookup.
func originalDst(fd int, v4 bool) (netip.AddrPort, error) {
	var buf [unix.SizeofSockaddrInet6]byte
	var n int
	var err error
	if v4 {
		n, err = getsockopt(fd, unix.SOL_IP, soOriginalDst, buf[:unix.SizeofSockaddrInet4])
	} else {
		n, err = getsockopt(fd, unix.SOL_IPV6, soOriginalDst, buf[:])
	}
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("original destination: %w", err)
	}
	return parseSockaddr(buf[:n])
}

// parseSockaddr decodes a sockaddr_in or sockaddr_in6 as the kernel
// writes it: family in host order, port in network order.
func parseSockaddr(b []byte) (netip.AddrPort, error) {
	if len(b) < 2 {
		return netip.AddrPort{}, fmt.Errorf("original destination: short sockaddr (%d bytes)", len(b))
	}
	family := binary.NativeEndian.Uint16(b[0:2])
	switch {
	case family == unix.AF_INET && len(b) >= unix.SizeofSockaddrInet4:
		addr := netip.AddrFrom4([4]byte(b[4:8]))
		return netip.AddrPortFrom(addr, binary.BigEndian.Uint16(b[2:4])), nil
	case family == unix.AF_INET6 && len(b) >= unix.SizeofSockaddrInet6:
		addr := netip.AddrFrom16([16]byte(b[8:24])).Unmap()
		return netip.AddrPortFrom(addr, binary.BigEndian.Uint16(b[2:4])), nil
	}
	return netip.AddrPort{}, fmt.Errorf("original destination: unexpected sockaddr family %d, %d bytes", family, len(b))
}

func getsockopt(fd, level, opt int, buf []byte) (int, error) {
	l := uint32(len(buf))
	_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt),
		uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&l)), 0)
	if errno != 0 {
		return 0, errno
	}
	return int(l), nil
}

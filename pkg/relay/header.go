package relay

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// rawWritev2 writes a then b in one writev(2): a dial header and the
// ClientHello leave in one system call and, usually, one segment, without
// copying the hello behind the header first. a must not be empty.
func rawWritev2(fd int, a, b []byte) (int, error) {
	iov := [2]unix.Iovec{{Base: &a[0]}, {}}
	iov[0].SetLen(len(a))
	n := 1
	if len(b) > 0 {
		iov[1].Base = &b[0]
		iov[1].SetLen(len(b))
		n = 2
	}
	m, _, errno := unix.RawSyscall(unix.SYS_WRITEV, uintptr(fd), uintptr(unsafe.Pointer(&iov[0])), uintptr(n))
	if errno != 0 {
		return 0, errno
	}
	return int(m), nil
}

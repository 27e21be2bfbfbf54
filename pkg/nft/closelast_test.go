package nft

import (
	"fmt"
	"os"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"
)

// socketFDs lists this process's descriptors that refer to socket inode ino.
func socketFDs(t *testing.T, ino string) []int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	var fds []int
	for _, e := range ents {
		if target, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && target == "socket:["+ino+"]" {
			n, _ := strconv.Atoi(e.Name())
			fds = append(fds, n)
		}
	}
	return fds
}

// At exit the kernel closes descriptors in ascending order and deletes owner
// tables when the socket's last descriptor goes: the socket must therefore
// also sit above every descriptor a proxied connection could get, so
// connections are reset through the reverse NAT before the tables vanish.
func TestOwnerSocketIsClosedLastAtExit(t *testing.T) {
	ns := newNetns(t)
	var b *Backend
	var err error
	inNetns(t, ns, func() { b, err = Open(Options{}) })
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if b.lastFD < 0 {
		t.Fatal("no high duplicate of the owner socket")
	}
	var st unix.Stat_t
	if err := unix.Fstat(b.lastFD, &st); err != nil {
		t.Fatal(err)
	}
	fds := socketFDs(t, fmt.Sprint(st.Ino))
	if len(fds) != 2 {
		t.Fatalf("owner socket has descriptors %v, want the socket and its high duplicate", fds)
	}
	var lim unix.Rlimit
	unix.Getrlimit(unix.RLIMIT_NOFILE, &lim)
	want := int(min(lim.Cur-1, 1<<16-1))
	if b.lastFD < want {
		t.Errorf("duplicate at fd %d, want >= %d (above any connection's descriptor)", b.lastFD, want)
	}
	b.Close()
	if fds := socketFDs(t, fmt.Sprint(st.Ino)); len(fds) != 0 {
		t.Errorf("after Close the socket still has descriptors %v: the owner tables would outlive Close", fds)
	}
}

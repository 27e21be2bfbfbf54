package relay

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"io"
	"net"
	"net/netip"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestParseSockaddr(t *testing.T) {
	v4 := make([]byte, unix.SizeofSockaddrInet4)
	binary.NativeEndian.PutUint16(v4, unix.AF_INET)
	binary.BigEndian.PutUint16(v4[2:], 443)
	copy(v4[4:], []byte{198, 18, 0, 1})

	v6 := make([]byte, unix.SizeofSockaddrInet6)
	binary.NativeEndian.PutUint16(v6, unix.AF_INET6)
	binary.BigEndian.PutUint16(v6[2:], 8443)
	copy(v6[8:], netip.MustParseAddr("fd00::1").AsSlice())

	mapped := append([]byte(nil), v6...)
	copy(mapped[8:], netip.MustParseAddr("::ffff:198.18.0.2").AsSlice())

	for _, tc := range []struct {
		name string
		in   []byte
		want string // "" means an error
	}{
		{"ipv4", v4, "198.18.0.1:443"},
		{"ipv6", v6, "[fd00::1]:8443"},
		{"v4-mapped is unmapped", mapped, "198.18.0.2:8443"},
		{"truncated ipv4", v4[:8], ""},
		{"truncated ipv6", v6[:20], ""},
		{"empty", nil, ""},
		{"unknown family", append([]byte{1, 0}, v4[2:]...), ""},
	} {
		got, err := parseSockaddr(tc.in)
		switch {
		case tc.want == "" && err == nil:
			t.Errorf("%s: got %v, want an error", tc.name, got)
		case tc.want != "" && (err != nil || got.String() != tc.want):
			t.Errorf("%s: got %v, %v, want %s", tc.name, got, err, tc.want)
		}
	}
}

// redirectNetns makes a private network namespace with 198.18.0.1 and
// fd00::1 on its loopback and the given NAT redirect rules on output.
func redirectNetns(t *testing.T, rules ...string) *netns {
	t.Helper()
	requireRoot(t)
	ns := newNetns(t)
	ns.run(t, "ip link set lo up",
		"ip addr add 198.18.0.1/32 dev lo",
		"ip -6 addr add fd00::1/128 dev lo nodad")
	ns.nft(t, "table inet rltest {\n\tchain out {\n\t\ttype nat hook output priority -110;\n\t\t"+
		strings.Join(rules, "\n\t\t")+"\n\t}\n}\n")
	return ns
}

// TestOriginalDst redirects connections in a private network namespace
// and checks that OriginalDst recovers the address the client dialed,
// for IPv4, IPv6 and IPv4 through a dual-stack listener.
func TestOriginalDst(t *testing.T) {
	ns := redirectNetns(t, "tcp dport 443 redirect to :21443", "tcp dport 444 redirect to :21444")

	var dualStack, v4Only net.Listener
	ns.do(t, func() (err error) {
		if dualStack, err = net.Listen("tcp", "[::]:21443"); err != nil {
			return err
		}
		v4Only, err = net.Listen("tcp4", "0.0.0.0:21444")
		return err
	})
	t.Cleanup(func() { dualStack.Close(); v4Only.Close() })

	for _, tc := range []struct {
		name string
		l    net.Listener
		dial string
	}{
		{"ipv4 on v4 listener", v4Only, "198.18.0.1:444"},
		{"ipv4 on dual-stack listener", dualStack, "198.18.0.1:443"},
		{"ipv6", dualStack, "[fd00::1]:443"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var c net.Conn
			ns.do(t, func() (err error) {
				c, err = net.Dial("tcp", tc.dial)
				return err
			})
			defer c.Close()
			a, err := tc.l.Accept()
			if err != nil {
				t.Fatal(err)
			}
			defer a.Close()
			// The redirect really happened: the socket is on the proxy port.
			if lp := a.LocalAddr().(*net.TCPAddr).Port; lp == 443 || lp == 444 {
				t.Fatalf("accepted on port %d: no redirect", lp)
			}
			got, err := OriginalDst(a.(*net.TCPConn))
			if err != nil || got.String() != tc.dial {
				t.Errorf("OriginalDst = %v, %v; want %s", got, err, tc.dial)
			}
		})
	}
}

// TestConnOriginalDst serves an Engine on a listener inside a private
// network namespace that redirects port 443 to it, and checks what Route
// sees: Conn.OriginalDst is the address the client dialed, LocalAddr the
// redirect target, Client the client's plain (unmapped) address. The
// engine's loops and its backend stay in the test's own namespace.
func TestConnOriginalDst(t *testing.T) {
	ns := redirectNetns(t, "tcp dport 443 redirect to :21443")

	type seen struct {
		client, local, orig netip.AddrPort
		err                 error
	}
	routed := make(chan seen, 4)
	back := listen(t)
	e, err := NewEngine(Config{
		Route: func(c *Conn) (netip.AddrPort, string) {
			s := seen{client: c.Client}
			s.local, _ = c.LocalAddr()
			s.orig, s.err = c.OriginalDst()
			routed <- s
			return back.Addr().(*net.TCPAddr).AddrPort(), "back"
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)

	var ln *net.TCPListener
	ns.do(t, func() (err error) {
		ln, err = net.ListenTCP("tcp", &net.TCPAddr{Port: 21443}) // dual-stack
		return err
	})
	f := listenerFile(t, ln)
	t.Cleanup(func() { f.Close() })
	if err := e.Serve(int(f.Fd())); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.StopAccepting) // runs before f.Close

	for _, tc := range []struct {
		name, dial, local string
	}{
		{"ipv4 on dual-stack listener", "198.18.0.1:443", "127.0.0.1:21443"},
		{"ipv6", "[fd00::1]:443", "[::1]:21443"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var c net.Conn
			ns.do(t, func() (err error) {
				c, err = net.Dial("tcp", tc.dial)
				return err
			})
			defer c.Close()
			c.SetDeadline(time.Now().Add(time.Minute))
			c.Write([]byte("x"))
			var s seen
			select {
			case s = <-routed:
			case <-time.After(10 * time.Second):
				t.Fatal("the engine did not route the connection")
			}
			if s.err != nil || s.orig.String() != tc.dial {
				t.Errorf("OriginalDst = %v, %v; want %s", s.orig, s.err, tc.dial)
			}
			if s.local.String() != tc.local {
				t.Errorf("LocalAddr = %v, want %s (where the redirect of a local connection leads)", s.local, tc.local)
			}
			client := c.LocalAddr().(*net.TCPAddr).AddrPort()
			if s.client != client {
				t.Errorf("Client = %v, want %v", s.client, client)
			}
			// And the connection is proxied to the backend outside the namespace.
			back.SetDeadline(time.Now().Add(10 * time.Second))
			b, err := back.Accept()
			if err != nil {
				t.Fatal(err)
			}
			defer b.Close()
			if got, err := io.ReadAll(io.LimitReader(b, 1)); err != nil || string(got) != "x" {
				t.Errorf("backend read %q, %v", got, err)
			}
		})
	}
}

type netns struct{ name string }

// newNetns creates a network namespace removed when the test ends.
func newNetns(t *testing.T) *netns {
	t.Helper()
	var b [4]byte
	rand.Read(b[:])
	ns := &netns{name: "rl-" + hex.EncodeToString(b[:])}
	if out, err := exec.Command("ip", "netns", "add", ns.name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", ns.name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", ns.name, err, out)
		}
	})
	return ns
}

// run runs ip commands inside the namespace.
func (ns *netns) run(t *testing.T, cmds ...string) {
	t.Helper()
	for _, c := range cmds {
		args := append([]string{"-n", ns.name}, strings.Fields(c)[1:]...)
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v: %s", c, err, out)
		}
	}
}

func (ns *netns) nft(t *testing.T, ruleset string) {
	t.Helper()
	cmd := exec.Command("ip", "netns", "exec", ns.name, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(ruleset)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft: %v: %s", err, out)
	}
}

// do runs f on an OS thread switched into the namespace, so sockets f
// creates live there. The thread is never unlocked: it exits with the
// goroutine instead of returning to the scheduler in the wrong namespace.
func (ns *netns) do(t *testing.T, f func() error) {
	t.Helper()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		fd, err := unix.Open("/run/netns/"+ns.name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			errc <- err
			return
		}
		defer unix.Close(fd)
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			errc <- err
			return
		}
		errc <- f()
	}()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}

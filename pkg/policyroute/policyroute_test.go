package policyroute

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"

	"github.com/mdlayher/netlink"
	"github.com/mdlayher/netlink/nltest"
	"golang.org/x/sys/unix"
)

var cfg = Config{Mark: 0x1000, Table: 21443, Priority: 1000}

// le32 spells a host-endian u32 attribute the way the uapi defines it,
// independent of the code under test (this package runs on little endian).
func le32(v uint32) []byte { return []byte{byte(v), byte(v >> 8), byte(v >> 16), byte(v >> 24)} }

func attr(typ uint16, data []byte) []byte {
	n := 4 + len(data)
	b := []byte{byte(n), byte(n >> 8), byte(typ), byte(typ >> 8)}
	b = append(b, data...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

func TestInstallMessages(t *testing.T) {
	lo, err := net.InterfaceByName("lo")
	if err != nil {
		t.Skip("no lo interface")
	}
	var sent []netlink.Message
	stale := Entry{Family: unix.AF_INET, Mark: 0x1000, Mask: 0x1000, Priority: 1000, Table: 21443}
	c := nltest.Dial(answering(func(req []netlink.Message) ([]netlink.Message, error) {
		m := req[0]
		sent = append(sent, m)
		if m.Header.Flags&netlink.Dump == netlink.Dump {
			if m.Header.Type == unix.RTM_GETRULE && m.Data[0] == unix.AF_INET {
				// A rule a killed instance left, and one that is not ours.
				other := Entry{Family: unix.AF_INET, Mark: 0xca6c, Mask: 0xffffffff, Priority: 5000, Table: 51820}
				return dump(dumped(stale.message(true), unix.RTM_NEWRULE), dumped(other.message(true), unix.RTM_NEWRULE)), nil
			}
			return dump(), nil
		}
		return []netlink.Message{{Header: netlink.Header{Type: netlink.Error}, Data: make([]byte, 4)}}, nil
	}))
	defer c.Close()
	if err := Install(c, cfg); err != nil {
		t.Fatal(err)
	}
	var changes []netlink.Message
	for _, m := range sent {
		if m.Header.Flags&netlink.Dump != netlink.Dump {
			changes = append(changes, m)
		}
	}
	if len(changes) != 5 {
		t.Fatalf("%d changes, want the stale rule deleted, then a route and a rule per family: %+v", len(changes), changes)
	}
	del := changes[0]
	if del.Header.Type != unix.RTM_DELRULE || !bytes.Contains(del.Data, attr(fraTable, le32(21443))) {
		t.Errorf("first change %+v: want the stale rule of our table deleted", del)
	}
	for i, fam := range []byte{unix.AF_INET, unix.AF_INET6} {
		route, rule := changes[1+2*i], changes[2+2*i]
		wantRoute := append([]byte{fam, 0, 0, 0, 0, unix.RTPROT_BOOT, unix.RT_SCOPE_HOST, unix.RTN_LOCAL, 0, 0, 0, 0},
			append(attr(rtaTable, le32(21443)), attr(rtaOIF, le32(uint32(lo.Index)))...)...)
		if route.Header.Type != unix.RTM_NEWROUTE || route.Header.Flags != netlink.Request|netlink.Acknowledge|netlink.Create|netlink.Excl ||
			!bytes.Equal(route.Data, wantRoute) {
			t.Errorf("family %d route:\n got %x\nwant %x", fam, route.Data, wantRoute)
		}
		wantRule := append([]byte{fam, 0, 0, 0, 0, 0, 0, frActToTbl, 0, 0, 0, 0},
			bytes.Join([][]byte{attr(fraPriority, le32(1000)), attr(fraFwmark, le32(0x1000)),
				attr(fraFwmask, le32(0x1000)), attr(fraTable, le32(21443))}, nil)...)
		if rule.Header.Type != unix.RTM_NEWRULE || !bytes.Equal(rule.Data, wantRule) {
			t.Errorf("family %d rule:\n got %x\nwant %x", fam, rule.Data, wantRule)
		}
	}
}

// answering wraps a fake kernel: replies carry the request's sequence
// number and port, and a receive with no request pending gets nothing.
func answering(fn nltest.Func) nltest.Func {
	return func(req []netlink.Message) ([]netlink.Message, error) {
		if len(req) == 0 {
			return nil, io.EOF
		}
		out, err := fn(req)
		for i := range out {
			out[i].Header.Sequence, out[i].Header.PID = req[0].Header.Sequence, req[0].Header.PID
		}
		return out, err
	}
}

// dump ends a dump's messages with NLMSG_DONE.
func dump(ms ...netlink.Message) []netlink.Message {
	return append(ms, netlink.Message{Header: netlink.Header{Type: netlink.Done, Flags: netlink.Multi}, Data: make([]byte, 4)})
}

// dumped turns a request into what a dump answers with.
func dumped(m netlink.Message, typ netlink.HeaderType) netlink.Message {
	m.Header = netlink.Header{Type: typ, Flags: netlink.Multi}
	return m
}

func TestInstallRejectsReservedTables(t *testing.T) {
	for _, tc := range []Config{{Mark: 1, Table: 254}, {Mark: 1, Table: 255}, {Mark: 0, Table: 100}, {Mark: 1}} {
		if err := Install(nil, tc); err == nil {
			t.Errorf("Install accepted %+v", tc)
		}
	}
}

func TestInstallUndoesOnError(t *testing.T) {
	var deletes int
	c := nltest.Dial(answering(func(req []netlink.Message) ([]netlink.Message, error) {
		m := req[0]
		switch {
		case m.Header.Flags&netlink.Dump == netlink.Dump && m.Header.Type == unix.RTM_GETROUTE && m.Data[0] == unix.AF_INET:
			r := Entry{Family: unix.AF_INET, Route: true, Table: 21443, Type: unix.RTN_LOCAL, OIF: 1}
			return dump(dumped(r.message(true), unix.RTM_NEWROUTE)), nil
		case m.Header.Flags&netlink.Dump == netlink.Dump:
			return dump(), nil
		case m.Header.Type == unix.RTM_NEWRULE:
			return nil, unix.EPERM
		case m.Header.Type == unix.RTM_DELROUTE:
			deletes++
		}
		return []netlink.Message{{Header: netlink.Header{Type: netlink.Error}, Data: make([]byte, 4)}}, nil
	}))
	defer c.Close()
	err := Install(c, cfg)
	if !errors.Is(err, unix.EPERM) || !strings.Contains(err.Error(), "rule") {
		t.Fatalf("Install = %v, want the rule's EPERM", err)
	}
	if deletes < 2 {
		t.Errorf("%d route deletions, want the stale one and the one just added (the fake dump shows one route each time)", deletes)
	}
}

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() == 0 {
		if _, err := exec.LookPath("ip"); err == nil {
			return
		}
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("test needs root and ip")
	}
	t.Skip("test needs root and ip")
}

// inNetns runs fn with a routing socket of a new network namespace.
func inNetns(t *testing.T, fn func(ns string, c *netlink.Conn)) {
	var b [4]byte
	rand.Read(b[:])
	ns := "pr-" + hex.EncodeToString(b[:])
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
	exec.Command("ip", "-n", ns, "link", "set", "lo", "up").Run()
	cc := make(chan *netlink.Conn, 1)
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies in the namespace
		fd, err := unix.Open("/run/netns/"+ns, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err == nil {
			err = unix.Setns(fd, unix.CLONE_NEWNET)
			unix.Close(fd)
		}
		if err != nil {
			errc <- err
			return
		}
		c, err := Dial()
		if err != nil {
			errc <- err
			return
		}
		cc <- c
	}()
	select {
	case err := <-errc:
		t.Fatal(err)
	case c := <-cc:
		defer c.Close()
		fn(ns, c)
	}
}

func ipShow(t *testing.T, ns string, args ...string) string {
	out, err := exec.Command("ip", append([]string{"-n", ns}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("ip %v: %v: %s", args, err, out)
	}
	return string(out)
}

func TestRootInstallRemove(t *testing.T) {
	requireRoot(t)
	inNetns(t, func(ns string, c *netlink.Conn) {
		for range 2 { // twice: a second start replaces, never duplicates
			if err := Install(c, cfg); err != nil {
				t.Fatal(err)
			}
		}
		for _, v := range []string{"-4", "-6"} {
			rules := ipShow(t, ns, v, "rule", "show")
			if strings.Count(rules, "lookup 21443") != 1 || !strings.Contains(rules, "1000:\tfrom all fwmark 0x1000/0x1000 lookup 21443") {
				t.Errorf("ip %s rule:\n%s", v, rules)
			}
			if routes := ipShow(t, ns, v, "route", "show", "table", "21443"); !strings.HasPrefix(routes, "local default dev lo") {
				t.Errorf("ip %s route show table 21443:\n%s", v, routes)
			}
		}
		es, err := List(c, cfg)
		if err != nil || len(es) != 4 {
			t.Fatalf("List = %v, %v; want a rule and a route per family", es, err)
		}
		if got := Describe(es); !strings.Contains(got, "ip -6 rule: pref 1000 fwmark 0x1000/0x1000 lookup 21443") ||
			!strings.Contains(got, "ip -4 route: local default dev lo table 21443") {
			t.Errorf("Describe:\n%s", got)
		}
		removed, err := Remove(c, cfg)
		if err != nil || len(removed) != 4 {
			t.Fatalf("Remove = %v, %v", removed, err)
		}
		for _, v := range []string{"-4", "-6"} {
			if rules := ipShow(t, ns, v, "rule", "show"); strings.Contains(rules, "21443") {
				t.Errorf("ip %s rule after Remove:\n%s", v, rules)
			}
		}
	})
}

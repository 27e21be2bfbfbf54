package nft

import (
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/intercept"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

func ctTuple(t *testing.T, src, dst net.IP, proto uint8, sport, dport uint16) []byte {
	ipAttrs := []netlink.Attribute{{Type: 1, Data: src.To4()}, {Type: 2, Data: dst.To4()}}
	if src.To4() == nil {
		ipAttrs = []netlink.Attribute{{Type: 3, Data: src}, {Type: 4, Data: dst}}
	}
	return marshal(t,
		netlink.Attribute{Type: unix.NLA_F_NESTED | 1, Data: marshal(t, ipAttrs...)},
		netlink.Attribute{Type: unix.NLA_F_NESTED | 2, Data: marshal(t,
			netlink.Attribute{Type: 1, Data: []byte{proto}},
			netlink.Attribute{Type: 2, Data: binary.BigEndian.AppendUint16(nil, sport)},
			netlink.Attribute{Type: 3, Data: binary.BigEndian.AppendUint16(nil, dport)},
		)},
	)
}

func ctMsg(t *testing.T, fam byte, seq uint32, orig, reply []byte, id uint32) netlink.Message {
	as := []netlink.Attribute{{Type: unix.NLA_F_NESTED | 2, Data: reply}, {Type: 12, Data: binary.BigEndian.AppendUint32(nil, id)}}
	if orig != nil {
		as = append([]netlink.Attribute{{Type: unix.NLA_F_NESTED | 1, Data: orig}}, as...)
	}
	return netlink.Message{
		Header: netlink.Header{Type: 0x0100, Flags: netlink.Multi, Sequence: seq},
		Data:   append([]byte{fam, 0, 0, 0}, marshal(t, as...)...),
	}
}

func TestDeleteConntrackSelectsRedirectedEntries(t *testing.T) {
	c4, s4 := net.ParseIP("198.18.0.2"), net.ParseIP("198.18.0.1")
	c6, s6 := net.ParseIP("fd00::2"), net.ParseIP("fd00::1")
	redirected4 := ctTuple(t, c4, s4, 6, 40000, 443)
	redirected6 := ctTuple(t, c6, s6, 6, 40001, 443)
	var deletes []netlink.Message
	k := &fakeKernel{t: t}
	k.get = func(req netlink.Message) []netlink.Message {
		switch req.Header.Type {
		case 0x0101: // IPCTNL_MSG_CT_GET
			if req.Header.Flags&netlink.Dump != netlink.Dump || req.Data[0] != unix.AF_UNSPEC {
				t.Errorf("dump request %+v", req)
			}
			seq := req.Header.Sequence
			return dumpDone(req, []netlink.Message{
				ctMsg(t, unix.AF_INET, seq, redirected4, ctTuple(t, s4, c4, 6, 21443, 40000), 1),
				// Straight to the listener (a local diagnostic): not ours.
				ctMsg(t, unix.AF_INET, seq, ctTuple(t, c4, s4, 6, 40002, 21443), ctTuple(t, s4, c4, 6, 21443, 40002), 2),
				// Unrelated connection.
				ctMsg(t, unix.AF_INET, seq, ctTuple(t, c4, s4, 6, 40003, 8080), ctTuple(t, s4, c4, 6, 8080, 40003), 3),
				// UDP with the same ports.
				ctMsg(t, unix.AF_INET, seq, ctTuple(t, c4, s4, 17, 40004, 443), ctTuple(t, s4, c4, 17, 21443, 40004), 4),
				// No original tuple: a delete without one would flush everything.
				ctMsg(t, unix.AF_INET, seq, nil, ctTuple(t, s4, c4, 6, 21443, 40005), 5),
				ctMsg(t, unix.AF_INET6, seq, redirected6, ctTuple(t, s6, c6, 6, 21443, 40001), 6),
				// Gone by the time we delete it.
				ctMsg(t, unix.AF_INET, seq, ctTuple(t, c4, s4, 6, 40006, 443), ctTuple(t, s4, c4, 6, 21443, 40006), 7),
			})
		case 0x0102: // IPCTNL_MSG_CT_DELETE
			deletes = append(deletes, req)
			if bytes.Equal(msgAttrs(t, req)[12], []byte{0, 0, 0, 7}) {
				return ack(req, int(unix.ENOENT))
			}
			return ack(req, 0)
		}
		t.Errorf("unexpected request %#x", uint16(req.Header.Type))
		return nil
	}
	n, err := deleteConntrack(k.conn(), 21443)
	if err != nil {
		t.Fatal(err)
	}
	if n != 2 {
		t.Errorf("deleted %d, want 2 (the ENOENT one does not count)", n)
	}
	if len(deletes) != 3 {
		t.Fatalf("%d delete requests, want 3", len(deletes))
	}
	for i, want := range []struct {
		fam   byte
		tuple []byte
		id    byte
	}{{unix.AF_INET, redirected4, 1}, {unix.AF_INET6, redirected6, 6}} {
		d := deletes[i]
		a := msgAttrs(t, d)
		if d.Header.Flags != netlink.Request|netlink.Acknowledge || d.Data[0] != want.fam ||
			!bytes.Equal(a[1], want.tuple) || !bytes.Equal(a[12], []byte{0, 0, 0, want.id}) || len(a) != 2 {
			t.Errorf("delete %d: flags %v family %d attrs %x", i, d.Header.Flags, d.Data[0], a)
		}
	}
}

func TestParseCtEntryBounded(t *testing.T) {
	for _, data := range [][]byte{{2, 0, 0, 0}, {2, 0, 0, 0, 8, 0, 1, 0, 1}, {10, 0, 0, 0, 4, 0, 1, 0, 4, 0, 2, 0}} {
		if _, ok := parseCtEntry(data, 21443); ok {
			t.Errorf("malformed %x accepted", data)
		}
	}
}

// newPair creates a server and a client namespace joined by a veth pair:
// server 198.18.0.1/24, client 198.18.0.2/24.
func newPair(t *testing.T) (server, client string) {
	server, client = newNetns(t), newNetns(t)
	veth := "v" + server[3:]
	run(t, server, "ip", "link", "add", veth, "type", "veth", "peer", "name", veth+"p", "netns", client)
	run(t, server, "ip", "addr", "add", "198.18.0.1/24", "dev", veth)
	run(t, server, "ip", "link", "set", veth, "up")
	run(t, client, "ip", "addr", "add", "198.18.0.2/24", "dev", veth+"p")
	run(t, client, "ip", "link", "set", veth+"p", "up")
	return server, client
}

// tagServer accepts connections on ln and answers each line with tag+line.
func tagServer(t *testing.T, ln net.Listener, tag string) {
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 64)
				for {
					n, err := c.Read(buf)
					if err != nil {
						return
					}
					if _, err := c.Write(append([]byte(tag), buf[:n]...)); err != nil {
						return
					}
				}
			}()
		}
	}()
}

func listenIn(t *testing.T, ns, addr string) net.Listener {
	var ln net.Listener
	var err error
	inNetns(t, ns, func() { ln, err = net.Listen("tcp4", addr) })
	if err != nil {
		t.Fatal(err)
	}
	return ln
}

func dialIn(t *testing.T, ns, addr string) net.Conn {
	var c net.Conn
	var err error
	inNetns(t, ns, func() { c, err = net.DialTimeout("tcp4", addr, 5*time.Second) })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// ask sends a line and returns the answer ("" if the connection failed).
func ask(c net.Conn, line string) string {
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, line); err != nil {
		return ""
	}
	buf := make([]byte, 64)
	n, _ := c.Read(buf)
	return string(buf[:n])
}

// TestRootRedirectTraffic pins facts 1 and 6 of NETFILTER-NOTES with real
// connections: only SYNs are taken, in-flight redirected connections live
// through RemoveIntercept, and DeleteConntrack removes exactly their entries.
func TestRootRedirectTraffic(t *testing.T) {
	server, client := newPair(t)
	tagServer(t, listenIn(t, server, ":443"), "web:")
	tagServer(t, listenIn(t, server, ":21443"), "proxy:")
	tagServer(t, listenIn(t, server, ":8080"), "other:")

	before := dialIn(t, client, "198.18.0.1:443")
	if got := ask(before, "a"); got != "web:a" {
		t.Fatalf("before install: %q", got)
	}
	b := openIn(t, server)
	if err := b.Install(ruleSet(t, intercept.Redirect, intercept.IPv4)); err != nil {
		t.Fatal(err)
	}
	// Conntrack picks the old connection up mid-stream; it stays the web server's.
	if got := ask(before, "b"); got != "web:b" {
		t.Errorf("pre-existing connection after install: %q, want web:b", got)
	}
	redirected := dialIn(t, client, "198.18.0.1:443")
	if got := ask(redirected, "c"); got != "proxy:c" {
		t.Fatalf("new connection: %q, want proxy:c", got)
	}
	other := dialIn(t, client, "198.18.0.1:8080")
	if got := ask(other, "d"); got != "other:d" {
		t.Fatalf("port 8080: %q", got)
	}
	if err := b.RemoveIntercept(); err != nil {
		t.Fatal(err)
	}
	if got := ask(redirected, "e"); got != "proxy:e" {
		t.Errorf("redirected connection after RemoveIntercept: %q, want proxy:e (reverse NAT kept by the guard)", got)
	}
	if got := ask(dialIn(t, client, "198.18.0.1:443"), "f"); got != "web:f" {
		t.Errorf("new connection after RemoveIntercept: %q, want web:f", got)
	}

	redirected.Close()
	list := run(t, server, "conntrack", "-L", "-p", "tcp", "--reply-port-src", "21443")
	if !strings.Contains(list, "dport=443") {
		t.Fatalf("no conntrack entry of the redirected connection:\n%s", list)
	}
	var n int
	var err error
	inNetns(t, server, func() { n, err = DeleteConntrack(21443) })
	if err != nil {
		t.Fatal(err)
	}
	if n != 1 {
		t.Errorf("DeleteConntrack deleted %d entries, want 1", n)
	}
	if list := run(t, server, "conntrack", "-L", "-p", "tcp", "--reply-port-src", "21443"); strings.Contains(list, "dport=443") {
		t.Errorf("entry left:\n%s", list)
	}
	if list := run(t, server, "conntrack", "-L", "-p", "tcp", "--orig-port-dst", "8080"); !strings.Contains(list, "dport=8080") {
		t.Errorf("DeleteConntrack removed an unrelated entry:\n%s", list)
	}
	if got := ask(other, "g"); got != "other:g" {
		t.Errorf("unrelated connection after DeleteConntrack: %q", got)
	}
}

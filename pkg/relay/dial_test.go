package relay

import (
	"io"
	"net"
	"net/netip"
	"testing"
	"time"
)

// The source port is never the client's: with it, our dial and the
// intercepted connection would share one 4-tuple at the web server.
func TestPickSourcePortAvoidsClientPort(t *testing.T) {
	for _, avoid := range []uint16{sourcePortLow, sourcePortLow + 1, 32767, 5000} {
		for range 20000 {
			p := pickSourcePort(avoid)
			if p == avoid || p < sourcePortLow || p >= sourcePortLow+sourcePortCount {
				t.Fatalf("pickSourcePort(%d) = %d", avoid, p)
			}
		}
	}
}

// dialFrom runs one connection through an engine whose Route sets opts
// and returns what the backend saw as its peer and what Done reported.
func dialFrom(t *testing.T, opts func(c *Conn) DialOptions) (client, peer netip.AddrPort, r result) {
	t.Helper()
	h := newHarness(t, harnessOptions{Route: func(c *Conn, back netip.AddrPort) (netip.AddrPort, string) {
		c.Dial = opts(c)
		return back, "back"
	}})
	c := h.dial(t)
	defer c.Close()
	client = c.LocalAddr().(*net.TCPAddr).AddrPort()
	c.Write([]byte("not tls"))
	b := h.acceptBackend(t, 10*time.Second)
	peer = b.RemoteAddr().(*net.TCPAddr).AddrPort()
	if got, err := io.ReadAll(io.LimitReader(b, 7)); err != nil || string(got) != "not tls" {
		t.Fatalf("backend read %q, %v", got, err)
	}
	b.Close()
	c.Close()
	return client, peer, h.wait(t)
}

// Dialing from the client's address (here a loopback one, which needs no
// return route) binds a port below the clients' ephemeral ranges.
func TestDialFromClientAddress(t *testing.T) {
	requireRoot(t) // IP_TRANSPARENT needs CAP_NET_ADMIN
	for range 5 {
		client, peer, r := dialFrom(t, func(c *Conn) DialOptions {
			return DialOptions{Source: c.Client.Addr(), Mark: 0x1000}
		})
		if !r.FromClient || peer.Addr() != client.Addr() || peer.Port() == client.Port() ||
			peer.Port() < sourcePortLow || peer.Port() >= sourcePortLow+sourcePortCount {
			t.Fatalf("client %v, backend saw %v, FromClient %v: want the client's address on another port in [%d, %d)",
				client, peer, r.FromClient, sourcePortLow, sourcePortLow+sourcePortCount)
		}
	}
}

// A source that cannot be used for this backend (another family) falls
// back to a plain dial, reported as such.
func TestDialFallsBackToPlain(t *testing.T) {
	_, peer, r := dialFrom(t, func(*Conn) DialOptions {
		return DialOptions{Source: netip.MustParseAddr("fd00::1")}
	})
	if r.FromClient || r.End != EndClientClosed && r.End != EndBackendClosed || !peer.Addr().IsLoopback() {
		t.Fatalf("FromClient %v, end %q, peer %v: want a plain dial that works", r.FromClient, r.End, peer)
	}
}

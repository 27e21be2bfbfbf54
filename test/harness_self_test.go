package e2e

import (
	"testing"
	"time"
)

// TestHarnessWithoutProxy checks the harness itself, with no proxy: the
// namespaces route both families, the servers identify themselves and see
// the client's address, shaped ClientHellos are valid TLS, the ACME
// responder is local only, and the load generator counts.
func TestHarnessWithoutProxy(t *testing.T) {
	t.Parallel()
	s := NewSite(t)
	for _, f := range families {
		for _, c := range routeCases {
			a := s.Cli.MustRequest(t, s.ServerAddr(f, 443), c.alpn)
			requireDirect(t, s, f, a)
			if c.server == "web" && a.ALPN != c.wantALPN {
				t.Errorf("%v offering %q: web negotiated %q, want %q", f, c.alpn, a.ALPN, c.wantALPN)
			}
		}
		conn, err := s.Cli.Dial(timeout(t, 5*time.Second), s.ServerAddr(f, 443))
		if err != nil {
			t.Fatal(err)
		}
		shaped := &helloShaper{Conn: conn, Records: []int{1, 7, 100}, Segment: 10, Pause: time.Millisecond}
		sess, err := OpenTLSOver(timeout(t, 10*time.Second), shaped, []string{"h2"})
		if err != nil {
			t.Fatalf("%v: shaped hello: %v", f, err)
		}
		if err := sess.Echo("shaped"); err != nil {
			t.Fatal(err)
		}
		sess.Close()
	}
	if a := s.Srv.MustRequest(t, ACMEAddr, []string{ACMEALPN}); a.Server != "acme" || a.ALPN != ACMEALPN {
		t.Errorf("ACME responder answered %+v", a)
	}
	if conn, err := s.Cli.Dial(timeout(t, 2*time.Second), s.ServerAddr(IPv4, ACMEAddr.Port())); err == nil {
		conn.Close()
		t.Error("the ACME responder is reachable from the client namespace")
	}
	if got := len(s.Web.Peers()); got != 2*len(routeCases)+2 {
		t.Errorf("web server recorded %d connections, want %d", got, 2*len(routeCases)+2)
	}

	load := StartLoad(t, s.Cli, 50, "web", LoadTarget{Addr: s.ServerAddr(IPv4, 443)}, LoadTarget{Addr: s.ServerAddr(IPv6, 443), ALPN: []string{ACMEALPN}})
	time.Sleep(time.Second)
	r := load.Stop()
	if r.Failures != 0 || r.Requests < 25 || r.ByPeer[s.CliV4] == 0 || r.ByPeer[s.CliV6] == 0 {
		t.Errorf("load without proxy: %+v", r)
	}
}

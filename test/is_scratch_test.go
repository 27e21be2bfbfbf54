package e2e

import (
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// Scratch (never committed): the site with lego behind a plain nft redirect.
func TestIsScratch(t *testing.T) {
	issRequire(t, "pebble", "pebble-challtestsrv", "nginx", "lego")
	s := newIssSite(t, true)
	load := s.startLoad(issLoadWorkers, issLoadPause)
	load.waitGood(20)
	s.Srv.MustExec(t, "nft", "add table inet istest; add chain inet istest pre { type nat hook prerouting priority dstnat; }; add rule inet istest pre tcp dport 443 redirect to :31443")
	dir := filepath.Join(s.dir, "lego")
	args := s.legoArgs(dir)
	args[7] = ":31443"
	p := s.start(s.Srv, "lego", args...)
	err := p.wait(time.Minute)
	t.Logf("lego %v\n%s", err, p.out.String())
	s.Srv.MustExec(t, "nft", "delete table inet istest")
	load.waitGood(20)
	load.halt()
	leaf := s.checkIssued(legoCertPath(dir))
	t.Logf("%v %v; %v", leaf.DNSNames, leaf.Issuer, load)
	out, _ := exec.Command("ip", "netns", "list").CombinedOutput()
	t.Logf("%s", out)
}

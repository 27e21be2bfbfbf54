package e2e

import (
	"path/filepath"
	"testing"
	"time"
)

func TestIsScratch(t *testing.T) {
	tools := issRequire(t)
	e := newIssEnv(t, tools, false)
	load := e.startLoad(4, 50*time.Millisecond)
	load.waitGood(t, 20)
	issRun(t, "ip", "netns", "exec", e.webNS, "nft", "add table ip istest; add chain ip istest pre { type nat hook prerouting priority dstnat; }; add rule ip istest pre tcp dport 443 redirect to :31443")
	dir := filepath.Join(e.dir, "lego")
	args := e.legoArgs(dir)
	args[5] = ":31443"
	p := e.start(e.webNS, "lego", []string{"LEGO_CA_CERTIFICATES=" + e.caPEM}, args...)
	err, ok := p.wait(time.Minute)
	t.Logf("lego %v %v\n%s", err, ok, p.out.String())
	issRun(t, "ip", "netns", "exec", e.webNS, "nft", "delete table ip istest")
	load.waitGood(t, 20)
	load.halt()
	leaf := e.checkIssued(filepath.Join(dir, "certificates", issTestDomain+".crt"))
	t.Logf("%v %v; %s", leaf.DNSNames, leaf.Issuer, load.report())
}

package e2e

// The host firewalls production hosts run, the real programs (issue 13):
// ufw and firewalld, each confined to the server namespace and to a
// private mount namespace, so that their configuration files, D-Bus
// socket and lock files never touch the machine's. requireHostUntouched
// checks that.

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// privateMounts starts the shell script of a firewall installer: a private
// mount namespace (unshare -m makes every mount private) with a tmpfs on
// /run, so lock files, the D-Bus socket and pid files stay in it.
const privateMounts = `set -eu
dir=$1
mount -t tmpfs acme-alpn-proxy-test /run
`

// installUfw enables the real ufw in ns as its documentation says, with a
// copy of the package's configuration bind-mounted over /etc/ufw and
// /etc/default/ufw. ufw is one-shot: its rules (iptables-nft, in the
// namespace's nftables) outlive the command.
func installUfw(t testing.TB, ns *Netns) {
	t.Helper()
	ufw := requireSbin(t, "ufw")
	requireTools(t, "unshare")
	requireHostUntouched(t)
	dir := t.TempDir()
	script := privateMounts + `
mkdir "$dir/etc-ufw"
cp -a /etc/ufw/. "$dir/etc-ufw/"
mount --bind "$dir/etc-ufw" /etc/ufw
cp /etc/default/ufw "$dir/default-ufw"
mount --bind "$dir/default-ufw" /etc/default/ufw
ufw=$2
"$ufw" default deny incoming
"$ufw" allow 443/tcp
"$ufw" --force enable
"$ufw" status verbose
`
	out := ns.MustExec(t, "unshare", "-m", "sh", "-c", script, "ufw-setup", dir, ufw)
	if !strings.Contains(out, "Status: active") || !strings.Contains(out, "443/tcp (v6)") {
		t.Fatalf("ufw did not come up as configured:\n%s", out)
	}
}

// installFirewalld runs the real firewalld in ns (nftables backend,
// default zone public plus the https service), on a private D-Bus system
// bus whose socket is at the usual /run/dbus/system_bus_socket of the
// private mount namespace, and /etc/firewalld a bind-mounted copy.
// t.Cleanup stops it (SIGTERM to its group: dbus-daemon too).
func installFirewalld(t testing.TB, ns *Netns) {
	t.Helper()
	firewalld, firewallCmd := requireSbin(t, "firewalld"), requireSbin(t, "firewall-cmd")
	dbusDaemon := requireSbin(t, "dbus-daemon")
	requireTools(t, "unshare", "nsenter")
	requireHostUntouched(t)
	dir := t.TempDir()
	// Everything allowed (only root's test programs are on it); no service
	// activation.
	busConf := `<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=/run/dbus/system_bus_socket</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="root"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
`
	if err := os.WriteFile(filepath.Join(dir, "bus.conf"), []byte(busConf), 0o600); err != nil {
		t.Fatal(err)
	}
	script := privateMounts + `
mkdir /run/dbus "$dir/etc-firewalld"
cp -a /etc/firewalld/. "$dir/etc-firewalld/"
sed -i -e 's/^FirewallBackend=.*/FirewallBackend=nftables/' -e 's/^DefaultZone=.*/DefaultZone=public/' "$dir/etc-firewalld/firewalld.conf"
mount --bind "$dir/etc-firewalld" /etc/firewalld
"$2" --config-file="$dir/bus.conf" --nofork --nopidfile &
i=0
while [ ! -S /run/dbus/system_bus_socket ]; do
	i=$((i + 1)); [ $i -lt 100 ] || { echo "no D-Bus socket" >&2; exit 1; }
	sleep 0.1
done
exec "$3" --nofork --nopid --log-target console
`
	p := startProc(t, ns, "firewalld", "unshare", "-m", "sh", "-c", script, "firewalld-setup", dir, dbusDaemon, firewalld)
	// ip netns exec, unshare and sh exec: the PID is firewalld's, in the
	// private mount namespace where firewall-cmd finds the bus.
	cmd := func(args ...string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		c := exec.CommandContext(ctx, "nsenter", append([]string{"-t", fmt.Sprint(p.cmd.Process.Pid), "-m", "-n", firewallCmd}, args...)...)
		out, err := c.CombinedOutput()
		return strings.TrimSpace(string(out)), err
	}
	for deadline := time.Now().Add(60 * time.Second); ; {
		out, err := cmd("--state")
		if err == nil && out == "running" {
			break
		}
		select {
		case <-p.done:
			t.Fatalf("firewalld exited: %v\n%s", p.err, p.out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("firewalld not running after 60 s: %s %v\n%s", out, err, p.out.String())
		}
		time.Sleep(200 * time.Millisecond)
	}
	if out, err := cmd("--add-service=https"); err != nil {
		t.Fatalf("firewall-cmd --add-service=https: %v: %s", err, out)
	}
	zone, _ := cmd("--get-default-zone")
	services, _ := cmd("--list-services")
	if zone != "public" || !strings.Contains(" "+services+" ", " https ") {
		t.Fatalf("firewalld: default zone %q with services %q, want public with https", zone, services)
	}
	if out := ns.MustExec(t, "nft", "list", "tables"); !strings.Contains(out, "inet firewalld") {
		t.Fatalf("firewalld's nftables table is missing (backend not nftables?): %s", out)
	}
}

// requireSbin returns the path of a program that may live in an sbin
// directory PATH lacks; missing, the test skips (fails in CI).
func requireSbin(t testing.TB, tool string) string {
	t.Helper()
	p := issLookPath(tool)
	if p == "" {
		skipOrFail(t, tool+" not installed (Debian packages: ufw firewalld dbus)")
	}
	return p
}

// hostConfig is what the firewall programs would change on the host were
// they not confined: their configuration, the system bus directory.
var hostConfig = []string{"/etc/ufw", "/etc/default/ufw", "/lib/ufw", "/etc/firewalld", "/var/lib/firewalld", "/run/dbus"}

// requireHostUntouched checks at cleanup that the host's own network
// namespace rule sets and hostConfig are as they were.
func requireHostUntouched(t testing.TB) {
	t.Helper()
	before := hostSnapshot(t)
	t.Cleanup(func() {
		if after := hostSnapshot(t); after != before {
			t.Errorf("the host changed during the test:\n--- before\n%s\n--- after\n%s", before, after)
		}
	})
}

func hostSnapshot(t testing.TB) string {
	var b strings.Builder
	for _, argv := range [][]string{{"nft", "list", "ruleset"}, {"iptables-save"}, {"ip6tables-save"}} {
		out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput()
		fmt.Fprintf(&b, "$ %s (%v)\n", strings.Join(argv, " "), err)
		for line := range strings.Lines(string(out)) {
			if !strings.HasPrefix(line, "#") { // iptables-save dates its output
				b.WriteString(line)
			}
		}
	}
	for _, root := range hostConfig {
		err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			fi, err := d.Info()
			if err != nil {
				return err
			}
			sum := ""
			if fi.Mode().IsRegular() {
				data, err := os.ReadFile(path)
				if err != nil {
					return err
				}
				sum = fmt.Sprintf("%x", sha256.Sum256(data))
			}
			fmt.Fprintf(&b, "%s %v %d %s %s\n", path, fi.Mode(), fi.Size(), fi.ModTime().UTC().Format(time.RFC3339Nano), sum)
			return nil
		})
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("snapshot of %s: %v", root, err)
		}
		if errors.Is(err, fs.ErrNotExist) {
			fmt.Fprintf(&b, "%s absent\n", root)
		}
	}
	return b.String()
}

// blockedByFirewall tells whether a dial error is what fw does to a
// connection it does not let in: a timeout (drop) or, for a rejecting
// firewall, an ICMP "administratively prohibited" (EHOSTUNREACH over IPv4,
// EACCES over IPv6).
func blockedByFirewall(fw hostFirewall, err error) bool {
	if fw.rejects {
		return errors.Is(err, syscall.EHOSTUNREACH) || errors.Is(err, syscall.EACCES)
	}
	return errors.Is(err, context.DeadlineExceeded) || isTimeout(err)
}

// TestFirewallIssuance issues a certificate with lego through the proxy
// behind each host firewall while nginx serves HTTPS load. In the default
// mode (tproxy) no request may fail. In redirect mode the result is the
// README's ("Two interception modes"): behind a firewall that lets in only
// 443, new HTTPS connections are blocked while the proxy runs; behind
// firewalld they go through the proxy.
func TestFirewallIssuance(t *testing.T) {
	for _, fw := range hostFirewalls {
		t.Run(fw.name, func(t *testing.T) {
			t.Parallel()
			t.Run("tproxy", func(t *testing.T) {
				issRunWrapper(t, Variant{Backend: "nft", Mode: "tproxy"}, false, func(s *issSite) {
					fw.install(t, s.Srv)
					requireFirewallBlocks(t, s.Env, fw)
				})
			})
			t.Run("redirect", func(t *testing.T) {
				issRequire(t, "pebble", "pebble-challtestsrv", "nginx")
				s := newIssSite(t, false)
				fw.install(t, s.Srv)
				requireFirewallBlocks(t, s.Env, fw)
				load := s.startLoad(issLoadWorkers, issLoadPause)
				load.waitGood(20)
				v := Variant{Backend: "nft", Mode: "redirect"}
				p := s.NewProxy(t, v)
				p.Start()
				for _, f := range families {
					target := s.ServerAddr(f, 443)
					if !fw.acceptsDNAT {
						if err := requireDialBlocked(s.Cli, fw, target); err != nil {
							t.Errorf("%v: behind %s in redirect mode: %v", f, fw.name, err)
						}
					} else if err := s.get(target, []string{"h2", "http/1.1"}); err != nil {
						t.Errorf("%v: HTTPS behind %s in redirect mode: %v", f, fw.name, err)
					}
				}
				if fw.acceptsDNAT {
					load.waitGood(20)
				}
				p.Stop()
				load.waitGood(20) // the web server is reachable again
				load.halt()
				if fw.acceptsDNAT && load.failed.Load() != 0 {
					t.Errorf("web requests failed behind %s in redirect mode: %v", fw.name, load)
				}
				if n := strings.Count(p.Log(), "route=fallback"); fw.acceptsDNAT && n == 0 {
					t.Errorf("no connection went through the proxy behind %s", fw.name)
				}
				t.Logf("web load behind %s, redirect mode: %v", fw.name, load)
			})
		})
	}
}

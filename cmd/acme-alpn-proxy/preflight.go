package main

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/intercept"
)

// preflight refuses to intercept when no web server would be behind the
// proxy: redirecting the port to a proxy with nothing to fall back to would
// cut the site off instead of keeping it up.
func preflight(cfg config, families []intercept.Family) error {
	const fix = "start the web server first, or pass -skip-preflight"
	if cfg.fallback != "" {
		c, err := net.DialTimeout("tcp", cfg.fallback, 3*time.Second)
		if err != nil {
			return fmt.Errorf("preflight: web server -fallback %s does not accept connections: %v (%s)", cfg.fallback, err, fix)
		}
		c.Close()
		return nil
	}
	for _, f := range families {
		ok, err := listensOn(f, cfg.port)
		if err != nil {
			return fmt.Errorf("preflight: %v (%s)", err, fix)
		}
		if !ok {
			v := "IPv4"
			if f == intercept.IPv6 {
				v = "IPv6"
			}
			return fmt.Errorf("preflight: nothing on this host listens on %s port %d, so there is no web server to send non-ACME connections to (%s; or set ACME_ALPN_PROXY_DISABLEV6=y if only IPv6 lacks one)", v, cfg.port, fix)
		}
	}
	return nil
}

// listensOn reports whether a TCP socket of this network namespace listens
// on port for family. An IPv6 wildcard listener counts for IPv4 too: it is
// dual-stack unless IPV6_V6ONLY, which /proc does not show.
func listensOn(f intercept.Family, port uint16) (bool, error) {
	files := []string{"/proc/net/tcp6"}
	if f == intercept.IPv4 {
		files = []string{"/proc/net/tcp", "/proc/net/tcp6"}
	}
	for _, name := range files {
		ok, err := scanListeners(name, port, f == intercept.IPv4 && name == "/proc/net/tcp6")
		if err != nil || ok {
			return ok, err
		}
	}
	return false, nil
}

func scanListeners(name string, port uint16, wildcardOnly bool) (bool, error) {
	file, err := os.Open(name)
	if os.IsNotExist(err) {
		return false, nil // no IPv6 in this kernel
	}
	if err != nil {
		return false, err
	}
	defer file.Close()
	sc := bufio.NewScanner(file)
	sc.Scan() // header
	for sc.Scan() {
		// sl local_address rem_address st ...; local_address is HEXIP:HEXPORT.
		fields := strings.Fields(sc.Text())
		if len(fields) < 4 || fields[3] != "0A" { // TCP_LISTEN
			continue
		}
		ip, p, ok := strings.Cut(fields[1], ":")
		if !ok {
			continue
		}
		n, err := strconv.ParseUint(p, 16, 16)
		if err != nil || uint16(n) != port {
			continue
		}
		if wildcardOnly && strings.Trim(ip, "0") != "" {
			continue
		}
		return true, nil
	}
	return false, sc.Err()
}

package main

import (
	"bufio"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/intercept"
)

// familyPlan is which address families start intercepts.
type familyPlan struct {
	intercept []intercept.Family
	// without are families on which nothing listens on -port: left alone,
	// since redirecting them to a proxy with no web server behind it would
	// only turn "refused" into "accepted, then cut off".
	without []intercept.Family
}

// errNoStack reports a family the kernel does not have (IPv6 disabled at
// boot): there is nothing to intercept and nothing to warn about.
var errNoStack = errors.New("address family not in this kernel")

// preflight decides which families to intercept: each one with a web
// server. It refuses only when no family has one. With -fallback every
// family goes to that one web server, which must accept a connection.
func preflight(cfg config, candidates []intercept.Family) (familyPlan, error) {
	if cfg.fallback != "" {
		c, err := net.DialTimeout("tcp", cfg.fallback, 3*time.Second)
		if err != nil {
			return familyPlan{}, fmt.Errorf("preflight: web server -fallback %s does not accept connections: %v (start the web server first, or pass -skip-preflight)", cfg.fallback, err)
		}
		c.Close()
		return familyPlan{intercept: candidates}, nil
	}
	return planFamilies(candidates, cfg.port, listensOn)
}

// planFamilies splits candidates by whether listening finds a web server
// on port. It is preflight's decision, free of /proc for tests.
func planFamilies(candidates []intercept.Family, port uint16, listening func(intercept.Family, uint16) (bool, error)) (familyPlan, error) {
	var p familyPlan
	for _, f := range candidates {
		ok, err := listening(f, port)
		switch {
		case errors.Is(err, errNoStack):
		case err != nil:
			return familyPlan{}, fmt.Errorf("preflight: %v (start the web server first, or pass -skip-preflight)", err)
		case ok:
			p.intercept = append(p.intercept, f)
		default:
			p.without = append(p.without, f)
		}
	}
	if len(p.intercept) == 0 {
		return p, fmt.Errorf("preflight: nothing on this host listens on %s port %d, so there is no web server to send non-ACME connections to (start the web server first; or name it with -fallback host:port; or pass -skip-preflight)", familyList(p.without, " or "), port)
	}
	return p, nil
}

// warnNotIntercepted says, once per family left alone, what that family's
// connections meet and what it means for a CA validating over it.
func warnNotIntercepted(log *slog.Logger, plan familyPlan, port uint16) {
	for _, f := range plan.without {
		msg, effect, fix := notInterceptedWarning(f, port)
		log.Warn(msg, "family", familyName(f), "effect", effect, "fix", fix)
	}
}

func notInterceptedWarning(f intercept.Family, port uint16) (msg, effect, fix string) {
	name := familyName(f)
	msg = fmt.Sprintf("%s not intercepted: nothing on this host listens on %s port %d", name, name, port)
	effect = fmt.Sprintf("%s connections to port %d go where they went without the proxy, to no listener: refused (or dropped by a firewall). A CA validating over %s fails there", name, port, name)
	if f == intercept.IPv6 {
		effect += "; Let's Encrypt tries IPv6 first when the name has an AAAA record, then retries once over IPv4, which is intercepted; a CA without that fallback fails the validation"
		fix = fmt.Sprintf("make the web server listen on [::]:%d too, or remove the name's AAAA record; ACME_ALPN_PROXY_DISABLEV6=y leaves IPv6 alone without this warning", port)
	} else {
		effect += "; Let's Encrypt validates over IPv4 when the name has no AAAA record, or when its IPv6 attempt failed"
		fix = fmt.Sprintf("make the web server listen on 0.0.0.0:%d too, or remove the name's A record", port)
	}
	return msg, effect, fix
}

// listenFamilies is the families a wildcard -listen takes connections of:
// the ones start may intercept.
func listenFamilies(cfg config) []intercept.Family {
	host, _, _ := net.SplitHostPort(cfg.listen)
	switch {
	case host == "" && cfg.disableV6:
		return []intercept.Family{intercept.IPv4}
	case host == "":
		return []intercept.Family{intercept.IPv4, intercept.IPv6}
	case net.ParseIP(host).To4() != nil:
		return []intercept.Family{intercept.IPv4}
	}
	return []intercept.Family{intercept.IPv6}
}

// listenAddr narrows a wildcard -listen to the families to intercept, so
// a family left alone gets no listener: that would be a port of ours
// reachable directly.
func listenAddr(cfg config, families []intercept.Family) string {
	host, port, err := net.SplitHostPort(cfg.listen)
	if err != nil || host != "" || len(families) != 1 {
		return cfg.listen
	}
	if families[0] == intercept.IPv6 {
		return net.JoinHostPort("::", port)
	}
	return net.JoinHostPort("0.0.0.0", port)
}

func familyName(f intercept.Family) string {
	if f == intercept.IPv6 {
		return "IPv6"
	}
	return "IPv4"
}

// familyList names families for people: "IPv4", "IPv4 and IPv6".
func familyList(fs []intercept.Family, conj string) string {
	names := make([]string, len(fs))
	for i, f := range fs {
		names[i] = familyName(f)
	}
	return strings.Join(names, conj)
}

// listensOn reports whether a TCP socket of this network namespace listens
// on port for family. An IPv6 wildcard listener counts for IPv4 too: it is
// dual-stack unless IPV6_V6ONLY, which /proc does not show.
func listensOn(f intercept.Family, port uint16) (bool, error) {
	if f == intercept.IPv6 {
		ok, err := scanListeners("/proc/net/tcp6", port, false)
		if errors.Is(err, os.ErrNotExist) {
			return false, errNoStack
		}
		return ok, err
	}
	ok, err := scanListeners("/proc/net/tcp", port, false)
	if err != nil || ok {
		return ok, err
	}
	ok, err = scanListeners("/proc/net/tcp6", port, true)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	return ok, err
}

func scanListeners(name string, port uint16, wildcardOnly bool) (bool, error) {
	file, err := os.Open(name)
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

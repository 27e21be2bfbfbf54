package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"path/filepath"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/alpncert"
)

// alpnCertsEnv names the challenge directory for a hook that uacme runs
// without arguments of ours; run sets it for its command.
const alpnCertsEnv = "ACME_ALPN_PROXY_ALPN_CERTS"

// checkAlpnCerts makes -alpn-certs absolute (run passes it on to a
// command that may change directory) and refuses it next to -alpn.
func checkAlpnCerts(fs *flag.FlagSet, cfg *config) error {
	if cfg.alpnCerts == "" {
		return nil
	}
	alpnSet := false
	fs.Visit(func(f *flag.Flag) { alpnSet = alpnSet || f.Name == "alpn" })
	if alpnSet {
		return fmt.Errorf("-alpn-certs %s and -alpn %s exclude each other: with -alpn-certs the proxy answers acme-tls/1 itself; with -alpn it relays it to the responder at that address (give one)", cfg.alpnCerts, cfg.alpn)
	}
	abs, err := filepath.Abs(cfg.alpnCerts)
	if err != nil {
		return fmt.Errorf("-alpn-certs %q: %v", cfg.alpnCerts, err)
	}
	cfg.alpnCerts = abs
	return nil
}

// isBareHookCall tells uacme's call of its -h PROGRAM, which it execs
// with exactly its five arguments, METHOD first.
func isBareHookCall(args []string) bool {
	if len(args) != 5 {
		return false
	}
	switch args[0] {
	case "begin", "done", "failed":
		return true
	}
	return false
}

// runHook implements uacme's hook protocol (METHOD TYPE IDENT TOKEN
// AUTH) for tls-alpn-01: begin writes IDENT's RFC 8737 certificate into
// dir, done and failed remove it. Other challenge types exit 1, which
// makes uacme try the authorization's next challenge.
func runHook(dir string, args []string, stderr io.Writer) int {
	fail := func(code int, err error) int {
		fmt.Fprintf(stderr, "acme-alpn-proxy hook: %v\n", err)
		return code
	}
	if len(args) != 5 {
		return fail(exitUsage, fmt.Errorf("want 5 arguments METHOD TYPE IDENT TOKEN AUTH, got %d: %q", len(args), args))
	}
	method, typ, ident, auth := args[0], args[1], args[2], args[4]
	if typ != "tls-alpn-01" {
		return fail(exitFailure, fmt.Errorf("challenge type %s declined: only tls-alpn-01 is answered here", typ))
	}
	if dir == "" {
		return fail(exitUsage, errors.New("no certificate directory: give -alpn-certs DIR or set "+alpnCertsEnv))
	}
	switch method {
	case "begin":
		digest, err := alpncert.KeyAuthDigest(auth)
		if err != nil {
			return fail(exitFailure, err)
		}
		if _, err := alpncert.WriteChallenge(dir, ident, digest); err != nil {
			return fail(exitFailure, err)
		}
	case "done", "failed":
		if err := alpncert.RemoveChallenge(dir, ident); err != nil {
			return fail(exitFailure, err)
		}
	default:
		return fail(exitUsage, fmt.Errorf("method %q: want begin, done or failed", method))
	}
	return exitOK
}

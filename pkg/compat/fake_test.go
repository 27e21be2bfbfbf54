package compat

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
)

// fakeIPTables imitates the iptables CLI closely enough to drive Backend:
// -I/-A/-D/-C/-S on per-binary tables, -V, exit statuses and messages as
// iptables 1.8.9 prints them. Rules are kept as argv tokens and printed
// with iptables' quoting, so -S → -D round trips are exercised.
type fakeIPTables struct {
	mu      sync.Mutex
	rules   map[string][][]string // "bin table chain" → rule tokens
	calls   [][]string
	variant string
	// fail, when it returns ok, makes the call fail with that output.
	fail func(argv []string) (stderr string, code int, ok bool)
}

type fakeExit int

func (e fakeExit) Error() string { return "exit status " + strconv.Itoa(int(e)) }
func (e fakeExit) ExitCode() int { return int(e) }

func newFake() *fakeIPTables {
	return &fakeIPTables{rules: map[string][][]string{}, variant: "nf_tables"}
}

func (f *fakeIPTables) key(bin, table, chain string) string { return bin + " " + table + " " + chain }

// seed appends rules, given as `-S` lines of one chain, for bin and table.
func (f *fakeIPTables) seed(bin, table, lines string) {
	for _, l := range strings.Split(lines, "\n") {
		tok, err := splitSaved(strings.TrimSpace(l))
		if err != nil || len(tok) < 3 || tok[0] != "-A" {
			continue
		}
		k := f.key(bin, table, tok[1])
		f.rules[k] = append(f.rules[k], tok[2:])
	}
}

// listing is what `bin -t table -S chain` prints.
func (f *fakeIPTables) listing(bin, table, chain string) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var b strings.Builder
	fmt.Fprintf(&b, "-P %s ACCEPT\n", chain)
	for _, r := range f.rules[f.key(bin, table, chain)] {
		b.WriteString("-A " + chain)
		for _, t := range r {
			b.WriteString(" " + saveQuote(t))
		}
		b.WriteString("\n")
	}
	return b.String()
}

// saveQuote is xtables_save_string.
func saveQuote(s string) string {
	plain := s != ""
	for _, c := range s {
		if !(c == '_' || c == '-' || c == '!' || c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' ||
			c == ',' || c == '/' || c == '.' || c == ':') {
			plain = false
		}
	}
	if plain {
		return s
	}
	r := strings.NewReplacer(`"`, `\"`, `'`, `\'`, `\`, `\\`)
	return `"` + r.Replace(s) + `"`
}

func (f *fakeIPTables) Run(ctx context.Context, argv []string) ([]byte, []byte, error) {
	f.mu.Lock()
	f.calls = append(f.calls, slices.Clone(argv))
	fail := f.fail
	f.mu.Unlock()
	if fail != nil {
		if msg, code, ok := fail(argv); ok {
			return nil, []byte(msg), fakeExit(code)
		}
	}
	bin := argv[0]
	name := "iptables"
	if strings.HasPrefix(bin, "ip6") {
		name = "ip6tables"
	}
	if len(argv) == 2 && argv[1] == "-V" {
		return []byte(fmt.Sprintf("%s v1.8.9 (%s)\n", name, f.variant)), nil, nil
	}
	if len(argv) < 7 || argv[1] != "-w" || argv[3] != "-t" {
		return nil, []byte("fake: unexpected argv " + strings.Join(argv, " ")), fakeExit(2)
	}
	table, op, chain, rest := argv[4], argv[5], argv[6], argv[7:]
	if op == "-S" {
		return []byte(f.listing(bin, table, chain)), nil, nil
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	k := f.key(bin, table, chain)
	notThere := []byte(name + ": Bad rule (does a matching rule exist in that chain?).\n")
	switch op {
	case "-I":
		pos, err := strconv.Atoi(rest[0])
		if err != nil || pos < 1 || pos > len(f.rules[k])+1 {
			return nil, []byte(name + ": Index of insertion too big.\n"), fakeExit(1)
		}
		f.rules[k] = slices.Insert(f.rules[k], pos-1, slices.Clone(rest[1:]))
	case "-A":
		f.rules[k] = append(f.rules[k], slices.Clone(rest))
	case "-D", "-C":
		i := slices.IndexFunc(f.rules[k], func(r []string) bool { return slices.Equal(r, rest) })
		if i < 0 {
			return nil, notThere, fakeExit(1)
		}
		if op == "-D" {
			f.rules[k] = slices.Delete(f.rules[k], i, i+1)
		}
	default:
		return nil, []byte("fake: unknown op " + op), fakeExit(2)
	}
	return nil, nil, nil
}

// chain returns the `-S` rule lines of one chain, without the policy.
func (f *fakeIPTables) chain(bin, table, chain string) []string {
	var lines []string
	for _, l := range strings.Split(f.listing(bin, table, chain), "\n") {
		if strings.HasPrefix(l, "-A ") {
			lines = append(lines, l)
		}
	}
	return lines
}

// ours counts rules with our comment across all chains of all binaries.
func (f *fakeIPTables) ours() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, rs := range f.rules {
		for _, r := range rs {
			if hasOurComment(r) {
				n++
			}
		}
	}
	return n
}

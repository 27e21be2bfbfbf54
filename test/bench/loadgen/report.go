package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"

	"os"
	"slices"
	"strings"
)

// runReport reads the JSON lines of a run (other lines are ignored) and
// prints the markdown table.
func runReport(args []string) error {
	fs := flag.NewFlagSet("report", flag.ExitOnError)
	in := fs.String("in", "-", "results file (JSON lines), - for stdin")
	vs := fs.String("vs", "", "also print every peer's medians as ratios to this peer's")
	fs.Parse(args)
	var r io.Reader = os.Stdin
	if *in != "-" {
		f, err := os.Open(*in)
		if err != nil {
			return err
		}
		defer f.Close()
		r = f
	}
	results, err := readResults(r)
	if err != nil {
		return err
	}
	fmt.Print(renderTable(results))
	if *vs != "" {
		fmt.Print("\n" + renderRatios(results, *vs))
	}
	return nil
}

func readResults(r io.Reader) ([]Result, error) {
	var out []Result
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if !strings.HasPrefix(line, "{") {
			continue
		}
		var res Result
		if err := json.Unmarshal([]byte(line), &res); err != nil {
			return nil, fmt.Errorf("bad result line %q: %w", line, err)
		}
		out = append(out, res)
	}
	return out, sc.Err()
}

// column is one metric of the table: how to get its value out of one
// repetition's results of one peer (ok false when that repetition did not
// measure it).
type column struct {
	title  string
	format string
	value  func(rep []Result) (v float64, ok bool)
	ratio  bool // also print the ratio of the medians to the direct peer's
}

func bulkColumn(dir string, streams int) column {
	return column{
		title:  fmt.Sprintf("%s, %d stream%s Gbit/s", dir, streams, map[bool]string{true: "s"}[streams > 1]),
		format: "%.1f",
		ratio:  true,
		value: func(rep []Result) (float64, bool) {
			for _, r := range rep {
				if r.Mode == "bulk" && r.Dir == dir && r.Streams == streams && r.Errors == 0 && r.Gbps > 0 {
					return r.Gbps, true
				}
			}
			return 0, false
		},
	}
}

func firstOf(mode string, get func(Result) (float64, bool)) func([]Result) (float64, bool) {
	return func(rep []Result) (float64, bool) {
		for _, r := range rep {
			if r.Mode == mode {
				return get(r)
			}
		}
		return 0, false
	}
}

var columns = []column{
	bulkColumn("up", 1),
	bulkColumn("up", 8),
	bulkColumn("down", 1),
	bulkColumn("down", 8),
	{title: "conn/s @32", format: "%.0f", value: firstOf("cps", func(r Result) (float64, bool) { return r.CPS, r.Conns > 0 })},
	{title: "p50 ms", format: "%.2f", value: firstOf("cps", func(r Result) (float64, bool) { return r.P50ms, r.Conns > 0 })},
	{title: "p99 ms", format: "%.2f", value: firstOf("cps", func(r Result) (float64, bool) { return r.P99ms, r.Conns > 0 })},
	{title: "CPU µs / conn", format: "%.0f", value: firstOf("cps", func(r Result) (float64, bool) {
		if r.CPUSec == nil || r.Conns == 0 || r.Errors > 0 {
			return 0, false
		}
		return *r.CPUSec / float64(r.Conns) * 1e6, true
	})},
	{title: "PSS KiB / idle conn", format: "%.1f", value: firstOf("idle", func(r Result) (float64, bool) {
		if r.PSSKiBPerConn == nil {
			return 0, false
		}
		return *r.PSSKiBPerConn, true
	})},
	{title: "fds / idle conn", format: "%.2f", value: firstOf("idle", func(r Result) (float64, bool) {
		if r.FDsPerConn == nil {
			return 0, false
		}
		return *r.FDsPerConn, true
	})},
	{title: "CPU s / GB", format: "%.2f", value: cpuPerGB},
}

// cpuPerGB charges the proxy's CPU time over all bulk runs of a repetition
// to the bytes they moved; only complete repetitions count.
func cpuPerGB(rep []Result) (float64, bool) {
	var cpu, bytes float64
	for _, r := range rep {
		if r.Mode != "bulk" {
			continue
		}
		if r.Errors > 0 || r.CPUSec == nil {
			return 0, false
		}
		cpu += *r.CPUSec
		bytes += float64(r.Bytes)
	}
	if bytes == 0 {
		return 0, false
	}
	return cpu / (bytes / 1e9), true
}

// stats is the median and range of one metric over the repetitions.
type stats struct {
	median, min, max float64
	n                int
}

func summarize(vals []float64) stats {
	if len(vals) == 0 {
		return stats{}
	}
	s := slices.Clone(vals)
	slices.Sort(s)
	m := s[len(s)/2]
	if len(s)%2 == 0 {
		m = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return stats{median: m, min: s[0], max: s[len(s)-1], n: len(s)}
}

// renderTable prints one row per peer (in order of first appearance) and
// one cell per metric: median (min–max) over the repetitions, then notes on
// every error seen.
func renderTable(results []Result) string {
	peers, table := summarizePeers(results)
	var b strings.Builder
	writeHeader(&b)
	for _, p := range peers {
		fmt.Fprintf(&b, "| %s |", p)
		for i, col := range columns {
			s := table[p][i]
			if s.n == 0 {
				b.WriteString(" — |")
				continue
			}
			cell := fmt.Sprintf(col.format, s.median)
			if s.n > 1 {
				cell += fmt.Sprintf(" ("+col.format+"–"+col.format+")", s.min, s.max)
			}
			if d, ok := table["direct"]; ok && col.ratio && p != "direct" && d[i].n > 0 && d[i].median > 0 {
				cell += fmt.Sprintf(" ×%.2f", s.median/d[i].median)
			}
			fmt.Fprintf(&b, " %s |", cell)
		}
		b.WriteString("\n")
	}
	notes := errorNotes(results)
	if len(notes) > 0 {
		b.WriteString("\n")
		for _, n := range notes {
			b.WriteString("- " + n + "\n")
		}
	}
	return b.String()
}

// summarizePeers returns the peers in order of first appearance and, for
// each, one stats per column.
func summarizePeers(results []Result) ([]string, map[string][]stats) {
	var peers []string
	reps := map[string]map[int][]Result{}
	for _, r := range results {
		if reps[r.Peer] == nil {
			peers = append(peers, r.Peer)
			reps[r.Peer] = map[int][]Result{}
		}
		reps[r.Peer][r.Rep] = append(reps[r.Peer][r.Rep], r)
	}
	table := map[string][]stats{}
	for _, p := range peers {
		for _, col := range columns {
			var vals []float64
			for _, rep := range reps[p] {
				if v, ok := col.value(rep); ok {
					vals = append(vals, v)
				}
			}
			table[p] = append(table[p], summarize(vals))
		}
	}
	return peers, table
}

func writeHeader(b *strings.Builder) {
	b.WriteString("| peer |")
	for _, col := range columns {
		b.WriteString(" " + col.title + " |")
	}
	b.WriteString("\n|---|")
	for range columns {
		b.WriteString("---:|")
	}
	b.WriteString("\n")
}

// renderRatios prints every other peer's medians divided by ref's: the
// comparison the README cites. Above 1 is better for throughput and
// conn/s, worse for latency, memory, descriptors and CPU.
func renderRatios(results []Result, ref string) string {
	peers, table := summarizePeers(results)
	base, ok := table[ref]
	if !ok {
		return fmt.Sprintf("(no results of %q to compare with)\n", ref)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "Ratio of medians to %s:\n\n", ref)
	writeHeader(&b)
	for _, p := range peers {
		if p == ref || p == "direct" {
			continue
		}
		fmt.Fprintf(&b, "| %s |", p)
		for i := range columns {
			if s := table[p][i]; s.n > 0 && base[i].n > 0 && base[i].median > 0 {
				fmt.Fprintf(&b, " %.2f |", s.median/base[i].median)
			} else {
				b.WriteString(" — |")
			}
		}
		b.WriteString("\n")
	}
	return b.String()
}

func errorNotes(results []Result) []string {
	var notes []string
	for _, r := range results {
		var what string
		switch {
		case r.Mode == "skip":
			notes = append(notes, fmt.Sprintf("%s rep %d: %s", r.Peer, r.Rep, r.Error))
			continue
		case r.Mode == "idle" && r.Open < r.Want:
			what = fmt.Sprintf("%d/%d idle connections opened", r.Open, r.Want)
		case r.Errors > 0 || r.Error != "":
			what = fmt.Sprintf("%d errors", r.Errors)
		default:
			continue
		}
		if r.Error != "" {
			what += ", first: " + r.Error
		}
		mode := r.Mode
		if r.Mode == "bulk" {
			mode = fmt.Sprintf("bulk %s×%d", r.Dir, r.Streams)
		}
		notes = append(notes, fmt.Sprintf("%s rep %d %s: %s", r.Peer, r.Rep, mode, what))
	}
	return notes
}

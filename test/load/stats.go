package main

import (
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"time"
)

func sortStrings(s []string) { slices.Sort(s) }

// percentile returns the p-th percentile (0..100, nearest rank) of ds.
func percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	rank := int(p/100*float64(len(s))+0.5) - 1
	rank = max(0, min(rank, len(s)-1))
	return s[rank]
}

// latencies is a concurrency-safe collection of durations.
type latencies struct {
	mu sync.Mutex
	ds []time.Duration
}

func (l *latencies) add(d time.Duration) {
	l.mu.Lock()
	l.ds = append(l.ds, d)
	l.mu.Unlock()
}

func (l *latencies) snapshot() []time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.ds)
}

// dist renders p50/p99/max of ds.
func dist(ds []time.Duration) string {
	if len(ds) == 0 {
		return "n=0"
	}
	return fmt.Sprintf("p50 %s, p99 %s, max %s (n=%d)", ms(percentile(ds, 50)), ms(percentile(ds, 99)), ms(slices.Max(ds)), len(ds))
}

// ms renders a duration with a precision that suits a table cell.
func ms(d time.Duration) string {
	switch {
	case d >= 10*time.Second:
		return d.Round(100 * time.Millisecond).String()
	case d >= time.Second:
		return d.Round(10 * time.Millisecond).String()
	case d >= 10*time.Millisecond:
		return d.Round(100 * time.Microsecond).String()
	}
	return d.Round(10 * time.Microsecond).String()
}

// Row verdicts: only correctness is judged, never speed.
const (
	verdictOK     = "ok"
	verdictBroken = "**BROKEN**"
	verdictInfo   = ""
)

// table receives rows; each is printed at once so a run cut short still
// shows what it measured.
type table struct {
	mu     sync.Mutex
	broken int
}

var out = &table{}

func (t *table) row(scenario, metric, value, verdict string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if verdict == verdictBroken {
		t.broken++
	}
	clean := func(s string) string { return strings.Join(strings.Fields(strings.ReplaceAll(s, "|", "/")), " ") }
	fmt.Fprintf(os.Stdout, "| %s | %s | %s | %s |\n", clean(scenario), clean(metric), clean(value), verdict)
}

// check picks the verdict of a correctness property.
func check(ok bool) string {
	if ok {
		return verdictOK
	}
	return verdictBroken
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "[load %s] %s\n", time.Now().Format("15:04:05.000"), fmt.Sprintf(format, args...))
}

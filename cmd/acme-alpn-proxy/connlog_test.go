package main

import (
	"log/slog"
	"strings"
	"testing"

	"github.com/acme-alpn-proxy/acme-alpn-proxy/pkg/relay"
)

// Past the queue's bound, lines are dropped, and the log says how many.
func TestConnLogDropsAndCountsPastItsBound(t *testing.T) {
	defer func(n int) { maxQueuedLines = n }(maxQueuedLines)
	maxQueuedLines = 4
	logs := &lockedBuffer{}
	q := newConnLog(slog.New(slog.NewTextHandler(logs, nil)))
	q.flushMu.Lock() // the log is stuck: nothing leaves the queue
	for range 10 {
		q.add(&relay.Conn{End: relay.EndClientClosed})
	}
	q.flushMu.Unlock()
	q.close()
	out := logs.String()
	if got := strings.Count(out, "msg=conn"); got != 4 {
		t.Errorf("%d connection lines written, want the 4 that fit:\n%s", got, out)
	}
	if !strings.Contains(out, "dropped=6") {
		t.Errorf("log does not report the 6 dropped lines:\n%s", out)
	}
}

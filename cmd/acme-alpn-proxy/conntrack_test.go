package main

import "testing"

func TestConntrackTableTurnedOnAndCapacity(t *testing.T) {
	for _, c := range []struct {
		before   conntrackTable
		turnedOn bool
	}{
		{conntrackTable{}, true},                                      // module not loaded
		{conntrackTable{loaded: true, max: 262144}, true},             // loaded, tracking nothing
		{conntrackTable{loaded: true, count: 12, max: 262144}, false}, // a firewall tracks already
	} {
		if got := c.before.turnedOn(); got != c.turnedOn {
			t.Errorf("%+v: turnedOn = %v, want %v", c.before, got, c.turnedOn)
		}
	}
	if got := (conntrackTable{loaded: true, max: 262144, timeWait: 120}).capacity(); got != 2184 {
		t.Errorf("capacity of 262144 entries held 120 s = %d/s, want 2184/s", got)
	}
	if got := (conntrackTable{loaded: true, max: 12000}).capacity(); got != 100 {
		t.Errorf("capacity of 12000 entries, time_wait unreadable = %d/s, want 100/s (the kernel's 120 s)", got)
	}
}

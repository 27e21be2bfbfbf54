package procstat

import "testing"

func TestCPUTicksCountsFieldsAfterTheCommand(t *testing.T) {
	// A command name with a space and a ')' must not shift the fields.
	stat := []byte("42 (a) b) S 1 42 42 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 1 0 9 1 1\n")
	if n, err := CPUTicks(stat); err != nil || n != 12 {
		t.Fatalf("CPUTicks = %d, %v; want utime 7 + stime 5", n, err)
	}
	if _, err := CPUTicks([]byte("42 (x S 1")); err == nil {
		t.Error("malformed stat accepted")
	}
}

func TestField(t *testing.T) {
	rollup := []byte("55e0-7ff [rollup]\nRss:  1000 kB\nPss_Anon: 1 kB\nPss:  812 kB\n")
	if n, err := Field(rollup, "Pss:"); err != nil || n != 812 {
		t.Fatalf("Field(Pss) = %d, %v", n, err)
	}
	if _, err := Field(rollup, "Swap:"); err == nil {
		t.Error("missing field reported as found")
	}
}

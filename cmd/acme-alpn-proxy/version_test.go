package main

import (
	"bytes"
	"io"
	"runtime"
	"runtime/debug"
	"strings"
	"testing"
)

func TestFormatVersion(t *testing.T) {
	info := &debug.BuildInfo{
		GoVersion: "go1.26.8",
		Main:      debug.Module{Path: "github.com/acme-alpn-proxy/acme-alpn-proxy", Version: "v0.0.0-20261204052000-0abcf87cbfcb+dirty"},
		Settings: []debug.BuildSetting{
			{Key: "vcs", Value: "git"},
			{Key: "vcs.revision", Value: "0abcf87cbfcb3320e274cbf9c150763e81a73dfb"},
			{Key: "vcs.time", Value: "2026-12-04T05:20:00Z"},
			{Key: "vcs.modified", Value: "true"},
		},
	}
	want := `acme-alpn-proxy v0.0.0-20261204052000-0abcf87cbfcb+dirty
module    github.com/acme-alpn-proxy/acme-alpn-proxy
revision  0abcf87cbfcb3320e274cbf9c150763e81a73dfb
time      2026-12-04T05:20:00Z
modified  true (uncommitted changes in the build tree)
go        go1.26.8 linux/amd64
`
	if got := formatVersion(info, "linux/amd64"); got != want {
		t.Errorf("got:\n%s\nwant:\n%s", got, want)
	}

	// go build outside a git clone, or with -buildvcs=false.
	info = &debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Path: "github.com/acme-alpn-proxy/acme-alpn-proxy", Version: "(devel)"}}
	got := formatVersion(info, "linux/arm64")
	for _, line := range []string{
		"acme-alpn-proxy (devel): built from a source tree with no version information\n",
		"revision  unknown (not built by `go build` in a git checkout, or built with -buildvcs=false)\n",
		"go        go1.26.8 linux/arm64\n",
	} {
		if !strings.Contains(got, line) {
			t.Errorf("no line %q in:\n%s", line, got)
		}
	}
	if got := formatVersion(nil, "linux/amd64"); !strings.Contains(got, "no build information") || !strings.Contains(got, runtime.Version()) {
		t.Errorf("without build info:\n%s", got)
	}
}

func TestVersionCommandAndFlag(t *testing.T) {
	var cmdOut, flagOut bytes.Buffer
	if code := realMain([]string{"version"}, &cmdOut, io.Discard); code != exitOK {
		t.Fatalf("version: exit %d", code)
	}
	if code := realMain([]string{"-version"}, &flagOut, io.Discard); code != exitOK {
		t.Fatalf("-version: exit %d", code)
	}
	if cmdOut.String() != flagOut.String() || !strings.Contains(cmdOut.String(), "go        "+runtime.Version()) {
		t.Errorf("version:\n%s\n-version:\n%s", cmdOut.String(), flagOut.String())
	}
}

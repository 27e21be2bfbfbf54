package main

import (
	"fmt"
	"io"
	"runtime"
	"runtime/debug"
	"strings"
)

// printVersion writes which build this is, for bug reports: the module
// version, the commit it was built from, and the Go toolchain.
func printVersion(w io.Writer) int {
	info, _ := debug.ReadBuildInfo() // nil when the binary has none
	fmt.Fprint(w, formatVersion(info, runtime.GOOS+"/"+runtime.GOARCH))
	return exitOK
}

// formatVersion renders info (nil: the binary carries no build info).
func formatVersion(info *debug.BuildInfo, platform string) string {
	var b strings.Builder
	if info == nil {
		fmt.Fprintf(&b, "acme-alpn-proxy: no build information in this binary\ngo        %s %s\n", runtime.Version(), platform)
		return b.String()
	}
	settings := map[string]string{}
	for _, s := range info.Settings {
		settings[s.Key] = s.Value
	}
	version := info.Main.Version
	if version == "" || version == "(devel)" {
		version = "(devel): built from a source tree with no version information"
	}
	fmt.Fprintf(&b, "acme-alpn-proxy %s\n", version)
	if info.Main.Path != "" {
		fmt.Fprintf(&b, "module    %s\n", info.Main.Path)
	}
	if rev := settings["vcs.revision"]; rev != "" {
		fmt.Fprintf(&b, "revision  %s\n", rev)
		if t := settings["vcs.time"]; t != "" {
			fmt.Fprintf(&b, "time      %s\n", t)
		}
		switch settings["vcs.modified"] {
		case "true":
			b.WriteString("modified  true (uncommitted changes in the build tree)\n")
		case "false":
			b.WriteString("modified  false\n")
		}
	} else {
		b.WriteString("revision  unknown (not built by `go build` in a git checkout, or built with -buildvcs=false)\n")
	}
	fmt.Fprintf(&b, "go        %s %s\n", info.GoVersion, platform)
	return b.String()
}

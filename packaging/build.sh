#!/usr/bin/env bash
# Builds the .deb and .rpm of this checkout into dist/ (or $DIST):
#
#   packaging/build.sh [VERSION]              # default: changelog.yaml's newest
#   GOARCH=arm64 packaging/build.sh           # another architecture
#
# The binary is static (CGO_ENABLED=0) and stripped, built with -trimpath and
# with the commit in its build info; nfpm is the version pinned in
# packaging/go.mod.
# File times are the last commit's, so one commit gives the same packages.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v go >/dev/null || export PATH="$PATH:/usr/local/go/bin"

die() {
	echo "packaging/build.sh: $*" >&2
	exit 1
}

# The changelog names the version: a package never ships without its entry.
newest=$(sed -n 's/^- semver: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' packaging/changelog.yaml | head -n1)
VERSION=${1:-${newest%-1}}
VERSION=${VERSION#v}
[[ $VERSION =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "VERSION $VERSION: want MAJOR.MINOR.PATCH, e.g. 0.1.0"
[ "$newest" = "$VERSION-1" ] ||
	die "packaging/changelog.yaml's newest entry is $newest: add one for $VERSION-1 first"

head=$(git rev-parse HEAD 2>/dev/null) || die "not a git checkout: the binary records the commit it was built from"
PKG_ARCH=${GOARCH:-$(go env GOARCH)}
DIST=${DIST:-dist}
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct)}
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
export VERSION PKG_ARCH STAGE SOURCE_DATE_EPOCH

CGO_ENABLED=0 GOOS=linux GOARCH=$PKG_ARCH go build -trimpath -buildvcs=true -ldflags="-s -w" \
	-o "$STAGE/acme-alpn-proxy" ./cmd/acme-alpn-proxy
# Go finds the repository by a .git directory: in a linked worktree (.git is
# a file) it records no commit, or that of a repository further up.
stamped=$(go version -m "$STAGE/acme-alpn-proxy" | sed -n 's/^[[:space:]]*build[[:space:]]*vcs.revision=//p')
[ "$stamped" = "$head" ] ||
	die "the binary records commit '${stamped:-none}', not HEAD $head (a git worktree? build in a clone)"
gzip -9n <packaging/acme-alpn-proxy.8 >"$STAGE/acme-alpn-proxy.8.gz"

# nfpm, the tool of packaging/go.mod, is built for this host and runs in
# packaging/: nfpm.yaml's paths are relative to it.
mkdir -p "$DIST"
DIST=$(cd "$DIST" && pwd)
for packager in deb rpm; do
	GOOS=$(go env GOHOSTOS) GOARCH=$(go env GOHOSTARCH) \
		go -C packaging tool nfpm package --config nfpm.yaml --packager "$packager" --target "$DIST/"
done

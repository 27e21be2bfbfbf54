# Sourced by test/load/run.sh and test/soak/run.sh (set OUT and NAME first):
# a work directory, the lists of PIDs started and namespaces created, a
# trap that removes all of them also on failure, and the two builds.
# Leaves ROOT, STAMP, WORK, BIN (the proxy) and LOADBIN set.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
STAMP=$(date +%Y%m%d-%H%M%S)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/acme-alpn-$NAME.XXXXXX")
mkdir -p "$OUT"
: >"$WORK/pids"
: >"$WORK/netns"

log() { echo "[$NAME.sh] $*" >&2; }

cleanup() {
	local pid ns
	# The runner kills its own children; this catches what survives a
	# runner that died first. Only PIDs this run started are signalled.
	while read -r pid; do
		[ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null || true
	done <"$WORK/pids"
	while read -r ns; do
		[ -n "$ns" ] && ip netns del "$ns" 2>/dev/null || true
	done <"$WORK/netns"
	mkdir -p "$OUT/logs-$STAMP"
	cp -f "$WORK"/*.err "$WORK"/*.out "$OUT/logs-$STAMP/" 2>/dev/null || true
	local l
	for l in "$WORK"/*.log; do # a soak's proxy log is large: its last lines
		[ -e "$l" ] || continue
		if [ "$(stat -c %s "$l")" -gt 10000000 ]; then
			tail -n 20000 "$l" >"$OUT/logs-$STAMP/$(basename "$l")"
		else
			cp -f "$l" "$OUT/logs-$STAMP/"
		fi
	done
	rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ "$(id -u)" != 0 ]; then
	log "needs root (network namespaces, nftables)"
	exit 1
fi

cd "$ROOT"
BIN=${ACME_ALPN_PROXY:-}
if [ -z "$BIN" ]; then
	BIN=$WORK/acme-alpn-proxy
	go build -o "$BIN" ./cmd/acme-alpn-proxy
fi
LOADBIN=$WORK/load
go build -o "$LOADBIN" ./test/load
# Each process holds one side of thousands of connections.
ulimit -n "$(ulimit -Hn)"

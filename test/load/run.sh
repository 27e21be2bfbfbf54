#!/usr/bin/env bash
# Load-and-fault measurements of acme-alpn-proxy; prints a markdown table.
# Not a pass/fail test: the "ok" column flags only correctness (a connection
# that should have worked and did not, a leaked descriptor), never speed.
#
# usage: test/load/run.sh
# env:   SCENARIOS=1,2,3,4,5,6,7   SCALE=1 (multiplies connection counts)
#        BASE_PORT=25300   ACME_ALPN_PROXY=path (default: built from this checkout)
#        DEADLINE=12m (the runner gives up, cleans up and exits after this)
# Needs root (network namespaces, nftables). Scenarios 1-5 run on the
# loopback of a private namespace ld-lo-*, 6-7 in namespace pairs
# ld-s-*/ld-c-* (198.18.0.1/2); all are deleted at the end, also on failure.
# Logs and the table are kept in test/load/out/.
set -euo pipefail

SCENARIOS=${SCENARIOS:-1,2,3,4,5,6,7}
SCALE=${SCALE:-1}
BASE_PORT=${BASE_PORT:-25300}
DEADLINE=${DEADLINE:-12m}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUT=$ROOT/test/load/out
STAMP=$(date +%Y%m%d-%H%M%S)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/acme-alpn-load.XXXXXX")
mkdir -p "$OUT"
: >"$WORK/pids"
: >"$WORK/netns"

log() { echo "[load.sh] $*" >&2; }

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
	cp -f "$WORK"/*.log "$WORK"/*.err "$WORK"/*.out "$OUT/logs-$STAMP/" 2>/dev/null || true
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
go build -o "$WORK/load" ./test/load

# Each process holds one side of up to 8,000 connections.
ulimit -n "$(ulimit -Hn)"

NS=ld-lo-$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
ip netns add "$NS"
echo "$NS" >>"$WORK/netns"
ip -n "$NS" link set lo up

log "scenarios $SCENARIOS, scale $SCALE, work dir $WORK, netns $NS"
START=$(date +%s)
set +e
ip netns exec "$NS" "$WORK/load" run -bin "$BIN" -work "$WORK" -pids "$WORK/pids" -netns-file "$WORK/netns" \
	-scenarios "$SCENARIOS" -scale "$SCALE" -base-port "$BASE_PORT" -deadline "$DEADLINE" \
	> >(tee "$WORK/rows.md" >&2) &
RUNNER=$!
echo "$RUNNER" >>"$WORK/pids"
wait "$RUNNER"
STATUS=$?
set -e
sleep 0.2 # let tee flush

TABLE=$OUT/table-$STAMP.md
{
	echo "acme-alpn-proxy load and fault run, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, kernel $(uname -r), took $(($(date +%s) - START)) s"
	echo
	echo "| scenario | measured | result | ok |"
	echo "|---|---|---|---|"
	cat "$WORK/rows.md"
} >"$TABLE"
cat "$TABLE"
log "table saved as ${TABLE#"$ROOT"/}; logs in ${OUT#"$ROOT"/}/logs-$STAMP/"
exit "$STATUS"

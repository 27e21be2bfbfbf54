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

NAME=load
OUT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/out
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

NS=ld-lo-$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
ip netns add "$NS"
echo "$NS" >>"$WORK/netns"
ip -n "$NS" link set lo up

log "scenarios $SCENARIOS, scale $SCALE, work dir $WORK, netns $NS"
START=$(date +%s)
set +e
ip netns exec "$NS" "$LOADBIN" run -bin "$BIN" -work "$WORK" -pids "$WORK/pids" -netns-file "$WORK/netns" \
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

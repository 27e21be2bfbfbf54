#!/usr/bin/env bash
# Soak run of acme-alpn-proxy: DURATION (default 30m) of mixed load through
# the intercepting proxy in a network namespace pair, sampled every
# INTERVAL (10s); prints a table and the least-squares slope of each column.
# Not a CI test (test/soak_test.go runs a 2-minute version in CI).
#
# usage: test/soak/run.sh
# env:   DURATION=30m INTERVAL=10s MODE=tproxy ACME_ALPN_PROXY=path (default:
#        built from this checkout); any other flag of `load soak` after --,
#        e.g. test/soak/run.sh -- -rate 200 -idle 4000
# Needs root (network namespaces, nftables). The namespaces ld-s-*/ld-c-*
# are deleted at the end, also on failure. Table and logs: test/soak/out/.
set -euo pipefail

DURATION=${DURATION:-30m}
INTERVAL=${INTERVAL:-10s}
MODE=${MODE:-tproxy}
[ "${1:-}" = "--" ] && shift

NAME=soak
OUT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/out
# shellcheck source=../load/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../load/lib.sh"

TABLE=$OUT/soak-$STAMP.md
log "duration $DURATION, interval $INTERVAL, mode $MODE; table: ${TABLE#"$ROOT"/}"
set +e
"$LOADBIN" soak -bin "$BIN" -work "$WORK" -pids "$WORK/pids" -netns-file "$WORK/netns" \
	-duration "$DURATION" -interval "$INTERVAL" -mode "$MODE" "$@" | tee "$TABLE"
STATUS=$? # pipefail: the runner's status unless tee failed
set -e
log "table saved as ${TABLE#"$ROOT"/}; logs in ${OUT#"$ROOT"/}/logs-$STAMP/"
exit "$STATUS"

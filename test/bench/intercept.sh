#!/usr/bin/env bash
# Interception benchmark: connections per second and p99 latency through
# the real interception (nftables, tproxy, default flags) for each source
# the web server can see connections from, side by side in one run, next to
# the direct path. Clients run in one network namespace; the proxy and the
# web server (loadgen backend on :443) in another, joined by a veth pair.
# Repetitions are interleaved (rep 1: every mode, rep 2: ...), each cell the
# median over them with min–max.
#
#   direct  no proxy running: clients reach the web server straight
#   client  -fallback-source client (default): dialed from the client's address
#   host    -fallback-source host: dialed from this host's address
#
# usage: test/bench/intercept.sh       (root)
# env:   REPS=3 DURATION=3s CPS_CONCURRENCY=32 MODES="direct client host" FAMILY=4|6
#        ACME_ALPN_PROXY=path (default: built from this checkout)
# Traffic stays inside the two namespaces (198.18.99.0/24, fd00:99::/64).
set -euo pipefail

REPS=${REPS:-3}
DURATION=${DURATION:-3s}
CPS_CONCURRENCY=${CPS_CONCURRENCY:-32}
MODES=${MODES:-"direct client host"}
FAMILY=${FAMILY:-4}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUT=$ROOT/test/bench/out
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/acme-alpn-intercept.XXXXXX")
RESULTS=$OUT/intercept-$(date +%Y%m%d-%H%M%S).jsonl
TAG=$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
SRV=bench-srv-$TAG CLI=bench-cli-$TAG
SRV4=198.18.99.1 CLI4=198.18.99.2 SRV6=fd00:99::1 CLI6=fd00:99::2
TARGET=$SRV4:443
[ "$FAMILY" = 6 ] && TARGET=[$SRV6]:443

log() { echo "[intercept] $*" >&2; }
[ "$(id -u)" = 0 ] || { log "needs root (network namespaces, nftables)"; exit 1; }

BACKEND_PID=""
cleanup() {
	[ -f "$WORK/aap.pid" ] && ip netns exec "$SRV" "$AAP" -pidfile "$WORK/aap.pid" stop >/dev/null 2>&1 || true
	[ -n "$BACKEND_PID" ] && { kill "$BACKEND_PID" 2>/dev/null || true; wait "$BACKEND_PID" 2>/dev/null || true; }
	ip netns del "$SRV" 2>/dev/null || true
	ip netns del "$CLI" 2>/dev/null || true
	cp -f "$WORK"/*.log "$OUT"/ 2>/dev/null || true
	rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

AAP=${ACME_ALPN_PROXY:-$WORK/acme-alpn-proxy}
LG=$WORK/loadgen
[ -n "${ACME_ALPN_PROXY:-}" ] || (cd "$ROOT" && go build -o "$AAP" ./cmd/acme-alpn-proxy)
(cd "$ROOT" && go build -o "$LG" ./test/bench/loadgen)

ip netns add "$SRV"
ip netns add "$CLI"
ip -n "$SRV" link set lo up
ip -n "$CLI" link set lo up
ip -n "$SRV" link add bv type veth peer name bv netns "$CLI"
ip -n "$SRV" addr add $SRV4/24 dev bv
ip -n "$CLI" addr add $CLI4/24 dev bv
ip -n "$SRV" -6 addr add $SRV6/64 dev bv nodad
ip -n "$CLI" -6 addr add $CLI6/64 dev bv nodad
ip -n "$SRV" link set bv up
ip -n "$CLI" link set bv up
# A host has a default route; the client namespace forwards nothing.
ip -n "$SRV" route add default via $CLI4
ip -n "$SRV" -6 route add default via $CLI6
# The clients keep Linux's default ephemeral ports (32768–60999): the
# proxy's source ports for the client mode lie below them.

ip netns exec "$SRV" "$LG" backend -web :443 -acme 127.0.0.1:31443 -timeout 2h 2>>"$WORK/backend.log" &
BACKEND_PID=$!
for _ in $(seq 50); do
	ip netns exec "$SRV" ss -Hltn '( sport = :443 )' | grep -q . && break
	sleep 0.1
done

start_mode() { # start_mode MODE: the proxy for MODE is running and ready
	case $1 in
	direct) return 0 ;;
	client) set -- ;;
	host) set -- -fallback-source host ;;
	esac
	ip netns exec "$SRV" "$AAP" -log "$WORK/proxy.log" -pidfile "$WORK/aap.pid" -backend nft -mode tproxy \
		-drain-timeout 10s "$@" start -d >>"$WORK/proxy.log" 2>&1
}

stop_mode() {
	[ "$1" = direct ] || ip netns exec "$SRV" "$AAP" -pidfile "$WORK/aap.pid" stop >>"$WORK/proxy.log" 2>&1
}

log "results: $RESULTS"
for rep in $(seq "$REPS"); do
	for mode in $MODES; do
		start_mode "$mode"
		if [ "$mode" != direct ]; then
			src=$(grep -o 'msg=ready.*source=[a-z]*' "$WORK/proxy.log" | tail -1 | grep -o 'source=[a-z]*')
			[ "$src" = "source=$mode" ] || { log "$mode: proxy ready with $src"; exit 1; }
		fi
		ip netns exec "$CLI" "$LG" cps -addr "$TARGET" -concurrency "$CPS_CONCURRENCY" -duration "$DURATION" \
			-peer "$mode" -rep "$rep" | tee -a "$RESULTS" >&2
		stop_mode "$mode"
		sleep 1
	done
done

echo "### Through the interception (nft, tproxy, IPv$FAMILY, cps @$CPS_CONCURRENCY for $DURATION, $REPS reps)"
echo
"$LG" report -in "$RESULTS"

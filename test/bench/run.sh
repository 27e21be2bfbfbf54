#!/usr/bin/env bash
# Loopback benchmark: acme-alpn-proxy against a direct connection, a naive Go
# io.Copy relay, HAProxy (mode tcp, req.ssl_alpn, splice; once with its
# defaults, once tuned for this job) and nginx (stream, ssl_preread), side by
# side in one run. Repetitions are interleaved (rep 1:
# every peer, rep 2: every peer, ...) so a noisy neighbour hits all peers
# alike; each cell is the median over the repetitions with min–max.
#
# usage: test/bench/run.sh            # benchmark table, strace tables, CPU profile
#        test/bench/run.sh strace     # strace tables only
#        test/bench/run.sh profile    # CPU profile of acme-alpn-proxy's connection path only
# env:   REPS=3 DURATION=3s IDLE_CONNS=5000 CPS_CONCURRENCY=32 BASE_PORT=24100
#        PEERS="direct naive-io.Copy acme-alpn-proxy haproxy-tuned haproxy nginx"  (also: sslh; sslh-select is select()-based, so keep IDLE_CONNS < 500 for it)
#        a peer acme-alpn-proxy=PATH runs the binary at PATH (A/B runs of two builds)
#        TESTS="idle bulk cps" (a subset for quick A/B runs)
#        STRACE_PEERS="acme-alpn-proxy haproxy-tuned"   STRACE=0 skips the strace tables
#        PROFILE=0 skips the CPU profile (acme-alpn-proxy -cpuprofile, during a cps run)
#        ACME_ALPN_PROXY=path  (default: built from this checkout)
# Needs root only to apt-get install missing peers (haproxy, nginx with the
# stream module, strace). Traffic goes to 127.0.0.1 only. Results (JSON lines,
# logs, the tables) are kept in test/bench/out/.
set -euo pipefail

MODE=${1:-bench}
REPS=${REPS:-3}
DURATION=${DURATION:-3s}
IDLE_CONNS=${IDLE_CONNS:-5000}
CPS_CONCURRENCY=${CPS_CONCURRENCY:-32}
BASE_PORT=${BASE_PORT:-24100}
PEERS=${PEERS:-"direct naive-io.Copy acme-alpn-proxy haproxy-tuned haproxy nginx"}
TESTS=${TESTS:-"idle bulk cps"}
STRACE=${STRACE:-1}
PROFILE=${PROFILE:-1}
STRACE_PEERS=${STRACE_PEERS:-"acme-alpn-proxy haproxy-tuned"}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUT=$ROOT/test/bench/out
STAMP=$(date +%Y%m%d-%H%M%S)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/acme-alpn-bench.XXXXXX")
RESULTS=$OUT/results-$STAMP.jsonl
mkdir -p "$OUT"

WEB_PORT=$((BASE_PORT + 1))
ACME_PORT=$((BASE_PORT + 2))
declare -A PEER_PORT=([naive-io.Copy]=$((BASE_PORT + 10)) [acme-alpn-proxy]=$((BASE_PORT + 11))
	[haproxy]=$((BASE_PORT + 12)) [nginx]=$((BASE_PORT + 13)) [sslh]=$((BASE_PORT + 14))
	[haproxy-tuned]=$((BASE_PORT + 15)))
# The peer's name in the results and the table.
declare -A LABEL=([haproxy]="HAProxy (defaults + splice)" [haproxy-tuned]="HAProxy (tuned)"
	[nginx]="nginx stream (tuned)" [naive-io.Copy]="naive io.Copy")
NCPU=$(nproc)
label() { echo "${LABEL[$1]:-$1}"; }
for p in $PEERS; do # acme-alpn-proxy=PATH: one more build, on a port of its own
	case $p in acme-alpn-proxy=*)
		PEER_PORT[$p]=$((BASE_PORT + 20 + ${#PEER_PORT[@]}))
		LABEL[$p]="acme-alpn-proxy ($(basename "${p#*=}"))"
		;;
	esac
done

STARTED=() # every PID this script started, stopped on exit
log() { echo "[bench] $*" >&2; }

stop_pid() { # stop_pid PID: TERM, then KILL after 10 s
	local pid=$1 i
	kill -TERM "$pid" 2>/dev/null || return 0
	for i in $(seq 100); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	kill -KILL "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
}

cleanup() {
	local pid
	for pid in "${STARTED[@]}"; do stop_pid "$pid"; done
	cp -f "$WORK"/*.log "$WORK"/*.conf "$WORK"/*.cfg "$OUT"/ 2>/dev/null || true
	rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

listening() { ss -Hltn "( sport = :$1 )" | grep -q .; }

wait_listen() { # wait_listen PORT PID
	local i
	for i in $(seq 100); do
		listening "$1" && return 0
		kill -0 "$2" 2>/dev/null || return 1
		sleep 0.1
	done
	return 1
}

# Raise the soft fd limit to the hard one: the clients hold IDLE_CONNS
# sockets, and so do the backend and each proxy (twice).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((IDLE_CONNS * 2 + 100)) ]; then
	log "warning: fd limit $(ulimit -n) is low for IDLE_CONNS=$IDLE_CONNS"
fi

apt_install() { # apt_install PKG...: install missing packages, retrying while dpkg is locked
	[ "$(id -u)" = 0 ] || return 1
	local i
	for i in $(seq 12); do
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" \
			>>"$WORK/apt.log" 2>&1 && return 0
		grep -q 'Unable to locate\|has no installation candidate' "$WORK/apt.log" &&
			{ apt-get update -q >>"$WORK/apt.log" 2>&1 || true; }
		sleep 5
	done
	return 1
}

AAP=${ACME_ALPN_PROXY:-$WORK/acme-alpn-proxy}
NGINX_STREAM_MODULE=""
find_nginx_stream() {
	local m
	for m in /usr/lib/nginx/modules/ngx_stream_module.so /usr/lib64/nginx/modules/ngx_stream_module.so; do
		[ -f "$m" ] && { NGINX_STREAM_MODULE=$m; return 0; }
	done
	nginx -V 2>&1 | grep -q -- '--with-stream\b' && ! nginx -V 2>&1 | grep -q -- '--with-stream=dynamic'
}

# prepare PEER: install or build what it needs; non-zero (with a reason on
# stdout) when it cannot run here.
prepare() {
	case $1 in
	direct | naive-io.Copy) ;;
	acme-alpn-proxy)
		if [ -z "${ACME_ALPN_PROXY:-}" ] &&
			! (cd "$ROOT" && go build -o "$AAP" ./cmd/acme-alpn-proxy) >"$WORK/aap-build.log" 2>&1; then
			echo "build failed: $(tail -1 "$WORK/aap-build.log")"
			return 1
		fi
		local help
		help=$("$AAP" -h 2>&1 || true)
		if ! grep -q -- -no-redirect <<<"$help"; then
			echo "binary has no -no-redirect flag yet"
			return 1
		fi
		;;
	acme-alpn-proxy=*)
		[ -x "${1#*=}" ] || { echo "${1#*=} is not an executable"; return 1; }
		;;
	haproxy | haproxy-tuned)
		command -v haproxy >/dev/null || apt_install haproxy || { echo "haproxy not installable"; return 1; }
		;;
	nginx)
		if ! command -v nginx >/dev/null || ! find_nginx_stream; then
			apt_install nginx libnginx-mod-stream || { echo "nginx stream module not installable"; return 1; }
		fi
		find_nginx_stream || { echo "nginx has no stream module"; return 1; }
		;;
	sslh)
		command -v sslh-select >/dev/null || apt_install sslh || { echo "sslh not installable"; return 1; }
		;;
	*)
		echo "unknown peer"
		return 1
		;;
	esac
}

# haproxy_routes [BIND-OPTIONS]: HAProxy's frontend and backends, as in
# the README: wait for a whole ClientHello, route acme-tls/1 by ALPN.
haproxy_routes() {
	cat <<EOF
frontend bench
	bind $ADDR${1:+ $1}
	tcp-request inspect-delay 5s
	tcp-request content accept if { req.ssl_hello_type 1 }
	use_backend acme if { req.ssl_alpn acme-tls/1 }
	default_backend web
backend acme
	server acme 127.0.0.1:$ACME_PORT
backend web
	server web 127.0.0.1:$WEB_PORT
EOF
}

# start_peer PEER: sets ADDR (where clients connect), MAIN (PID to stop,
# empty for direct) and WATCH (PIDs whose CPU/memory/fds are charged).
start_peer() {
	local p=$1 port=${PEER_PORT[$1]:-} pid
	ADDR=127.0.0.1:$port MAIN="" WATCH=""
	case $p in
	direct)
		ADDR=127.0.0.1:$WEB_PORT
		return 0
		;;
	naive-io.Copy)
		"$LG" naive-relay -listen "$ADDR" -alpn 127.0.0.1:$ACME_PORT -fallback 127.0.0.1:$WEB_PORT \
			-timeout 30m 2>>"$WORK/naive.log" &
		;;
	acme-alpn-proxy | acme-alpn-proxy=*)
		local bin=$AAP
		[ "$p" = acme-alpn-proxy ] || bin=${p#*=}
		"$bin" -no-redirect -listen "$ADDR" -alpn 127.0.0.1:$ACME_PORT -fallback 127.0.0.1:$WEB_PORT \
			-log "$WORK/acme-alpn-proxy.log" -pidfile "$WORK/acme-alpn-proxy.pid" -drain-timeout 5s \
			${CPUPROFILE:+-cpuprofile "$CPUPROFILE"} start 2>>"$WORK/acme-alpn-proxy.stderr.log" &
		;;
	haproxy) # defaults, apart from forced splice
		cat >"$WORK/haproxy.cfg" <<EOF
global
	maxconn 6000
	maxpipes 1000
defaults
	mode tcp
	maxconn 6000
	timeout connect 5s
	timeout client 10m
	timeout server 10m
	option splice-request
	option splice-response
$(haproxy_routes)
EOF
		haproxy -db -f "$WORK/haproxy.cfg" >>"$WORK/haproxy.log" 2>&1 &
		;;
	haproxy-tuned)
		# As an expert would set it up for a pure L4 relay that sniffs ALPN:
		# one thread per CPU; splice forced both ways through pipes as large
		# as ours (the default, 64 KiB, costs twice the CPU per GB);
		# connections capped above the idle test's 5,000 (2 fds each, 2 per
		# pipe: HAProxy refuses to start if the fd limit cannot hold them
		# all), pipes above what 8 streams use at once; one log
		# line per connection (option tcplog) as acme-alpn-proxy writes,
		# to stdout, which is the log file here.
		cat >"$WORK/haproxy-tuned.cfg" <<EOF
global
	nbthread $NCPU
	maxconn 6000
	maxpipes 1000
	tune.pipesize 1048576
	log stdout format raw local0 info
defaults
	mode tcp
	log global
	option tcplog
	maxconn 6000
	timeout connect 5s
	timeout client 10m
	timeout server 10m
	option splice-request
	option splice-response
$(haproxy_routes "backlog 4096")
EOF
		haproxy -db -f "$WORK/haproxy-tuned.cfg" >>"$WORK/haproxy-tuned.log" 2>&1 &
		;;
	nginx)
		find_nginx_stream || true
		cat >"$WORK/nginx.conf" <<EOF
${NGINX_STREAM_MODULE:+load_module $NGINX_STREAM_MODULE;}
daemon off;
worker_processes $NCPU;
worker_rlimit_nofile 19000;
pid $WORK/nginx.pid;
error_log $WORK/nginx.log warn;
events { worker_connections 12000; multi_accept on; }
stream {
	log_format bench '\$remote_addr [\$time_local] \$upstream_addr \$status \$bytes_sent \$bytes_received \$session_time';
	access_log $WORK/nginx-access.log bench buffer=64k flush=1s;
	map \$ssl_preread_alpn_protocols \$bench_upstream {
		~(^|,)acme-tls/1(,|\$) 127.0.0.1:$ACME_PORT;
		default 127.0.0.1:$WEB_PORT;
	}
	server {
		listen $ADDR backlog=4096 reuseport;
		ssl_preread on;
		proxy_pass \$bench_upstream;
		proxy_half_close on;
		proxy_timeout 10m;
	}
}
EOF
		nginx -e "$WORK/nginx.log" -p "$WORK" -c "$WORK/nginx.conf" >>"$WORK/nginx.log" 2>&1 &
		;;
	sslh)
		cat >"$WORK/sslh.cfg" <<EOF
foreground: true;
numeric: true;
timeout: 5;
listen: ( { host: "127.0.0.1"; port: "$port"; } );
protocols: (
	{ name: "tls"; host: "127.0.0.1"; port: "$ACME_PORT"; alpn_protocols: [ "acme-tls/1" ]; },
	{ name: "tls"; host: "127.0.0.1"; port: "$WEB_PORT"; }
);
EOF
		sslh-select -F"$WORK/sslh.cfg" >>"$WORK/sslh.log" 2>&1 &
		;;
	esac
	pid=$!
	STARTED+=("$pid")
	MAIN=$pid
	if ! wait_listen "$port" "$pid"; then
		stop_pid "$pid"
		return 1
	fi
	WATCH=$pid
	if [ "$p" = nginx ]; then
		sleep 0.3 # workers start after the master listens
		WATCH=$(ps --ppid "$pid" -o pid= | tr -s ' \n' ',' | sed 's/^,//')$pid
	fi
}

stop_peer() { [ -z "$MAIN" ] || stop_pid "$MAIN"; }

skip() { # skip PEER REP REASON: a note in the results
	printf '{"peer":"%s","rep":%d,"mode":"skip","error":"%s"}\n' "$(label "$1")" "$2" "${3//\"/\'}" >>"$RESULTS"
	log "$1: $3"
}

client() { # client MODE ARGS...: one loadgen client run, its JSON line appended to the results
	local mode=$1 t0=$EPOCHREALTIME
	shift
	"$LG" "$mode" -peer "$(label "$PEER")" -rep "$REP" -addr "$ADDR" -watch "$WATCH" "$@" >>"$RESULTS" 2>>"$WORK/loadgen.log" ||
		skip "$PEER" "$REP" "loadgen $mode failed: $(tail -1 "$WORK/loadgen.log")"
	log "  $mode $* took $(awk "BEGIN{printf \"%.1f\", $EPOCHREALTIME - $t0}") s"
	sleep 0.5 # let the proxy close what the last test left
}

bench_peer() {
	if ! start_peer "$PEER"; then
		skip "$PEER" "$REP" "did not start (logs in test/bench/out/)"
		return
	fi
	# The ACME route must work too, or the peer is misconfigured.
	local check='"conns":1'
	[ "$PEER" = direct ] || check=$("$LG" cps -addr "$ADDR" -alpn acme-tls/1 -expect A -concurrency 1 -duration 200ms 2>&1 || true)
	case $check in *'"errors"'* | *'"conns":0'* | '') skip "$PEER" "$REP" "acme-tls/1 route check: $check" ;; esac
	[[ " $TESTS " != *" idle "* ]] || client idle -n "$IDLE_CONNS"
	local dir s
	if [[ " $TESTS " == *" bulk "* ]]; then
		for dir in up down; do
			for s in 1 8; do
				client bulk -dir "$dir" -streams "$s" -duration "$DURATION"
			done
		done
	fi
	[[ " $TESTS " != *" cps "* ]] || client cps -concurrency "$CPS_CONCURRENCY" -duration "$DURATION"
	stop_peer
}

# strace_peer PEER: count syscalls of the proxy while one upload and one
# download stream run through it, to show which calls carry the data.
strace_peer() {
	PEER=$1 REP=0
	if ! start_peer "$PEER" || [ -z "$MAIN" ]; then
		echo "$PEER: did not start"
		return
	fi
	local tids=() t up down st
	"$LG" bulk -addr "$ADDR" -dir up -duration 4s >"$WORK/strace-up.json" 2>&1 &
	up=$!
	"$LG" bulk -addr "$ADDR" -dir down -duration 4s >"$WORK/strace-down.json" 2>&1 &
	down=$!
	sleep 1
	for t in $(ls "/proc/$MAIN/task"); do tids+=(-p "$t"); done
	for t in $(ps --ppid "$MAIN" -o pid=); do tids+=(-p "$t"); done # nginx workers
	strace -f -c -o "$WORK/strace-$PEER.txt" "${tids[@]}" 2>/dev/null &
	st=$!
	STARTED+=("$st")
	sleep 2
	kill -INT "$st" 2>/dev/null || true
	wait "$st" 2>/dev/null || true
	wait "$up" "$down" 2>/dev/null || true
	stop_peer
	echo
	echo "### syscalls of $PEER during 1 upload + 1 download stream (strace -f -c, 2 s)"
	echo
	echo "| syscall | calls | errors | seconds | % time |"
	echo "|---|---:|---:|---:|---:|"
	awk '/^-+ /{sep++; next} sep==1 && NF>=5 {err = (NF==6) ? $5 : 0; print "| " $NF " | " $4 " | " err " | " $2 " | " $1 " |"}' \
		"$WORK/strace-$PEER.txt" | head -14
	echo
	echo "(throughput under strace, 4 s each: up $(grep -o '"gbps":[0-9.]*' "$WORK/strace-up.json" | cut -c8-12 || echo '?')," \
		"down $(grep -o '"gbps":[0-9.]*' "$WORK/strace-down.json" | cut -c8-12 || echo '?') Gbit/s)"
}

# strace_cps_peer PEER: syscalls per connection of the proxy while the cps
# client runs (connect, ClientHello, 1-byte answer, close).
strace_cps_peer() {
	PEER=$1 REP=0
	if ! start_peer "$PEER" || [ -z "$MAIN" ]; then
		echo "$PEER: did not start"
		return
	fi
	local tids=() t st conns
	for t in $(ls "/proc/$MAIN/task"); do tids+=(-p "$t"); done
	for t in $(ps --ppid "$MAIN" -o pid=); do tids+=(-p "$t"); done
	strace -f -c -o "$WORK/strace-cps-$PEER.txt" "${tids[@]}" 2>/dev/null &
	st=$!
	STARTED+=("$st")
	sleep 1
	"$LG" cps -addr "$ADDR" -concurrency 8 -duration 3s >"$WORK/strace-cps.json" 2>&1 || true
	kill -INT "$st" 2>/dev/null || true
	wait "$st" 2>/dev/null || true
	stop_peer
	conns=$(grep -o '"conns":[0-9]*' "$WORK/strace-cps.json" | cut -d: -f2)
	echo
	echo "### syscalls of $PEER per connection during conn/s (strace -f -c, cps @8 for 3 s, ${conns:-?} connections)"
	echo
	echo "| syscall | calls | per conn | errors |"
	echo "|---|---:|---:|---:|"
	awk -v n="${conns:-0}" '/^-+ /{sep++; next} sep==1 && NF>=5 {err = (NF==6) ? $5 : 0; printf "| %s | %d | %.2f | %d |\n", $NF, $4, (n>0 ? $4/n : 0), err}' \
		"$WORK/strace-cps-$PEER.txt" | head -20
	awk -v n="${conns:-0}" '$NF == "total" {printf "\n(total %d calls, %.1f per connection)\n", $4, (n>0 ? $4/n : 0)}' \
		"$WORK/strace-cps-$PEER.txt"
}

# profile_peer: CPU profile of acme-alpn-proxy while the cps client runs
# (connect, ClientHello, sniff, route, dial, relay 1 byte, close).
profile_peer() {
	PEER=acme-alpn-proxy REP=0
	CPUPROFILE=$OUT/cpu-acme-alpn-proxy-$STAMP.prof
	start_peer "$PEER" || { echo "acme-alpn-proxy did not start"; CPUPROFILE=""; return; }
	CPUPROFILE=""
	local prof=$OUT/cpu-acme-alpn-proxy-$STAMP.prof res
	res=$("$LG" cps -addr "$ADDR" -concurrency "$CPS_CONCURRENCY" -duration 5s 2>&1 || true)
	stop_peer # the profile is written at stop
	echo
	echo "### CPU profile of acme-alpn-proxy, connection path (cps @$CPS_CONCURRENCY for 5 s)"
	echo
	echo "$res"
	echo
	echo '```'
	(cd "$ROOT" && go tool pprof -top -cum -nodecount=35 "$AAP" "$prof" 2>&1 | sed -n "1,45p") || true
	echo '```'
	echo "(profile kept in test/bench/out/$(basename "$prof"); go tool pprof -http=: to browse)"
}

# --- main ---
command -v ss >/dev/null || apt_install iproute2
LG=$WORK/loadgen
(cd "$ROOT" && go build -o "$LG" ./test/bench/loadgen)

declare -A UNAVAILABLE=()
WANTED=$PEERS
[ "$MODE" = strace ] && WANTED=$STRACE_PEERS
[ "$MODE" = profile ] && WANTED=acme-alpn-proxy
[ "$MODE" = bench ] && [ "$STRACE" != 0 ] && WANTED="$PEERS $STRACE_PEERS"
[ "$MODE" = bench ] && [ "$PROFILE" != 0 ] && WANTED="$WANTED acme-alpn-proxy"
for PEER in $(echo "$WANTED" | tr ' ' '\n' | awk '!seen[$0]++'); do
	if reason=$(prepare "$PEER"); then :; else UNAVAILABLE[$PEER]=$reason; fi
done
for port in $WEB_PORT $ACME_PORT "${PEER_PORT[@]}"; do
	if listening "$port"; then
		log "port $port is in use: set BASE_PORT to a free range"
		exit 1
	fi
done

"$LG" backend -web 127.0.0.1:$WEB_PORT -acme 127.0.0.1:$ACME_PORT -timeout 60m 2>>"$WORK/backend.log" &
BACKEND=$!
STARTED+=("$BACKEND")
wait_listen "$WEB_PORT" "$BACKEND" && wait_listen "$ACME_PORT" "$BACKEND" || {
	log "backend did not start"
	exit 1
}

if [ "$MODE" = bench ]; then
	log "results: $RESULTS"
	for REP in $(seq "$REPS"); do
		for PEER in $PEERS; do
			if [ -n "${UNAVAILABLE[$PEER]:-}" ]; then
				skip "$PEER" "$REP" "${UNAVAILABLE[$PEER]}"
				continue
			fi
			log "rep $REP/$REPS: $PEER"
			bench_peer
		done
	done
	{
		echo "## acme-alpn-proxy loopback benchmark ($STAMP, $(nproc) CPUs, $(uname -r))"
		echo
		echo "Median of $REPS interleaved repetitions (min–max); ×N = ratio to direct."
		echo "up = client→backend, down = backend→client, $DURATION per measurement, after a real TLS ClientHello."
		echo "conn/s: connect, ClientHello, 1-byte answer, close, $CPS_CONCURRENCY in parallel; p50/p99 of that exchange;"
		echo "CPU µs / conn: the proxy's utime+stime during the conn/s run over the connections (10 ms ticks)."
		echo "Per idle connection: growth of the proxy's PSS and fd count over $IDLE_CONNS idle proxied connections."
		echo "CPU s / GB: the proxy's utime+stime over all bulk runs / bytes relayed (10 ms ticks)."
		echo
		"$LG" report -in "$RESULTS" -vs "$(label haproxy-tuned)"
	} | tee "$OUT/table-$STAMP.md"
fi
if [ "$MODE" = strace ] || { [ "$MODE" = bench ] && [ "$STRACE" != 0 ]; }; then
	if command -v strace >/dev/null || apt_install strace; then
		for PEER in $STRACE_PEERS; do
			if [ -n "${UNAVAILABLE[$PEER]:-}" ]; then
				echo "$PEER: ${UNAVAILABLE[$PEER]}"
				continue
			fi
			strace_peer "$PEER"
			strace_cps_peer "$PEER"
		done | tee "$OUT/strace-$STAMP.md"
	else
		log "strace not installable"
	fi
fi
if [ "$MODE" = profile ] || { [ "$MODE" = bench ] && [ "$PROFILE" != 0 ]; }; then
	if [ -n "${UNAVAILABLE[acme-alpn-proxy]:-}" ]; then
		echo "CPU profile: acme-alpn-proxy ${UNAVAILABLE[acme-alpn-proxy]}"
	else
		profile_peer | tee "$OUT/profile-$STAMP.md"
	fi
fi

#!/usr/bin/env bash
# The 100k-connection run, start to finish, on one machine over loopback.
#
#   loadtest/run-100k.sh            # both runs, idle then chat each
#   DURATION=30 RATE=2 loadtest/run-100k.sh
#   PROFILE=debug CLIENTS=2000 ROOMS=20 DURATION=3 loadtest/run-100k.sh   # try the script cheaply
#   PROFILE=release-with-debug FLAMEGRAPH=flamegraphs/100k-chat.svg loadtest/run-100k.sh
#                                       # also samples the first server during the 100k chat
#                                       # (FLAME_DELAY s after the start, 20 s; needs perf, inferno)
#   THREADS=2 loadtest/run-100k.sh      # server runtime threads (default: 1 when there are more
#                                       # servers than cores, else one per core)
#   ROUTE=spread loadtest/run-100k.sh   # run (2) in cluster mode: every room on every server,
#                                       # through a redis-server this script starts
#
# (1) one server process with as many clients as its open-file limit allows (~19,000 clients in
#     190 rooms when `ulimit -Hn` is 20000), idle then chat;
# (2) 100,000 clients in 1,000 rooms: on one server when `ulimit -Hn` allows 200k, otherwise over
#     ceil(100000 / per-server) server processes with --route rooms; idle then chat.
# Every run starts fresh servers (so RSS figures start from an idle process), appends its
# one-line summary to loadtest/results/summary.jsonl (kept in git) and writes its full report to
# loadtest/results/full/<date>-<name>.json (ignored). Only servers this script started are
# stopped, by PID.
set -euo pipefail

cd "$(dirname "$0")/.."
DURATION=${DURATION:-60}
RATE=${RATE:-1}
BASE_PORT=${BASE_PORT:-19100}
CLIENTS=${CLIENTS:-100000}
ROOMS=${ROOMS:-1000}
PROFILE=${PROFILE:-release}
ROUTE=${ROUTE:-rooms}
REDIS_PORT=${REDIS_PORT:-19099}
RESULTS=loadtest/results/full
SUMMARY=${SUMMARY:-loadtest/results/summary.jsonl}
LOGS=target/loadtest-logs
STAMP=$(date +%Y%m%d-%H%M%S)
mkdir -p "$RESULTS" "$LOGS"

log() { printf '\n== %s\n' "$*" >&2; }

log "building $PROFILE binaries"
if [ "$PROFILE" = debug ]; then
    cargo build -p roomcast -p loadtest
else
    cargo build --profile "$PROFILE" -p roomcast -p loadtest
fi
SERVER=${SERVER:-target/$PROFILE/roomcast}
LOADTEST=target/$PROFILE/loadtest

# --- limits ---------------------------------------------------------------------------------
HARD=$(ulimit -Hn)
if [ "$HARD" = unlimited ]; then HARD=1048576; fi
ulimit -n "$HARD" 2>/dev/null || true
log "limits: nofile soft $(ulimit -Sn) hard $HARD; ports $(cat /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null | tr '\t' ' '); somaxconn $(cat /proc/sys/net/core/somaxconn 2>/dev/null)"
# Headroom for the server's own files and sockets still closing.
PER_SERVER=$(( (HARD - 1000) / 1000 * 1000 ))
if [ "$PER_SERVER" -lt 1000 ]; then
    echo "ulimit -Hn is $HARD: too low for this run (raise it: LimitNOFILE= or /etc/security/limits.conf)" >&2
    exit 2
fi

# Source addresses: every 127.0.0.0/8 address routes to lo on Linux; check before assuming.
SOURCES=127.0.0.1-127.0.0.16
if command -v ip >/dev/null 2>&1; then
    if ! ip -o route get 127.0.0.16 2>/dev/null | grep -q ' dev lo'; then
        log "127.0.0.16 does not route to lo: adding 127.0.0.2-16 to lo (needs root)"
        for i in $(seq 2 16); do sudo ip addr add "127.0.0.$i/8" dev lo 2>/dev/null || true; done
    fi
fi

# --- servers --------------------------------------------------------------------------------
PIDS=()
stop_servers() {
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    if [ -n "${REDIS_PID:-}" ]; then
        kill "$REDIS_PID" 2>/dev/null || true
        wait "$REDIS_PID" 2>/dev/null || true
        REDIS_PID=
    fi
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
}
trap stop_servers EXIT INT TERM

# start_servers N: N fresh servers on BASE_PORT.. ; sets URLS
start_servers() {
    local n=$1 route=${2:-rooms} urls=() i port cluster=()
    if [ "$route" = spread ]; then
        command -v redis-server >/dev/null || { echo "ROUTE=spread needs redis-server (apt-get install redis-server)" >&2; exit 2; }
        redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
            >"$LOGS/$STAMP-redis.log" 2>&1 &
        REDIS_PID=$!
        for _ in $(seq 1 50); do
            if (exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT") 2>/dev/null; then break; fi
            sleep 0.1
        done
        cluster=(--redis "redis://127.0.0.1:$REDIS_PORT")
    fi
    # More server processes than cores: one runtime thread each (no work stealing between
    # threads that only compete for the same cores). THREADS=N overrides.
    local threads=${THREADS:-0}
    if [ -z "${THREADS:-}" ] && [ "$n" -gt "$(nproc)" ]; then threads=1; fi
    for ((i = 0; i < n; i++)); do
        port=$((BASE_PORT + i))
        "$SERVER" --listen "127.0.0.1:$port" --max-connections "$PER_SERVER" --max-connections-per-ip off --rate-limit off --threads "$threads" "${cluster[@]}" ${SERVER_ARGS:-} \
            >"$LOGS/$STAMP-server-$port.log" 2>&1 &
        PIDS+=($!)
        urls+=("ws://127.0.0.1:$port")
    done
    for ((i = 0; i < n; i++)); do
        port=$((BASE_PORT + i))
        for _ in $(seq 1 100); do
            if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
            sleep 0.1
        done
    done
    URLS=$(IFS=,; echo "${urls[*]}")
}

FAILED=0
# run NAME SERVERS CLIENTS ROOMS ROUTE -- extra loadtest args
run() {
    local name=$1 servers=$2 clients=$3 rooms=$4 route=$5
    shift 5
    for scenario in ${SCENARIOS:-idle chat}; do
        start_servers "$servers" "$route"
        log "$name/$scenario: $clients clients, $rooms rooms, $servers server(s), --route $route"
        local flame=
        if [ -n "${FLAMEGRAPH:-}" ] && [ "$scenario" = chat ] && [ "$clients" = "$CLIENTS" ]; then
            (sleep "${FLAME_DELAY:-90}" && flamegraphs/record.sh "${PIDS[0]}" 20 "$FLAMEGRAPH") &
            flame=$!
        fi
        if ! "$LOADTEST" --url "$URLS" --route "$route" --clients "$clients" --rooms "$rooms" \
            --scenario "$scenario" --duration "$DURATION" --rate "$RATE" \
            --source-ips "$SOURCES" --json "$RESULTS/$STAMP-$name-$scenario.json" \
            --summary "$SUMMARY" --label "$name" "$@"; then
            FAILED=1
            echo "run $name/$scenario FAILED (exit code above); results kept in $RESULTS" >&2
        fi
        if [ -n "$flame" ]; then wait "$flame" || true; fi
        stop_servers
    done
}

# (1) one server, as many clients as its file limit allows, 100 per room.
ONE=$(( PER_SERVER < CLIENTS ? PER_SERVER : CLIENTS ))
if [ "${SKIP_ONE:-0}" != 1 ]; then
    run "one-server-$ONE" 1 "$ONE" $(( ONE / 100 )) rooms
fi

# (2) 100k clients over as few servers as the file limit allows.
if [ "$PER_SERVER" -ge "$CLIENTS" ]; then
    NSERVERS=1
else
    # Rooms land whole on a server (room i -> server i % n): size by rooms, not clients.
    PER_ROOM=$(( (CLIENTS + ROOMS - 1) / ROOMS ))
    NSERVERS=$(( (CLIENTS + PER_SERVER - 1) / PER_SERVER ))
    while (( ( (ROOMS + NSERVERS - 1) / NSERVERS ) * PER_ROOM > PER_SERVER )); do
        NSERVERS=$((NSERVERS + 1))
    done
fi
if [ "$ROUTE" = spread ]; then
    # Every room on every server: each server holds CLIENTS / N sockets.
    NSERVERS=$(( (CLIENTS + PER_SERVER - 1) / PER_SERVER ))
fi
run "$CLIENTS-clients-$NSERVERS-servers-$ROUTE" "$NSERVERS" "$CLIENTS" "$ROOMS" "$ROUTE"

log "summaries appended to $SUMMARY; full reports in $RESULTS/$STAMP-*.json"
exit "$FAILED"

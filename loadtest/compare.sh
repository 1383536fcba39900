#!/usr/bin/env bash
# Before/after comparison of two roomcast server binaries on this machine, over loopback.
#
#   loadtest/compare.sh A_BIN B_BIN          # A = baseline server binary, B = candidate
#   loadtest/compare.sh /tmp/before/roomcast target/release/roomcast
#   QUICK=1 loadtest/compare.sh A_BIN B_BIN  # a few-minute check that the script works (2,000
#                                            # clients, short runs, 1 round): not for figures
#
# Measures, with A and B alternating (A then B, every scenario, RUNS rounds), and prints each
# run, the medians and the B/A ratios of:
#   idle      server RSS per connection, KiB      (CLIENTS clients in CLIENTS/100 rooms, 1 server)
#   chat      p99 latency, ms                     (same clients, 1 msg/s per room, CHAT_SECONDS)
#   chat      also deliveries per server CPU-second
#   saturate  highest sustained deliveries/s, and deliveries per server CPU-second at that step
#             (1,000 clients, 10 rooms, from SAT_RATE msg/s/room doubling every STEP_SECONDS)
#   hot       frames per write, deliveries/s, deliveries per server CPU-second (100 clients in
#             one room, one publisher: 1,500 msg/s when steady, window 64)
# Every run gets a fresh server: `B_or_A --listen 127.0.0.1:PORT` and then A_ARGS or B_ARGS
# (default, roomcast's: `--rate-limit off --max-connections CLIENTS+500 $SERVER_ARGS`), default
# threads. The load generator is the same binary for A and B ($LOADTEST), so only the server
# differs; a load generator that knows `--server-pid` reads both servers' CPU time and RSS from
# /proc, the same way whatever the server reports itself.
# loadtest/baseline.sh runs this with A = the `minimal` baseline server.
#
# Settings (environment):
#   LOADTEST=target/release/loadtest   the load generator
#   PACING=steady         --publish-pacing of chat, saturate and hot (steady|burst; needs a load
#                         generator that has the flag; without it: its own pacing)
#   A_ARGS, B_ARGS        each server's flags after --listen (set empty for a server that takes
#                         none of roomcast's)
#   RUNS=3                rounds (each runs every scenario on A, then on B)
#   CLIENTS=19000         idle and chat clients on the one server (the open-file cap is 20,000)
#   IDLE_SECONDS=5 CHAT_SECONDS=10 SAT_SECONDS=40 STEP_SECONDS=5 HOT_SECONDS=10
#   SAT_RATE=100          saturate's first step, msg/s per room (it doubles each step; with
#                         steady publishers on 2 cores, 100 is already past a 50 ms p99)
#   SCENARIOS="idle chat saturate hot"
#   SERVER_ARGS=""        more server flags, for both binaries
#   BASE_PORT=19300       each run takes the next port
#   TOTAL_SECONDS=1200    the whole script's bound: runs that would pass it are cut short or
#                         skipped (and reported as missing)
#   SUMMARY=loadtest/results/summary.jsonl   where the run lines are also appended (QUICK=1: none;
#                         SUMMARY= to keep them out)
# Defaults should take about 10 minutes on a 2-core machine (estimated from the runs' lengths;
# the hard bound is TOTAL_SECONDS). Full reports
# go to loadtest/results/full/compare-<stamp>/ (ignored by git), with the servers' logs.
# Run it on a quiet machine: the server and the load generator share the cores, and a build
# running beside them moves latency and throughput (not RSS).
# Only processes this script started are stopped, by PID. Exit code: 0 when every run wrote its
# summary line (whether or not the loadtest passed), 1 when one did not, 2 on bad arguments.
set -euo pipefail

if [ $# -ne 2 ]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
fi
A_BIN=$(realpath "$1")
B_BIN=$(realpath "$2")
cd "$(dirname "$0")/.."
for bin in "$A_BIN" "$B_BIN"; do
    [ -x "$bin" ] || { echo "compare.sh: $bin is not an executable" >&2; exit 2; }
done

if [ "${QUICK:-0}" = 1 ]; then
    : "${RUNS:=1}" "${CLIENTS:=2000}" "${IDLE_SECONDS:=2}" "${CHAT_SECONDS:=3}"
    : "${SAT_SECONDS:=6}" "${STEP_SECONDS:=2}" "${HOT_SECONDS:=3}" "${SUMMARY=}"
fi
RUNS=${RUNS:-3}
CLIENTS=${CLIENTS:-19000}
IDLE_SECONDS=${IDLE_SECONDS:-5}
CHAT_SECONDS=${CHAT_SECONDS:-10}
SAT_SECONDS=${SAT_SECONDS:-40}
SAT_RATE=${SAT_RATE:-100}
STEP_SECONDS=${STEP_SECONDS:-5}
HOT_SECONDS=${HOT_SECONDS:-10}
SCENARIOS=${SCENARIOS:-idle chat saturate hot}
SERVER_ARGS=${SERVER_ARGS:-}
PORT=${BASE_PORT:-19300}
SUMMARY=${SUMMARY-loadtest/results/summary.jsonl}
TOTAL_SECONDS=${TOTAL_SECONDS:-1200}
STARTED=$SECONDS
LOADTEST=${LOADTEST:-target/release/loadtest}
[ -x "$LOADTEST" ] || { echo "compare.sh: no load generator at $LOADTEST (set LOADTEST)" >&2; exit 2; }
PACING=${PACING:-steady}
LT_HELP=$("$LOADTEST" --help 2>&1 || true)
has_flag() { grep -q -- "$1" <<<"$LT_HELP"; }
if ! has_flag --publish-pacing && [ "$PACING" != steady ]; then
    echo "compare.sh: $LOADTEST has no --publish-pacing (PACING=$PACING)" >&2
    exit 2
fi
ROOMCAST_ARGS="--rate-limit off --max-connections $(( CLIENTS + 500 )) $SERVER_ARGS"
A_ARGS=${A_ARGS-$ROOMCAST_ARGS}
B_ARGS=${B_ARGS-$ROOMCAST_ARGS}
ROOMS=$(( CLIENTS / 100 > 0 ? CLIENTS / 100 : 1 ))
STAMP=$(date +%Y%m%d-%H%M%S)
OUT=loadtest/results/full/compare-$STAMP
LINES=$OUT/summary.jsonl
mkdir -p "$OUT"
: >"$LINES"

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $(( CLIENTS + 600 )) ]; then
    echo "compare.sh: open-file limit $(ulimit -n) is too low for CLIENTS=$CLIENTS (lower CLIENTS)" >&2
    exit 2
fi

hash8() { sha256sum "$1" | cut -c1-8; }
A_ID=A-$(hash8 "$A_BIN")
B_ID=B-$(hash8 "$B_BIN")
{
    echo "compare.sh $STAMP on $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "  A = $A_BIN ($A_ID)"
    echo "  B = $B_BIN ($B_ID)"
    echo "  A flags: --listen 127.0.0.1:PORT $A_ARGS"
    echo "  B flags: --listen 127.0.0.1:PORT $B_ARGS"
    if has_flag --publish-pacing; then pacing="pacing $PACING"; else pacing="the load generator's own pacing"; fi
    echo "  loadtest = $LOADTEST; $RUNS round(s); scenarios: $SCENARIOS; $pacing; reports in $OUT"
    if awk '{ exit !($1 > 1.5) }' /proc/loadavg; then
        echo "  warning: the machine is busy (load average above 1.5): latency and throughput"
        echo "  figures will be lower and noisier than on a quiet machine; RSS is not affected"
    fi
} >&2

SERVER_PID=
stop_server() {
    if [ -n "$SERVER_PID" ]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=
    fi
}
trap stop_server EXIT INT TERM

FAILED=0
# measure WHICH(A|B) BIN SERVER_FLAGS SCENARIO ROUND
measure() {
    local id=$1 bin=$2 flags=$3 scenario=$4 round=$5 args=() seconds
    case $scenario in
        idle) seconds=$IDLE_SECONDS; args=(--clients "$CLIENTS" --rooms "$ROOMS") ;;
        chat) seconds=$CHAT_SECONDS; args=(--clients "$CLIENTS" --rooms "$ROOMS" --rate 1) ;;
        saturate) seconds=$SAT_SECONDS; args=(--clients 1000 --rooms 10 --rate "$SAT_RATE" --step-seconds "$STEP_SECONDS") ;;
        hot) seconds=$HOT_SECONDS; args=(--clients 100 --rooms 1) ;;
        *) echo "compare.sh: unknown scenario $scenario" >&2; exit 2 ;;
    esac
    if [ "$scenario" != idle ] && has_flag --publish-pacing; then
        args+=(--publish-pacing "$PACING")
    fi
    # Bounded twice: the loadtest's own --max-seconds (the run, a ramp at a third of the
    # default 5,000 connects/s, drain and checks), and a hard timeout around it, both within
    # what is left of TOTAL_SECONDS.
    local left=$(( TOTAL_SECONDS - (SECONDS - STARTED) ))
    local bound=$(( seconds + CLIENTS * 3 / 5000 + 40 ))
    if [ "$left" -lt 30 ]; then
        echo "  round $round $scenario $id: skipped, TOTAL_SECONDS=$TOTAL_SECONDS spent" >&2
        FAILED=1
        return
    fi
    if [ "$bound" -gt $(( left - 15 )) ]; then bound=$(( left - 15 )); fi
    PORT=$((PORT + 1))
    local log=$OUT/server-$round-$scenario-$id.log
    # shellcheck disable=SC2086 # the flags are a list
    "$bin" --listen "127.0.0.1:$PORT" $flags >"$log" 2>&1 &
    SERVER_PID=$!
    if has_flag --server-pid; then args+=(--server-pid "$SERVER_PID"); fi
    local up=0
    for _ in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then up=1; break; fi
        sleep 0.1
    done
    if [ "$up" = 0 ]; then
        echo "  round $round $scenario $id: the server did not listen (see $log)" >&2
        FAILED=1
        stop_server
        return
    fi
    local before
    before=$(wc -l <"$LINES" 2>/dev/null || echo 0)
    local rc=0
    timeout --kill-after 5 $(( bound + 10 )) "$LOADTEST" --url "ws://127.0.0.1:$PORT" \
        --scenario "$scenario" "${args[@]}" --duration "$seconds" --max-seconds "$bound" --quiet \
        --json "$OUT/$round-$scenario-$id.json" --summary "$LINES" --label "compare-$id" \
        >"$OUT/$round-$scenario-$id.txt" 2>&1 || rc=$?
    stop_server
    if [ "$(wc -l <"$LINES" 2>/dev/null || echo 0)" -le "$before" ]; then
        echo "  round $round $scenario $id: no result (loadtest exit $rc; see $OUT/$round-$scenario-$id.txt)" >&2
        FAILED=1
        return
    fi
    if [ -n "$SUMMARY" ]; then tail -n 1 "$LINES" >>"$SUMMARY"; fi
    echo "  round $round $scenario $id: exit $rc; $(tail -n 1 "$LINES" | python3 -c '
import json, sys
s = json.load(sys.stdin)
print({"idle": lambda: "%.2f KiB/conn" % (s.get("rss_per_conn_bytes", float("nan")) / 1024),
       "chat": lambda: "p99 %.2f ms, %s deliveries/s, %s per server CPU-s" % (s.get("p99_us", float("nan")) / 1000, s["deliveries_per_sec"], s.get("deliveries_per_cpu_second")),
       "saturate": lambda: "%s deliveries/s, %s per server CPU-s" % (s.get("best_deliveries_per_sec"), s.get("deliveries_per_cpu_second")),
       "hot": lambda: "%s frames/write, %s deliveries/s, %s per server CPU-s" % (s.get("frames_per_write"), s["deliveries_per_sec"], s.get("deliveries_per_cpu_second"))}[s["scenario"]]()
      + ("" if not s.get("publishing") else " (%s)" % s["publishing"]))
')" >&2
}

for round in $(seq 1 "$RUNS"); do
    for scenario in $SCENARIOS; do
        measure "$A_ID" "$A_BIN" "$A_ARGS" "$scenario" "$round"
        measure "$B_ID" "$B_BIN" "$B_ARGS" "$scenario" "$round"
    done
done

python3 - "$LINES" "$A_ID" "$B_ID" "$CLIENTS" <<'EOF'
import json, os, statistics, sys

path, a_id, b_id, clients = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
runs = [json.loads(l) for l in open(path) if l.strip()]

def values(who, scenario, key, scale):
    out = []
    for s in runs:
        if s.get("label") == "compare-" + who and s["scenario"] == scenario and s.get(key) is not None:
            out.append(s[key] * scale)
    return out

metrics = [
    ("idle", "rss_per_conn_bytes", 1 / 1024, "idle: server RSS per connection, KiB (%d clients, 1 server)" % clients, "lower"),
    ("chat", "p99_us", 1 / 1000, "chat: p99 latency, ms (%d clients, 1 msg/s/room)" % clients, "lower"),
    ("chat", "deliveries_per_cpu_second", 1, "chat: deliveries per server CPU-second", "higher"),
    ("saturate", "best_deliveries_per_sec", 1, "saturate: highest sustained deliveries/s", "higher"),
    ("saturate", "deliveries_per_cpu_second", 1, "saturate: deliveries per server CPU-second", "higher"),
    ("hot", "frames_per_write", 1, "hot: frames per write", "higher"),
    ("hot", "deliveries_per_sec", 1, "hot: deliveries/s", "higher"),
    ("hot", "deliveries_per_cpu_second", 1, "hot: deliveries per server CPU-second", "higher"),
]
fmt = lambda v: "%.2f" % v if abs(v) < 100 else "{:,.0f}".format(v)
print()
print("| metric | better | A runs | B runs | A median | B median | B/A |")
print("|---|---|---|---|---|---|---|")
for scenario, key, scale, what, better in metrics:
    if not any(s["scenario"] == scenario for s in runs):
        continue
    a, b = values(a_id, scenario, key, scale), values(b_id, scenario, key, scale)
    am = statistics.median(a) if a else None
    bm = statistics.median(b) if b else None
    ratio = "%.3f" % (bm / am) if am and bm is not None else "?"
    print("| %s | %s | %s | %s | %s | %s | %s |" % (
        what, better, " / ".join(fmt(v) for v in a) or "-", " / ".join(fmt(v) for v in b) or "-",
        fmt(am) if am is not None else "-", fmt(bm) if bm is not None else "-", ratio))

modes = {}
for s in runs:
    if s.get("publishing"):
        modes.setdefault(s["scenario"], set()).add(s["publishing"])
print()
print("Publishers: " + "; ".join(
    "%s %s" % (sc, "/".join(sorted(m))) for sc, m in sorted(modes.items())) +
    " (steady: each publisher at evenly spaced times, one message per write;"
    " burst: several messages per write, in hot all the unacknowledged window allows).")
# A saturate run whose first step already missed the bound has no best step: say why.
for s in runs:
    if s["scenario"] == "saturate" and not s.get("best_deliveries_per_sec"):
        why = "?"
        try:
            full = json.load(open(os.path.join(os.path.dirname(path), s["report"])))
            why = full["saturation"]["stopped_because"]
        except (KeyError, OSError, TypeError, ValueError):
            pass
        print("note: %s saturate sustained no step (stopped: %s)" % (s.get("label"), why))
failed = [s for s in runs if not s.get("pass", True)]
for s in failed:
    print("FAILED run: %s %s: %s" % (s.get("label"), s["scenario"], "; ".join(s.get("failures", []))))
EOF
echo "(run lines: $LINES; load average at the end: $(cut -d' ' -f1-3 /proc/loadavg))"
exit "$FAILED"

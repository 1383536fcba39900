#!/usr/bin/env bash
# A normal room's delivery under attack: `chat` (CLIENTS clients in CLIENTS/100 rooms, 1 msg/s
# per room, steady publishers) on a fresh server, quiet and then with each attack of
# loadtest/attack.py running beside it on the same server; RUNS rounds; prints every run, the
# median p99 of each and its ratio to the quiet median.
#
#   loadtest/attacks.sh [SERVER_BIN]        # default target/release/roomcast
#
# Settings (environment): LOADTEST (default target/release/loadtest), RUNS=3, CLIENTS=2000,
# CHAT_SECONDS=10, ATTACKS="slowloris flood pages pings idle" (and `logins`), BASE_PORT=19600,
# RATE_LIMIT=off (the server's --rate-limit), SERVER_ARGS (more server flags, split on spaces:
# SERVER_ARGS="--accounts-hash-slots 2").
# The server runs with its defaults and --rate-limit off (as every benchmark here), so the
# floods meet no per-socket limit: what is measured is what the rest of the server does for the
# normal room meanwhile. RATE_LIMIT=20/s (the server's default) shows what the limit leaves. Only processes this script started are stopped, by PID.
# `logins` needs built-in accounts: when it is in ATTACKS, every server of the invocation (the
# quiet ones too, so that the ratio compares like with like) runs with --jwt-secret and a fresh
# --accounts-db, and the chat clients connect with a token from `roomcast token`.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/roomcast}
LOADTEST=${LOADTEST:-target/release/loadtest}
RUNS=${RUNS:-3}
CLIENTS=${CLIENTS:-2000}
CHAT_SECONDS=${CHAT_SECONDS:-10}
ATTACKS=${ATTACKS:-slowloris flood pages pings idle}
PORT=${BASE_PORT:-19600}
OUT=loadtest/results/full/attacks-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
LINES=$OUT/summary.jsonl
ACCOUNTS=''
case " $ATTACKS " in *" logins "*) ACCOUNTS=1 ;; esac
SECRET=loadtest-attacks-secret-of-32-bytes!!
TOKEN_FLAGS=()
if [ -n "$ACCOUNTS" ]; then
    TOKEN_FLAGS=(--token "$("$BIN" token --jwt-secret "$SECRET" --sub loadtest --ttl 2h)")
fi
SERVER_PID='' ATTACK_PID=''
stop() {
    for pid in $ATTACK_PID $SERVER_PID; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
    SERVER_PID='' ATTACK_PID=''
}
trap stop EXIT

run() { # round attack
    local round=$1 attack=$2
    PORT=$((PORT + 1))
    local accounts=()
    if [ -n "$ACCOUNTS" ]; then
        accounts=(--jwt-secret "$SECRET" --accounts-db "$OUT/accounts-$round-$attack.db")
    fi
    "$BIN" --listen "127.0.0.1:$PORT" --rate-limit "${RATE_LIMIT:-off}" "${accounts[@]}" ${SERVER_ARGS:-} >"$OUT/server-$round-$attack.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
    if [ "$attack" != quiet ]; then
        timeout $((CHAT_SECONDS + 40)) python3 loadtest/attack.py "$attack" "$PORT" $((CHAT_SECONDS + 15)) \
            >"$OUT/attack-$round-$attack.log" 2>&1 &
        ATTACK_PID=$!
        sleep 3
    fi
    timeout $((CHAT_SECONDS + 60)) "$LOADTEST" --url "ws://127.0.0.1:$PORT" "${TOKEN_FLAGS[@]}" --scenario chat \
        --clients "$CLIENTS" --rooms $((CLIENTS / 100)) --rate 1 --duration "$CHAT_SECONDS" \
        --max-seconds $((CHAT_SECONDS + 50)) --quiet --summary "$LINES" --label "attack-$attack" \
        >"$OUT/$round-$attack.txt" 2>&1 || true
    stop
    echo "  round $round $attack: $(tail -n 1 "$LINES" | python3 -c 'import json,sys; s=json.load(sys.stdin); print("p99 %.2f ms, %s deliveries/s, %s lost" % (s.get("p99_us", float("nan"))/1000, s.get("deliveries_per_sec"), s.get("loss")))')" >&2
}

for round in $(seq 1 "$RUNS"); do
    for attack in quiet $ATTACKS; do run "$round" "$attack"; done
done
python3 - "$LINES" "$CLIENTS" $ATTACKS <<'PY'
import json, statistics, sys
path, clients, attacks = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
runs = [json.loads(l) for l in open(path) if l.strip()]
def p99s(a):
    return [s["p99_us"] / 1000 for s in runs if s.get("label") == "attack-" + a and s.get("p99_us") is not None]
def failed(a):
    return sum(1 for s in runs if s.get("label") == "attack-" + a and not s.get("pass"))
quiet = statistics.median(p99s("quiet"))
print("\n| beside the normal room (%d clients, 1 msg/s/room) | p99 runs, ms | median | / quiet | runs that did not pass |" % clients)
print("|---|---|---|---|---|")
for a in ["quiet"] + attacks:
    v = p99s(a)
    if not v:
        print("| %s | (no result) | | | |" % a)
        continue
    m = statistics.median(v)
    print("| %s | %s | %.2f | %.2f | %d |" % (a, " / ".join("%.2f" % x for x in v), m, m / quiet, failed(a)))
print("\n(run lines: %s)" % path)
PY

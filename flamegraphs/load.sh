#!/usr/bin/env bash
# Flame graph of the server under one load scenario, on one machine over loopback, with steady
# publishers (one message per publisher write at even intervals).
#
#   flamegraphs/load.sh saturate       # -> flamegraphs/saturate.svg
#   flamegraphs/load.sh hot            # -> flamegraphs/hot.svg
#
# saturate: 1,000 clients in 10 rooms at 200 msg/s/room held as one step (200,000 deliveries a
#           second offered, past what two cores serve with the load generator beside the
#           server), so every sample is of a saturated server; no p99 bound ends it early.
# hot:      100 members of one room, one publisher at 1,500 msg/s.
# SECS seconds are sampled (default 20), from 3 s after the load starts (past the ramp).
set -euo pipefail
cd "$(dirname "$0")/.."
scenario=${1:-}
SECS=${SECS:-20}
case "$scenario" in
  saturate) PORT=${PORT:-19300}
            load=(--clients 1000 --rooms 10 --scenario saturate --rate 200
                  --step-seconds $((SECS + 6)) --max-p99-ms 1000000) ;;
  hot) PORT=${PORT:-19301}
       load=(--clients 100 --rooms 1 --scenario hot) ;;
  *) echo "usage: flamegraphs/load.sh saturate|hot" >&2; exit 2 ;;
esac
cargo build --profile release-with-debug -p roomcast
cargo build --release -p loadtest
target/release-with-debug/roomcast --listen "127.0.0.1:$PORT" --rate-limit off \
    >"${TMPDIR:-/tmp}/roomcast-$scenario.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true' EXIT
for _ in $(seq 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
    sleep 0.1
done
target/release/loadtest --url "ws://127.0.0.1:$PORT" "${load[@]}" --publish-pacing steady \
    --duration $((SECS + 6)) --max-seconds 120 &
lt=$!
sleep 3
flamegraphs/record.sh "$pid" "$SECS" "flamegraphs/$scenario.svg"
wait "$lt"

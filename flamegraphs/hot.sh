#!/usr/bin/env bash
# Flame graph of the server during `hot` (100 members in one room, one steady publisher at
# 1,500 msg/s: 150,000 deliveries a second), on one machine over loopback.
#
#   flamegraphs/hot.sh                 # writes flamegraphs/hot.svg
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${PORT:-19301}
SECS=${SECS:-10}
cargo build --profile release-with-debug -p roomcast
cargo build --release -p loadtest
target/release-with-debug/roomcast --listen "127.0.0.1:$PORT" --rate-limit off \
    >"${TMPDIR:-/tmp}/roomcast-hot.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true' EXIT
for _ in $(seq 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
    sleep 0.1
done
target/release/loadtest --url "ws://127.0.0.1:$PORT" --clients 100 --rooms 1 --scenario hot \
    --publish-pacing steady --duration $((SECS + 6)) --max-seconds 60 &
lt=$!
sleep 3 # past the ramp
flamegraphs/record.sh "$pid" "$SECS" flamegraphs/hot.svg
wait "$lt"

#!/usr/bin/env bash
# Flame graph of the server during `saturate` (1,000 clients, 10 rooms), saturated, on one
# machine over loopback.
#
#   flamegraphs/saturate.sh            # writes flamegraphs/saturate.svg and prints the report
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${PORT:-19300}
SECS=${SECS:-20}
cargo build --profile release-with-debug -p roomcast
cargo build --release -p loadtest
target/release-with-debug/roomcast --listen "127.0.0.1:$PORT" --rate-limit off \
    >"${TMPDIR:-/tmp}/roomcast-saturate.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true' EXIT
for _ in $(seq 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
    sleep 0.1
done
# One step held for the whole sample at 200 msg/s/room with steady publishers (200,000
# deliveries a second offered, past what two cores serve with the load generator beside the
# server), so every sample is of a saturated server; no p99 bound ends the step early.
target/release/loadtest --url "ws://127.0.0.1:$PORT" --clients 1000 --rooms 10 \
    --scenario saturate --publish-pacing steady --rate 200 --step-seconds $((SECS + 6)) \
    --max-p99-ms 1000000 --duration $((SECS + 6)) --max-seconds 120 &
lt=$!
sleep 3 # past the ramp
flamegraphs/record.sh "$pid" "$SECS" flamegraphs/saturate.svg
wait "$lt"

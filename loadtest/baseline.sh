#!/usr/bin/env bash
# roomcast against the `minimal` baseline server (loadtest/src/bin/minimal.rs: the plain way to
# write a room broadcast server on the same crates), the same scenarios on both in the same run,
# alternating, medians of RUNS rounds: loadtest/compare.sh with A = minimal, B = roomcast.
#
#   cargo build --release -p loadtest && cargo build --release
#   loadtest/baseline.sh [ROOMCAST_BIN]      # default target/release/roomcast
#   QUICK=1 loadtest/baseline.sh             # a few minutes, to check that it works
#
# A = $MINIMAL (default target/release/minimal) with no flag but --listen; B = roomcast with
# compare.sh's flags (--rate-limit off --max-connections CLIENTS+500 $SERVER_ARGS). The load
# generator is $LOADTEST (default target/release/loadtest): it reads both servers' CPU time and
# RSS from /proc, so deliveries per server CPU-second mean the same for both. Every other
# setting is compare.sh's (RUNS, CLIENTS, SCENARIOS, PACING, the *_SECONDS, TOTAL_SECONDS...).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOMCAST=${1:-target/release/roomcast}
MINIMAL=${MINIMAL:-target/release/minimal}
export LOADTEST=${LOADTEST:-target/release/loadtest}
for bin in "$MINIMAL" "$ROOMCAST" "$LOADTEST"; do
    if [ ! -x "$bin" ]; then
        echo "baseline.sh: no $bin (cargo build --release -p loadtest && cargo build --release)" >&2
        exit 2
    fi
done
export A_ARGS=${A_ARGS-}
exec loadtest/compare.sh "$MINIMAL" "$ROOMCAST"

#!/usr/bin/env bash
# WebSocket conformance: runs the Autobahn|Testsuite fuzzing client (../shared/autobahn) against
# `roomcast --echo`. Usage: scripts/autobahn.sh [CASES]   (CASES as in ../shared/autobahn/run.sh:
# default = everything but 9.* and 12.*/13.*; "9.*" = performance; "all").
# Exits non-zero if any case FAILED. Installs the suite under /tmp first when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
AUTOBAHN=${AUTOBAHN:-../shared/autobahn}
PROFILE=${PROFILE:-debug}
PORT=${PORT:-19777}

[ -x /tmp/autobahn-venv/bin/wstest ] || bash "$AUTOBAHN/install.sh"
if [ "$PROFILE" = release ]; then cargo build --release -p roomcast; else cargo build -p roomcast; fi
# 9.* sends messages of up to 16 MiB, and 9.3/9.4 split 4 MiB into 65,536 fragments.
"target/$PROFILE/roomcast" --echo --listen "127.0.0.1:$PORT" --max-message-bytes 16777216 \
  --ping-interval 5m >"${TMPDIR:-/tmp}/roomcast-autobahn.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  curl -fs "http://127.0.0.1:$PORT/healthz" >/dev/null && break
  sleep 0.1
done
"$AUTOBAHN/run.sh" "ws://127.0.0.1:$PORT/echo" "$@"

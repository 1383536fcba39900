#!/usr/bin/env bash
# WebSocket conformance: runs the Autobahn|Testsuite fuzzing client (scripts/autobahn/) against
# `roomcast --echo`. Usage: scripts/autobahn.sh [CASES]   (CASES as in scripts/autobahn/run.sh:
# default = everything but 9.* and 12.*/13.*; "9.*" = performance; "12.*,13.*" =
# permessage-deflate, a long step of its own; "all").
# Exits non-zero if any case FAILED, or if the suite cannot be installed (scripts/autobahn/
# install.sh puts it under /tmp the first time, about a minute; a no-op after).
# Seen here (debug build): default set 247 cases, OK=240 NON-STRICT=4 INFORMATIONAL=3 FAILED=0
# (~15 s); '9.*' 54 cases, OK=54 (~25-35 s); with PROFILE=release, '12.*,13.*' 216 cases,
# OK=216 (23 min). Reports: /tmp/autobahn-reports/index.html.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-debug}
PORT=${PORT:-19777}

log="${TMPDIR:-/tmp}/roomcast-autobahn-install.log"
if ! bash scripts/autobahn/install.sh >"$log" 2>&1; then
  tail -20 "$log" >&2
  echo "scripts/autobahn.sh: could not install Autobahn|Testsuite (log: $log)" >&2
  exit 2
fi
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
scripts/autobahn/run.sh "ws://127.0.0.1:$PORT/echo" "$@"

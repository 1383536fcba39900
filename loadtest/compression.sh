#!/usr/bin/env bash
# permessage-deflate's gain and cost on one server: wire bytes and server CPU per delivery, with
# the clients offering compression (`--compression`) and without, at saturation.
#
#   loadtest/compression.sh            # release builds of roomcast and loadtest
#
# For each payload (PAYLOADS: "prose 500" = chat text of 500 bytes, "json 4096" = a 4 KiB JSON
# document in the text), RUNS rounds of: a fresh `roomcast --rate-limit off` and
# `loadtest --scenario saturate` (1,000 clients, 10 rooms, steady publishers, from RATE) with plain
# clients, then the same with compressing clients. From each run, the last step that passed:
# server CPU µs per delivery and bytes on the wire per delivery. Prints the medians and the
# compressed/plain ratios. Reports go to loadtest/results/full/compression-<stamp>/ (ignored by
# git). Only processes this script started are stopped, by PID.
#
# The compressing clients share the server's machine: if each inflated every delivery, they would
# saturate before the server does (the server compresses a message once for all its members, the
# clients would inflate it once each). So the clients of one load generator thread inflate each
# message once and find it again under the same compressed bytes (`loadtest --inflate shared`,
# its default); every client still checks every delivery's seq and latency.
set -euo pipefail
cd "$(dirname "$0")/.."
SERVER=${SERVER:-target/release/roomcast}
LOADTEST=${LOADTEST:-target/release/loadtest}
RUNS=${RUNS:-3}
DURATION=${DURATION:-24}
STEP_SECONDS=${STEP_SECONDS:-4}
# From 25 msg/s/room, doubling; p99 up to 250 ms: the machine is shared, and the figures are
# costs per delivery at the last step that held, not latencies.
RATE=${RATE:-25}
MAX_P99_MS=${MAX_P99_MS:-250}
PAYLOADS=${PAYLOADS:-"prose:500 json:4096"}
port=${BASE_PORT:-19400}
out=loadtest/results/full/compression-$(date +%Y%m%d-%H%M%S)
mkdir -p "$out"
spid=
trap '[ -n "$spid" ] && kill "$spid" 2>/dev/null; true' EXIT
for payload in $PAYLOADS; do
  kind=${payload%%:*} bytes=${payload##*:}
  for run in $(seq "$RUNS"); do
    for mode in plain deflate; do
      port=$((port + 1))
      "$SERVER" --listen "127.0.0.1:$port" --rate-limit off >"$out/server-$kind-$mode-$run.log" 2>&1 &
      spid=$!
      for _ in $(seq 50); do curl -fs "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
      flag=()
      [ "$mode" = deflate ] && flag=(--compression)
      "$LOADTEST" --url "ws://127.0.0.1:$port" --clients 1000 --rooms 10 --scenario saturate \
        --rate "$RATE" --max-p99-ms "$MAX_P99_MS" --duration "$DURATION" --step-seconds "$STEP_SECONDS" --payload-bytes "$bytes" \
        --payload-kind "$kind" "${flag[@]}" --json "$out/$kind-$mode-$run.json" \
        >"$out/$kind-$mode-$run.txt" 2>&1 || true
      kill "$spid" 2>/dev/null || true
      wait "$spid" 2>/dev/null || true
      spid=
    done
  done
done
python3 - "$out" <<'PY'
import glob, json, os, statistics, sys
out = sys.argv[1]
rows = {}
for f in sorted(glob.glob(os.path.join(out, "*.json"))):
    kind, mode, run = os.path.basename(f)[:-5].split("-")
    r = json.load(open(f))
    steps = [s for s in (r.get("saturation") or {}).get("steps", []) if s.get("passed") and s.get("cost")]
    if not steps:
        print(f"{f}: no passing step"); continue
    s = steps[-1]; c = s["cost"]
    cpu = c["total"].get("cpu_seconds")
    us = cpu * 1e6 / c["deliveries"] if cpu and c["deliveries"] else None
    wire = c.get("wire_bytes_per_delivery")
    rows.setdefault((kind, mode), []).append((us, wire, s["deliveries_per_sec"], s["rate"]))
    print(f"{kind} {mode} run {run}: rate {s['rate']:.0f}/room, {s['deliveries_per_sec']:.0f} deliveries/s, "
          f"{us:.2f} µs server CPU per delivery, {wire:.0f} wire bytes per delivery")
med = {}
for (kind, mode), v in sorted(rows.items()):
    us = statistics.median(x[0] for x in v); wire = statistics.median(x[1] for x in v)
    med[(kind, mode)] = (us, wire)
    print(f"median {kind} {mode}: {us:.2f} µs/delivery, {wire:.0f} B/delivery "
          f"(µs {[round(x[0],2) for x in v]}, B {[round(x[1]) for x in v]}, deliveries/s {[round(x[2]) for x in v]})")
for kind in sorted({k for k, _ in med}):
    if (kind, "plain") in med and (kind, "deflate") in med:
        p, d = med[(kind, "plain")], med[(kind, "deflate")]
        print(f"{kind}: wire bytes {p[1]/d[1]:.2f}x fewer compressed; server CPU per delivery x{d[0]/p[0]:.2f}")
PY

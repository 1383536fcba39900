#!/usr/bin/env bash
# permessage-deflate's gain and cost on one server: wire bytes and server CPU per delivery, with
# the clients offering compression (`--compression`) and without, at saturation.
#
#   loadtest/compression.sh              # release builds of roomcast and loadtest
#   SCENARIO=hot loadtest/compression.sh
#
# For each payload (PAYLOADS: "prose 500" = chat text of 500 bytes, "json 4096" = a 4 KiB JSON
# document in the text), RUNS rounds of: a fresh `roomcast --rate-limit off` and a load run with
# plain clients, then the same with compressing clients. Steady publishers. SCENARIO:
#   saturate (default)  1,000 clients in 10 rooms, from RATE msg/s/room doubling every
#                       STEP_SECONDS: server CPU µs and wire bytes per delivery at every step
#                       that held (p99 ≤ MAX_P99_MS, no loss), and the last one each run held
#   hot                 100 clients in one room, one publisher at HOT_RATE msg/s (default
#                       1,500) for DURATION: the server writes 150,000 deliveries a second, the
#                       load generator little per delivery; the same two figures for the run
# Prints the medians and the compressed/plain ratios. Reports go to loadtest/results/full/compression-<stamp>/ (ignored by
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
SCENARIO=${SCENARIO:-saturate}
HOT_RATE=${HOT_RATE:-1500}
case "$SCENARIO" in
  saturate) load=(--clients 1000 --rooms 10 --scenario saturate --rate "$RATE" --max-p99-ms "$MAX_P99_MS"
                  --step-seconds "$STEP_SECONDS") ;;
  hot) load=(--clients 100 --rooms 1 --scenario hot --rate "$HOT_RATE") ;;
  *) echo "compression.sh: SCENARIO is saturate or hot, not $SCENARIO" >&2; exit 2 ;;
esac
PAYLOADS=${PAYLOADS:-"prose:500 json:4096"}
port=${BASE_PORT:-19400}
out=loadtest/results/full/compression-$SCENARIO-$(date +%Y%m%d-%H%M%S)
mkdir -p "$out"
spid=
trap '[ -n "$spid" ] && kill "$spid" 2>/dev/null; true' EXIT
for payload in $PAYLOADS; do
  kind=${payload%%:*} bytes=${payload##*:}
  for run in $(seq "$RUNS"); do
    for mode in plain deflate; do
      port=$((port + 1))
      "$SERVER" --listen "127.0.0.1:$port" --rate-limit off >"$out/server-$kind$bytes-$mode-$run.log" 2>&1 &
      spid=$!
      for _ in $(seq 50); do curl -fs "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
      flag=()
      [ "$mode" = deflate ] && flag=(--compression)
      "$LOADTEST" --url "ws://127.0.0.1:$port" "${load[@]}" --duration "$DURATION" --payload-bytes "$bytes" \
        --payload-kind "$kind" "${flag[@]}" --json "$out/$kind$bytes-$mode-$run.json" \
        >"$out/$kind$bytes-$mode-$run.txt" 2>&1 || true
      kill "$spid" 2>/dev/null || true
      wait "$spid" 2>/dev/null || true
      spid=
    done
  done
done
python3 - "$out" <<'PY'
import glob, json, os, statistics, sys
out = sys.argv[1]

def per_delivery(cost):
    cpu = (cost.get("total") or {}).get("cpu_seconds")
    n = cost.get("deliveries")
    return (cpu * 1e6 / n if cpu and n else None), cost.get("wire_bytes_per_delivery")

# (kind, mode, label) -> [(µs per delivery, wire bytes per delivery)], label = a step's rate or "run"
rows, last = {}, {}
for f in sorted(glob.glob(os.path.join(out, "*.json"))):
    kind, mode, run = os.path.basename(f)[:-5].split("-")
    r = json.load(open(f))
    sat = r.get("saturation")
    if sat:
        held = [s for s in sat.get("steps", []) if s.get("passed") and s.get("cost")]
        for s in held:
            rows.setdefault((kind, mode, s["rate"]), []).append(per_delivery(s["cost"]))
        last.setdefault((kind, mode), []).append(held[-1]["rate"] if held else 0)
        print(f"{kind} {mode} run {run}: held " + ", ".join(
            f"{s['rate']:.0f}/room ({per_delivery(s['cost'])[0]:.2f} µs, {s['deliveries_per_sec']:.0f}/s)"
            for s in held) + f"; stopped: {sat.get('stopped_because')}")
    elif r.get("cost") and not r.get("loss"):
        us, wire = per_delivery(r["cost"])
        rows.setdefault((kind, mode, "run"), []).append((us, wire))
        print(f"{kind} {mode} run {run}: {r['deliveries_per_sec']:.0f} deliveries/s, {us:.2f} µs server CPU "
              f"and {wire:.0f} wire bytes per delivery, p99 {r['latency_us']['p99'] / 1000:.1f} ms")
    else:
        print(f"{f}: no figure (loss {r.get('loss')})")
for (kind, mode), v in sorted(last.items()):
    print(f"{kind} {mode}: last step held {v}, median {statistics.median(v):.0f} msg/s/room")
for (kind, mode, label) in sorted({k for k in rows if k[1] == "plain"}, key=str):
    p, d = rows[(kind, "plain", label)], rows.get((kind, "deflate", label))
    if not d:
        continue
    # Only labels both modes reached in every run: a median of fewer runs is not one of three.
    if len(p) != len(d):
        print(f"{kind} at {label}: plain held it {len(p)} times, compressed {len(d)}: no ratio")
        continue
    pu, pw = statistics.median(x[0] for x in p), statistics.median(x[1] for x in p)
    du, dw = statistics.median(x[0] for x in d), statistics.median(x[1] for x in d)
    print(f"{kind} at {label}: server µs/delivery plain {pu:.2f} {[round(x[0], 2) for x in p]} -> compressed "
          f"{du:.2f} {[round(x[0], 2) for x in d]} (x{du / pu:.2f}); wire bytes {pw:.0f} -> {dw:.0f} "
          f"({pw / dw:.2f}x fewer)")
PY

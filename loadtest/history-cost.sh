#!/usr/bin/env bash
# The cost of history on the chat scenario: --history 0, the default, and
# --history-db, alternated, two rounds. Needs release builds (cargo build --release -p roomcast -p loadtest).
# Each run appends its one-line summary to loadtest/results/summary.jsonl (label history-<cfg>)
# and writes its full report to loadtest/results/full/ (ignored by git).
set -uo pipefail
cd "$(dirname "$0")/.."
port=${BASE_PORT:-20100}
stamp=$(date +%Y%m%d-%H%M%S)
summary=${SUMMARY:-loadtest/results/summary.jsonl}
mkdir -p loadtest/results/full
for round in 1 2; do
  for cfg in off default db; do
    port=$((port+1))
    case $cfg in
      off) extra=(--history 0);;
      default) extra=();;
      db) rm -f /tmp/hb.sqlite*; extra=(--history-db /tmp/hb.sqlite);;
    esac
    target/release/roomcast --listen 127.0.0.1:$port --max-connections 30000 --max-connections-per-ip off --rate-limit off "${extra[@]}" > /tmp/hb-$cfg.log 2>&1 &
    pid=$!
    sleep 1
    out=$(timeout 200 target/release/loadtest --url ws://127.0.0.1:$port --clients 19000 --rooms 190 --scenario chat --rate 1 --duration 10 --quiet \
      --json "loadtest/results/full/$stamp-history-$cfg-r$round-chat.json" --summary "$summary" --label "history-$cfg" 2>&1)
    echo "round $round $cfg: $(echo "$out" | grep -E 'deliveries/s  ' | tr -s ' ') | $(echo "$out" | grep -E 'loss /' | tr -s ' ') | $(echo "$out" | grep -E 'latency p50' | tr -s ' ') | $(echo "$out" | grep -E '^ *result ' | tr -s ' ')"
    if [ $cfg = db ]; then curl -s 127.0.0.1:$port/api/stats | python3 -c "import sys,json;d=json.load(sys.stdin);print('   db written',d.get('history_db_written'),'dropped',d.get('history_db_dropped'))"; fi
    kill $pid; wait $pid 2>/dev/null
  done
done

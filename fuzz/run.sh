#!/usr/bin/env bash
# Runs every fuzz target in turn for SECONDS each (default 600), one worker, at the lowest CPU
# priority, starting from the committed seeds (fuzz/seeds/) plus whatever fuzz/corpus/ holds.
# Logs go to fuzz/logs/, crashes to fuzz/artifacts/ (both ignored by git). Needs nightly and
# cargo-fuzz: `cargo install cargo-fuzz`.
#   fuzz/run.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")"
here="$PWD"
secs="${1:-600}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(client_message names ws_target ws_frame cluster_wire routes)
mkdir -p logs
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  dirs=("$here/corpus/$t")
  [ -d "seeds/$t" ] && dirs+=("$here/seeds/$t")
  opts=(-max_total_time="$secs" -max_len=8192 -print_final_stats=1)
  [ -f "dicts/$t.dict" ] && opts+=(-dict="$here/dicts/$t.dict")
  echo "=== $t: ${secs}s ==="
  nice -n 19 cargo +nightly fuzz run "$t" "${dirs[@]}" -- "${opts[@]}" >"logs/$t.log" 2>&1 ||
    { echo "!!! $t FAILED: see fuzz/logs/$t.log"; tail -n 40 "logs/$t.log"; exit 1; }
  grep -E '^#[0-9]+[[:space:]]+DONE|^stat::' "logs/$t.log" || tail -n 5 "logs/$t.log"
done

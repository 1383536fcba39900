#!/usr/bin/env bash
# Samples one running process with perf and renders an SVG flame graph with inferno.
#
#   flamegraphs/record.sh PID SECONDS OUT.svg
#
# The process should be a `release-with-debug` build (symbols and DWARF unwind tables;
# `cargo build --profile release-with-debug -p roomcast`). Needs `perf` (Debian: linux-perf) and
# inferno (`cargo install inferno`); this script says what is missing instead of guessing.
# Call graphs come from DWARF unwinding: release builds keep no frame pointers.
set -euo pipefail
pid=$1 secs=$2 out=$3
command -v perf >/dev/null || { echo "record.sh: perf not found (apt-get install linux-perf)" >&2; exit 2; }
command -v inferno-collapse-perf >/dev/null || { echo "record.sh: inferno not found (cargo install inferno)" >&2; exit 2; }
kill -0 "$pid" 2>/dev/null || { echo "record.sh: no process $pid" >&2; exit 2; }
data=$(mktemp --suffix .perf.data)
trap 'rm -f "$data"' EXIT
# 199 Hz keeps DWARF stack copies (8 KiB a sample) to tens of MB for a minute of two threads.
perf record -e cpu-clock -F 199 --call-graph dwarf,8192 -p "$pid" -o "$data" -- sleep "$secs" 2>&1 | tail -1 >&2
perf script -i "$data" 2>/dev/null | inferno-collapse-perf | inferno-flamegraph \
    --title "roomcast pid $pid, $secs s: $(basename "$out" .svg)" >"$out"
echo "record.sh: wrote $out" >&2

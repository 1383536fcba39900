#!/usr/bin/env bash
# The one command that runs every test, from a clone of this repository alone: installs what the
# tests need when it is missing (Debian's chromium for the browser test, redis-server for the
# cluster tests, playwright-core from npm, Autobahn|Testsuite under /tmp), then runs the
# Autobahn conformance suite and the whole workspace's suite with cargo-nextest (or cargo test
# where nextest is absent), then compiles the fuzz targets.
#
# Tests that need a program from outside the Rust toolchain are `#[ignore = "needs <program>"]`,
# so a plain `cargo test` / `cargo nextest run` passes without them; this script runs them
# wherever the program is present (NEEDS below maps each program to its test binary). What
# cannot run is counted and printed loudly at the start and the end; under CI=true it is an
# error, before anything runs.
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else "$@"; fi; }

need_apt=()
[ -x "${CHROMIUM:-/usr/bin/chromium}" ] || need_apt+=(chromium)
# tests/cluster.rs starts its own redis-server processes.
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v node >/dev/null || need_apt+=(nodejs npm)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "scripts/test.sh: installing ${need_apt[*]}"
  if ! { as_root apt-get update -qq && DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${need_apt[@]}"; }; then
    echo "scripts/test.sh: WARNING: could not install ${need_apt[*]}" >&2
  fi
fi
if command -v npm >/dev/null && [ ! -d tests/browser/node_modules/playwright-core ]; then
  echo "scripts/test.sh: installing playwright-core (no browser download)"
  (cd tests/browser && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund) ||
    echo "scripts/test.sh: WARNING: npm ci failed" >&2
fi

# tests/compression.rs checks compressed delivery with an independent client: Python
# `websockets`, in a venv of its own under target/ (nothing system-wide).
PY_WEBSOCKETS_VENV=target/py-websockets
if ! "$PY_WEBSOCKETS_VENV/bin/python" -c 'import websockets' >/dev/null 2>&1; then
  echo "scripts/test.sh: installing Python websockets into $PY_WEBSOCKETS_VENV"
  { python3 -m venv "$PY_WEBSOCKETS_VENV" && "$PY_WEBSOCKETS_VENV/bin/pip" install -q websockets; } ||
    echo "scripts/test.sh: WARNING: could not install Python websockets" >&2
fi

# Each program the ignored tests need, and the test binary (tests/<name>.rs) whose tests need
# it. Every `#[ignore]`d test must belong to one of these binaries (checked below).
has_chromium() {
  [ -x "${CHROMIUM:-/usr/bin/chromium}" ] && command -v node >/dev/null &&
    [ -d tests/browser/node_modules/playwright-core ]
}
has_redis() { command -v redis-server >/dev/null; }
has_py_websockets() { "$PY_WEBSOCKETS_VENV/bin/python" -c 'import websockets' >/dev/null 2>&1; }
# tests/client.rs: roomcast.js in Node (its own WebSocket, no npm packages).
has_node() { command -v node >/dev/null; }
NEEDS=("redis-server:cluster:has_redis" "redis-server:behaviour:has_redis" "chromium:browser:has_chromium"
       "redis-server:sse:has_redis" "python3-websockets:compression:has_py_websockets"
       "node:client:has_node" "redis-server:accounts:has_redis")

run_bins=() skip_bins=() not_run=()
for entry in "${NEEDS[@]}"; do
  IFS=: read -r program bin check <<<"$entry"
  if "$check"; then run_bins+=("$bin"); else skip_bins+=("$bin"); not_run+=("tests/$bin.rs (needs $program)"); fi
done
# Autobahn|Testsuite: Python 2.7 from Debian bullseye packages plus a virtualenv, under /tmp.
autobahn_log="${TMPDIR:-/tmp}/roomcast-autobahn-install.log"
echo "scripts/test.sh: checking the Autobahn|Testsuite install (log: $autobahn_log)"
if bash scripts/autobahn/install.sh >"$autobahn_log" 2>&1; then
  autobahn=yes
else
  autobahn=no
  tail -20 "$autobahn_log" >&2
  not_run+=("Autobahn conformance (scripts/autobahn/install.sh failed)")
fi

report_not_run() {
  [ ${#not_run[@]} -gt 0 ] || return 0
  {
    echo
    echo "!!!!! NOT RUN: ${#not_run[@]} part(s) of the suite, a program is missing:"
    for what in "${not_run[@]}"; do echo "!!!!!   $what"; done
    [ -n "${not_run_tests:-}" ] && echo "!!!!! $not_run_tests"
    echo "!!!!! (their tests are #[ignore]d: the test runner counts them as skipped, not passed)"
    echo
  } >&2
}
if [ ${#not_run[@]} -gt 0 ] && [ "${CI:-}" = true ]; then
  report_not_run
  echo "scripts/test.sh: CI=true: every part of the suite must run; failing" >&2
  exit 1
fi
report_not_run
# ... and again as the last thing printed, pass or fail.
trap report_not_run EXIT

# WebSocket conformance (Autobahn|Testsuite against `roomcast --echo`, ~30 s). Runs before the
# Rust suite so the runner's summary stays last.
# Every step runs whatever the one before did; the script fails at the end if any failed.
failed=()
if [ "$autobahn" = yes ]; then
  scripts/autobahn.sh || failed+=("Autobahn conformance (default cases)")
  scripts/autobahn.sh '9.*' || failed+=("Autobahn conformance (9.*)")
  # permessage-deflate: every group of 12.* and 13.* (each payload kind, each negotiation,
  # small windows and several offers included) at the five sizes up to 4 KiB, 60 cases. The
  # larger sizes push hundreds of MiB through Python 2's client: all 216 cases took 23 minutes
  # with a release build (`PROFILE=release scripts/autobahn.sh '12.*,13.*'`, OK=216); run them
  # when the extension code changes.
  # (Autobahn matches case patterns as prefixes: `12.*.1` also names 12.x.10-18, excluded.)
  large=$(for g in 12 13; do for n in $(seq 10 18); do printf '%s.*.%s,' "$g" "$n"; done; done)
  EXCLUDE=${large%,} TIMEOUT=${AUTOBAHN_DEFLATE_TIMEOUT:-1200} scripts/autobahn.sh \
    '12.*.1,12.*.2,12.*.3,12.*.4,12.*.5,13.*.1,13.*.2,13.*.3,13.*.4,13.*.5' ||
    failed+=("Autobahn conformance (12.*, 13.*: permessage-deflate)")
fi

if cargo nextest --version >/dev/null 2>&1; then
  any_of() { local f="" b; for b in "$@"; do f="${f:+$f | }binary($b)"; done; echo "${f:-none()}"; }
  # No ignored test may fall outside NEEDS: it would run nowhere.
  stray=$(cargo nextest list --workspace --run-ignored ignored-only -T oneline \
    -E "not ($(any_of "${run_bins[@]}" "${skip_bins[@]}"))")
  if [ -n "$stray" ]; then
    echo "scripts/test.sh: ignored tests that no entry of NEEDS runs:" >&2
    echo "$stray" >&2
    exit 1
  fi
  if [ ${#skip_bins[@]} -gt 0 ]; then
    n=$(cargo nextest list --workspace --run-ignored all -T oneline -E "$(any_of "${skip_bins[@]}")" | grep -c . || true)
    not_run_tests="$n test(s) in ${skip_bins[*]} not run"
  fi
  cargo nextest run --workspace --no-fail-fast --run-ignored all \
    -E "not ($(any_of "${skip_bins[@]}"))" "$@" || failed+=("the Rust test suite")
else
  cargo test --workspace --no-fail-fast "$@" || failed+=("the Rust test suite")
  for bin in "${run_bins[@]}"; do
    cargo test -p roomcast --test "$bin" --no-fail-fast "$@" -- --ignored || failed+=("tests/$bin.rs")
  done
fi

# The fuzz targets (fuzz/, their own workspace) must keep compiling as the code they call
# changes: build them, without running them (fuzzing is fuzz/run.sh). They need a nightly
# toolchain and cargo-fuzz. A compile check only, so the cheapest build: no sanitizer, debug
# profile, in its own target dir (fuzz/run.sh's AddressSanitizer build stays untouched).
# Measured on the shared 2-core machine: 263 s cold, 5 s after a change in src/, 1 s warm
# (the default sanitizer release build: 344-478 s cold, 27 s after a change).
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "scripts/test.sh: installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  cargo +nightly fuzz build -s none --dev --target-dir target/fuzz-build || failed+=("the fuzz targets' build")
else
  # No nightly here: the stable compiler accepts cargo-fuzz's unstable flags with
  # RUSTC_BOOTSTRAP=1 (a compile check only; fuzzing itself is fuzz/run.sh on nightly).
  echo "scripts/test.sh: no nightly toolchain: building the fuzz targets with stable + RUSTC_BOOTSTRAP=1"
  RUSTC_BOOTSTRAP=1 cargo fuzz build -s none --dev --target-dir target/fuzz-build ||
    failed+=("the fuzz targets' build")
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "scripts/test.sh: FAILED: ${failed[*]}" >&2
  exit 1
fi

#!/usr/bin/env bash
# The one command that runs every test: installs what the tests need when it is missing
# (Debian's chromium for the browser test, redis-server for the cluster tests, playwright-core
# from npm), then runs the whole workspace's suite with cargo-nextest (or cargo test where
# nextest is absent).
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else "$@"; fi; }

need_apt=()
[ -x "${CHROMIUM:-/usr/bin/chromium}" ] || need_apt+=(chromium)
# tests/cluster.rs starts its own redis-server processes (skips loudly without, fails under CI).
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v node >/dev/null || need_apt+=(nodejs npm)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "scripts/test.sh: installing ${need_apt[*]}"
  if ! { as_root apt-get update -qq && DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${need_apt[@]}"; }; then
    echo "scripts/test.sh: WARNING: could not install ${need_apt[*]}; the browser and cluster tests will skip (or fail under CI=true)" >&2
  fi
fi
if command -v npm >/dev/null && [ ! -d tests/browser/node_modules/playwright-core ]; then
  echo "scripts/test.sh: installing playwright-core (no browser download)"
  (cd tests/browser && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund) ||
    echo "scripts/test.sh: WARNING: npm ci failed; the browser test will skip (or fail under CI=true)" >&2
fi

# WebSocket conformance (Autobahn|Testsuite against `roomcast --echo`, ~30 s plus a one-time
# install of about a minute). Runs before the Rust suite so the runner's summary stays last.
if [ -d ../shared/autobahn ]; then
  scripts/autobahn.sh
  scripts/autobahn.sh '9.*'
elif [ "${CI:-}" = true ]; then
  echo "scripts/test.sh: ../shared/autobahn is missing: cannot run the conformance suite under CI" >&2
  exit 1
else
  echo "!!!!! SKIPPED: Autobahn conformance (../shared/autobahn not found beside the checkout)" >&2
fi

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
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
  cargo +nightly fuzz build -s none --dev --target-dir target/fuzz-build
else
  # No nightly here: the stable compiler accepts cargo-fuzz's unstable flags with
  # RUSTC_BOOTSTRAP=1 (a compile check only; fuzzing itself is fuzz/run.sh on nightly).
  echo "scripts/test.sh: no nightly toolchain: building the fuzz targets with stable + RUSTC_BOOTSTRAP=1"
  RUSTC_BOOTSTRAP=1 cargo fuzz build -s none --dev --target-dir target/fuzz-build
fi

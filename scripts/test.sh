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

#!/usr/bin/env bash
# Installs Autobahn|Testsuite (wstest), the WebSocket conformance suite that scripts/autobahn.sh
# runs against `roomcast --echo`. Everything goes under /tmp (nothing system-wide, nothing in the
# checkout); about a minute the first time, a no-op after. Needs apt-get, dpkg-deb, python3 (venv)
# and a reachable Debian mirror and PyPI (or a pip find-links mirror).
#
# autobahntestsuite (even the 25.10.1 release) is Python 2.7 code pinned to
# Twisted 19.10 / autobahn 0.10.9; it does not run on Python 3. Debian 12 has
# no python2.7, so we fetch Debian 11 (bullseye) python2.7 .debs with apt
# (private apt config under /tmp, nothing installed system-wide), unpack them
# into $PY27, and build a python2.7 virtualenv at $VENV.
#
# Idempotent: re-running skips steps already done.
# Env overrides: PY27 (/tmp/py27), VENV (/tmp/autobahn-venv),
#                TOOLS (/tmp/autobahn-tools), APTDIR (/tmp/apt-bullseye)
set -euo pipefail

PY27=${PY27:-/tmp/py27}
VENV=${VENV:-/tmp/autobahn-venv}
TOOLS=${TOOLS:-/tmp/autobahn-tools}
APTDIR=${APTDIR:-/tmp/apt-bullseye}
export LD_LIBRARY_PATH="$PY27/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

if [ -x "$VENV/bin/wstest" ] && "$VENV/bin/wstest" -a >/dev/null 2>&1; then
  echo "wstest already installed in $VENV"; exit 0
fi

# 1. Python 2.7 from Debian bullseye, unpacked (not installed) into $PY27
if ! "$PY27/usr/bin/python2.7" -c 'import ssl, ctypes' >/dev/null 2>&1; then
  mkdir -p "$APTDIR/lists/partial" "$APTDIR/cache/archives/partial" "$APTDIR/debs"
  # the machine's own Debian mirror (first URIs line of its deb822 sources), suite bullseye
  MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null)
  [ -n "$MIRROR" ] || MIRROR=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list)
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR bullseye main" \
    > "$APTDIR/sources.list"
  APTOPT=(-o Dir::Etc::SourceList="$APTDIR/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o Dir::State::Lists="$APTDIR/lists" -o Dir::Cache="$APTDIR/cache")
  apt-get "${APTOPT[@]}" update
  (cd "$APTDIR/debs" && apt-get "${APTOPT[@]}" download \
      python2.7 python2.7-minimal libpython2.7-minimal libpython2.7-stdlib \
      libpython2.7 libpython2.7-dev python2.7-dev libssl1.1 libffi7)
  mkdir -p "$PY27"
  for f in "$APTDIR"/debs/*.deb; do dpkg-deb -x "$f" "$PY27"; done
fi
"$PY27/usr/bin/python2.7" -c 'import sys, ssl; print(sys.version.split()[0] + " " + ssl.OPENSSL_VERSION)'

# 2. virtualenv (last release that can still create py2.7 envs) in a py3 tool venv
if [ ! -x "$TOOLS/bin/virtualenv" ]; then
  python3 -m venv "$TOOLS"
  "$TOOLS/bin/pip" install -q "virtualenv<20.22"
fi
[ -x "$VENV/bin/python2.7" ] || "$TOOLS/bin/virtualenv" -p "$PY27/usr/bin/python2.7" "$VENV"

# 3. autobahntestsuite; its C deps (wsaccel, ujson) need the py2.7 headers
export CFLAGS="-I$PY27/usr/include -I$PY27/usr/include/python2.7"
"$VENV/bin/pip" install --no-cache-dir "autobahntestsuite==25.10.1"
"$VENV/bin/wstest" -a

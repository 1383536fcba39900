#!/usr/bin/env bash
# Run the Autobahn|Testsuite fuzzing client against a WebSocket echo endpoint.
#
#   run.sh URL [CASES]
#
#   URL    ws://127.0.0.1:PORT/path of an echo endpoint: it must echo every text and binary
#          message byte for byte, reassemble fragmented messages (9.3/9.4 send 4 MiB in 65,536
#          fragments), answer pings and complete the close handshake with the right codes
#   CASES  omitted -> every case except 9.* (performance) and 12.*/13.*
#                     (permessage-deflate)
#          all     -> every case (~517), nothing excluded
#          list    -> comma-separated ids/patterns, e.g. "1.*,2.*,5.*" or "6.4.1";
#                     nothing excluded unless EXCLUDE is set
#
# Env:
#   EXCLUDE       comma-separated patterns to exclude (overrides the default)
#   FAIL_BY_DROP  true|false (default true: dropping TCP without a close
#                 handshake where one is required counts as FAILED)
#   OUTDIR        report dir (default: /tmp/autobahn-reports;
#                 HTML at $OUTDIR/index.html, JSON at $OUTDIR/index.json)
#   TIMEOUT       seconds before wstest is killed (default 1800)
#   VENV, PY27    where install.sh put wstest / python2.7
#
# Prints:  autobahn: N cases, OK=a NON-STRICT=b INFORMATIONAL=c UNIMPLEMENTED=d FAILED=e
# Exit:    0 no case FAILED; 1 some case FAILED; 2 usage/setup/run error.
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
VENV=${VENV:-/tmp/autobahn-venv}
PY27=${PY27:-/tmp/py27}
OUTDIR=${OUTDIR:-/tmp/autobahn-reports}
TIMEOUT=${TIMEOUT:-1800}
FAIL_BY_DROP=${FAIL_BY_DROP:-true}

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  awk 'NR>1 && /^#/ {sub(/^# ?/, ""); print; next} NR>1 {exit}' "$0"; exit 2
fi
URL=$1
CASES_ARG=${2:-}
case "$URL" in ws://*) ;; *) echo "run.sh: URL must be ws://..., got '$URL'" >&2; exit 2;; esac
case "$FAIL_BY_DROP" in true|false) ;; *) echo "run.sh: FAIL_BY_DROP must be true|false" >&2; exit 2;; esac

if [ -z "$CASES_ARG" ]; then
  CASES="*"; EXCLUDE=${EXCLUDE-9.*,12.*,13.*}
elif [ "$CASES_ARG" = all ]; then
  CASES="*"; EXCLUDE=${EXCLUDE-}
else
  CASES=$CASES_ARG; EXCLUDE=${EXCLUDE-}
fi

WSTEST="$VENV/bin/wstest"
if [ ! -x "$WSTEST" ]; then
  echo "run.sh: $WSTEST not found; run $HERE/install.sh first" >&2; exit 2
fi
export LD_LIBRARY_PATH="$PY27/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# Pre-flight: is anything listening at URL's host:port?
python3 - "$URL" <<'EOF' || exit 2
import socket, sys, urllib.parse
u = urllib.parse.urlsplit(sys.argv[1])
host, port = u.hostname, u.port or 80
try:
    socket.create_connection((host, port), timeout=3).close()
except OSError as e:
    sys.exit(f"run.sh: cannot connect to {host}:{port}: {e}")
EOF

# Fresh report dir (only the files wstest writes there).
mkdir -p "$OUTDIR"
rm -f "$OUTDIR"/index.html "$OUTDIR"/index.json "$OUTDIR"/server_under_test_case_*.json \
      "$OUTDIR"/server_under_test_case_*.html "$OUTDIR"/spec.json "$OUTDIR"/wstest.log
SPEC="$OUTDIR/spec.json"

python3 - "$URL" "$CASES" "$EXCLUDE" "$OUTDIR" "$FAIL_BY_DROP" > "$SPEC" <<'EOF'
import json, sys
url, cases, exclude, outdir, fbd = sys.argv[1:6]
split = lambda s: [c.strip() for c in s.split(",") if c.strip()]
print(json.dumps({
    "options": {"failByDrop": fbd == "true"},
    "outdir": outdir,
    "servers": [{"agent": "server-under-test", "url": url}],
    "cases": split(cases),
    "exclude-cases": split(exclude),
    "exclude-agent-cases": {},
}, indent=2))
EOF

echo "run.sh: url=$URL cases=[$CASES] exclude=[$EXCLUDE] failByDrop=$FAIL_BY_DROP outdir=$OUTDIR" >&2
START=$(date +%s)
# wstest writes reports relative to cwd only via "outdir"; run it in OUTDIR so
# nothing else lands in the caller's cwd.
(cd "$OUTDIR" && timeout "$TIMEOUT" "$WSTEST" -m fuzzingclient -s "$SPEC") > "$OUTDIR/wstest.log" 2>&1
RC=$?
END=$(date +%s)
echo "run.sh: wstest exited $RC after $((END-START))s (log: $OUTDIR/wstest.log)" >&2
if [ $RC -ne 0 ]; then
  tail -20 "$OUTDIR/wstest.log" >&2
  [ $RC -eq 124 ] && echo "run.sh: wstest timed out after ${TIMEOUT}s" >&2
fi

python3 - "$OUTDIR/index.json" "$RC" <<'EOF'
import json, sys, collections
path, rc = sys.argv[1], int(sys.argv[2])
try:
    with open(path) as f:
        data = json.load(f)
except (OSError, ValueError) as e:
    print(f"run.sh: no usable report at {path}: {e}", file=sys.stderr)
    sys.exit(2)
res = data.get("server-under-test", {})
if not res:
    print("run.sh: report has no results for agent server-under-test", file=sys.stderr)
    sys.exit(2)
key = lambda cid: [int(p) for p in cid.split(".")]
known = ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED")
cnt = collections.Counter()
failed, close = [], collections.Counter()
for cid in sorted(res, key=key):
    b = res[cid]["behavior"]
    if b in known:
        cnt[b] += 1
    else:                       # FAILED, NO_CLOSE, anything unexpected
        cnt["FAILED"] += 1
        failed.append(f"{cid}({b})")
    close[res[cid].get("behaviorClose")] += 1
print(f"autobahn: {len(res)} cases, OK={cnt['OK']} NON-STRICT={cnt['NON-STRICT']} "
      f"INFORMATIONAL={cnt['INFORMATIONAL']} UNIMPLEMENTED={cnt['UNIMPLEMENTED']} FAILED={cnt['FAILED']}")
print("close behavior: " + " ".join(f"{k}={v}" for k, v in sorted(close.items(), key=str)), file=sys.stderr)
if failed:
    print("failed cases: " + " ".join(failed[:50]) + (" ..." if len(failed) > 50 else ""), file=sys.stderr)
if rc != 0:
    print("run.sh: wstest did not exit cleanly; results may be partial", file=sys.stderr)
    sys.exit(2)
sys.exit(1 if failed else 0)
EOF

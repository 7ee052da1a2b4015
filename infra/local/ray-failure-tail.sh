#!/usr/bin/env bash
# Printed by `make test` when pytest fails. A Ray driver whose raylet or GCS went away ends its process
# with _exit(1) and writes why only to its session's log files, so pytest itself can die without a word.
# This prints, for the newest local Ray sessions, the log lines that say why a node or driver ended.
set -uo pipefail
root=${RAY_TMPDIR:-/tmp}/ray
[ -d "$root" ] || { echo "ray-failure-tail: no Ray sessions under $root"; exit 0; }
for session in $(ls -1dt "$root"/session_2* 2>/dev/null | head -n 3); do
  echo "=== $session"
  # Error and fatal lines of the daemons and the drivers, and the GCS's verdicts on its node.
  grep -h -E "^\[[0-9-]+ [0-9:,]+ [EF] |[Hh]ealth check|marked (as )?dead|memory monitor" \
    "$session"/logs/raylet.out "$session"/logs/gcs_server.out "$session"/logs/python-core-driver-*.log \
    2>/dev/null | tail -n 30
done
echo "=== kernel: out-of-memory kills"
dmesg 2>/dev/null | grep -i -E "out of memory|oom-kill" | tail -n 10 || true

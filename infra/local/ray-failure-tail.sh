#!/usr/bin/env bash
# Printed by `make test` when pytest fails. A Ray driver whose raylet or GCS went away ends its process
# with _exit(1), and one that fails a RAY_CHECK aborts; either writes why only to its session's log
# files, so pytest itself can die without a word. This prints, for the newest local Ray sessions that
# have any, the log lines that say why a node or driver ended: the test session's own Ray runtime is
# often older than the sessions of the `kubeforge` processes its tests start.
set -uo pipefail
root=${RAY_TMPDIR:-/tmp}/ray
[ -d "$root" ] || { echo "ray-failure-tail: no Ray sessions under $root"; exit 0; }
shown=0
for session in $(ls -1dt "$root"/session_2* 2>/dev/null); do
  # Error, fatal and critical (a failed RAY_CHECK) lines of the daemons and the drivers, and the GCS's
  # verdicts on its node.
  lines=$(grep -h -E "^\[[0-9-]+ [0-9:,]+ [EFC] |[Hh]ealth check|marked (as )?dead|memory monitor" \
    "$session"/logs/raylet.out "$session"/logs/gcs_server.out "$session"/logs/python-core-driver-*.log \
    2>/dev/null | tail -n 30)
  [ -n "$lines" ] || continue
  echo "=== $session"
  echo "$lines"
  shown=$((shown + 1))
  [ "$shown" -lt 3 ] || break
done
[ "$shown" -gt 0 ] || echo "ray-failure-tail: no error lines in the Ray sessions under $root"
echo "=== kernel: out-of-memory kills"
dmesg 2>/dev/null | grep -i -E "out of memory|oom-kill" | tail -n 10 || true

#!/usr/bin/env bash
# One whole turn of the closed loop on this machine, started by nobody but the traffic:
#
#   bash examples/loop/run.sh        (after `make demo` or `make install`; about 18 minutes on a 2-core laptop,
#                                     16 of them the turn: retraining shares the two cores with vLLM serving)
#
#  1. the pipeline once, its model promoted by hand as the first champion;
#  2. Prometheus and `kubeforge serve examples/loop/deployment.yaml` (capture, monitor, loop);
#  3. code-like prompts (the reference window), then prose: the monitor's token_js crosses its threshold,
#     a turn retrains the pipeline on the captured traffic, the new model passes its gate and the canary
#     promotes it while the prose keeps being answered;
#  4. `kubeforge loop status loop`, then everything it started is stopped.
#
# Its files go to .kubeforge-loop (KUBEFORGE_WORKDIR); delete that folder to start from scratch.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${VENV:-.venv}/bin
workdir=${KUBEFORGE_WORKDIR:-.kubeforge-loop}
export KUBEFORGE_WORKDIR=$workdir
url=http://127.0.0.1:8000
# Background jobs call "$bin/kubeforge" itself: `$!` of a backgrounded function is a subshell, and killing
# it would leave the command running.
kubeforge() { "$bin/kubeforge" "$@"; }
started=$(date +%s)

kubeforge run examples/loop/pipeline.yaml --workdir "$workdir"
if ! kubeforge models show looped @champion --workdir "$workdir" >/dev/null 2>&1; then
  kubeforge models promote looped @challenger --reason "first release (examples/loop)" --workdir "$workdir"
fi

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
mkdir -p "$workdir"
bash infra/local/prometheus.sh >"$workdir/prometheus.log" 2>&1 &
pids+=($!)
"$bin/kubeforge" serve examples/loop/deployment.yaml --workdir "$workdir" > >(tee "$workdir/loop-serve.log") 2>&1 &
serve=$!
pids+=($serve)
until grep -q "^monitoring: every" "$workdir/loop-serve.log" 2>/dev/null; do
  kill -0 "$serve" 2>/dev/null || { echo "run.sh: kubeforge serve stopped; see $workdir/loop-serve.log" >&2; exit 1; }
  sleep 1
done
turns() { kubeforge loop status loop --workdir "$workdir" --output json 2>/dev/null |
  "$bin/python" -c 'import json, sys; print(len(json.load(sys.stdin)["turns"]))' 2>/dev/null || echo 0; }
before=$(turns)
echo "run.sh: reference traffic (code), then prose until turn $((before + 1)) ends"
kubeforge bench load "$url" --model looped --clients 2 --duration 20 --max-tokens 4 --no-stream \
  --prompts-file examples/loop/code-prompts.txt >"$workdir/loop-load-code.log" 2>&1
shifted=$(date +%s)
"$bin/kubeforge" bench load "$url" --model looped --clients 1 --duration 3600 --max-tokens 4 --no-stream \
  --prompts-file examples/loop/prose-prompts.txt >"$workdir/loop-load-prose.log" 2>&1 &
load=$!
pids+=($load)
until [ "$(turns)" -gt "$before" ]; do
  kill -0 "$serve" 2>/dev/null || { echo "run.sh: kubeforge serve stopped; see $workdir/loop-serve.log" >&2; exit 1; }
  sleep 2
done
kill "$load" 2>/dev/null || true
ended=$(date +%s)
kubeforge loop status loop --workdir "$workdir"
echo "run.sh: drift to the end of the turn: $((ended - shifted)) s; the whole script: $((ended - started)) s"
outcome=$(kubeforge loop status loop --workdir "$workdir" --output json |
  "$bin/python" -c 'import json, sys; print(json.load(sys.stdin)["turns"][-1]["outcome"])')
[ "$outcome" = promoted ] || { echo "run.sh: the turn ended $outcome, not promoted (see above)" >&2; exit 1; }

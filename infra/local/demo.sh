#!/usr/bin/env bash
# `make demo`: the whole life of a model on one machine, on embedded defaults.
#
#  1. the quickstart pipeline (data -> pretrain -> finetune -> evaluate -> quantize -> promote);
#     its quantized model becomes `challenger`, and, as the first release, `champion`;
#  2. a second run of the same pipeline with more replay in fine-tuning: only finetune and what
#     follows run again, and its model becomes the new `challenger` once it passes its gates;
#  3. Prometheus (infra/local/prometheus.sh), `kubeforge serve examples/deployment.yaml` serving the
#     champion and rolling the challenger out as a canary under a little load, until the canary is
#     promoted (or rolled back), then `kubeforge rollout status` with its timeline plot.
#
# Run again, finished stages are skipped; once the canary has promoted, there is nothing left to roll out.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${VENV:-.venv}/bin
workdir=${KUBEFORGE_WORKDIR:-.kubeforge}
# Background jobs call "$bin/kubeforge" itself: `$!` of a backgrounded function is a subshell, and killing
# it would leave the command running.
kubeforge() { "$bin/kubeforge" "$@"; }

kubeforge run examples/quickstart.yaml
if ! kubeforge models show quickstart @champion >/dev/null 2>&1; then
  kubeforge models promote quickstart @challenger --reason "first release (make demo)"
fi
kubeforge run examples/quickstart.yaml --set finetune.replay_fraction=0.25

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
mkdir -p "$workdir"
bash infra/local/prometheus.sh >"$workdir/prometheus.log" 2>&1 &
pids+=($!)
"$bin/kubeforge" serve examples/deployment.yaml --exit-when-done > >(tee "$workdir/demo-serve.log") 2>&1 &
serve=$!
pids+=($serve)
# Load starts once the application answers; the canary's analyses need requests to judge.
for _ in $(seq 600); do
  curl -fs http://127.0.0.1:8000/healthz >/dev/null 2>&1 && break
  kill -0 "$serve" 2>/dev/null || break
  sleep 1
done
"$bin/kubeforge" bench load http://127.0.0.1:8000 --model quickstart --clients 2 --duration 900 --max-tokens 16 \
  >"$workdir/demo-load.log" 2>&1 &
load=$!
pids+=($load)
# Stop the load when the rollout ends, before `kubeforge serve` takes the application down under it.
until grep -q "^rollout ended:" "$workdir/demo-serve.log" 2>/dev/null; do
  kill -0 "$serve" 2>/dev/null || break
  sleep 1
done
kill "$load" 2>/dev/null || true
wait "$serve"
kubeforge rollout status quickstart

#!/usr/bin/env bash
# One-shot GPU verification of KubeForge (project source copied under DEST/src by
# benchmarks/gpu_check/prepare.sh, commit in DEST/src/COMMIT, uncommitted changes in DEST/src/DIRTY).
# Run from anywhere:   bash DEST/run.sh
#
# Installs the carried wheels (DEST/.whl) into /tmp/site, then runs each check as its own Python
# process under `timeout`, printing one "RESULT <step>: PASS|FAIL|SKIP|DRY-OK ..." line per step and
# going on after a failure. Writes $OUT/gpu.log (everything) and $OUT/gpu_summary.json (figures).
# The whole run is kept under KF_BUDGET_S seconds (default 335): step limits shrink to fit, and
# steps that no longer fit are recorded as SKIP.
#
# Knobs (all optional): OUT, KF_WORK (scratch, default /tmp/kf-gpu), KF_BUDGET_S, KF_SPEED_BATCH (32),
# KF_SPEED_STEPS (30), PY / QPY (interpreter for the steps / for the llm-compressor steps),
# KF_SKIP_INSTALL=1, KF_BLOCK_MODULES (comma-separated modules made unimportable, as on the GPU
# machine), GPU_CHECK_DRY=1 (CPU, tiny sizes: a local smoke test of the script itself).
set -u
set -o pipefail

GPU_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${OUT:=/tmp/kf-gpu-out}"
export OUT
mkdir -p "$OUT"
export KF_WORK="${KF_WORK:-/tmp/kf-gpu}"
PY="${PY:-python3}"
QPY="${QPY:-$PY}"
BUDGET_S="${KF_BUDGET_S:-335}"
SITE="${KF_SITE:-/tmp/site}"
START=$SECONDS

run_step() {  # run_step NAME MAX_SECONDS PYTHON SUBCOMMAND [ARGS...]
  local name=$1 max=$2 py=$3
  shift 3
  local left=$(( BUDGET_S - (SECONDS - START) - 25 ))  # 25 s kept for the kill grace and the summary
  if (( left < 20 )); then
    echo "RESULT $name: SKIP | time budget of ${BUDGET_S}s spent"
    echo skip > "$KF_WORK/results/$name.rc"
    return
  fi
  local limit=$(( max < left ? max : left ))
  echo
  echo "---------------- $name (limit ${limit}s; ${SECONDS}s since start) ----------------"
  timeout -k 10 "$limit" "$py" -u "$GPU_DIR/checks/kfcheck.py" "$@"
  local rc=$?
  echo "$rc" > "$KF_WORK/results/$name.rc"
  if (( rc == 124 || rc == 137 )); then
    echo "RESULT $name: FAIL | timeout: killed after ${limit}s (rc $rc)"
  elif [ ! -f "$KF_WORK/results/$name.json" ]; then
    echo "RESULT $name: FAIL | exited $rc without writing a result"
  fi
}

main() {
  echo "kubeforge gpu check: $(date -u +%FT%TZ) on $(hostname), dry=${GPU_CHECK_DRY:-0}, budget ${BUDGET_S}s"
  echo "project commit: $(cat "$GPU_DIR/src/COMMIT" 2>/dev/null)"
  if [ -s "$GPU_DIR/src/DIRTY" ]; then
    echo "uncommitted changes in the snapshot:"; sed 's/^/  /' "$GPU_DIR/src/DIRTY"
  fi
  rm -rf "$KF_WORK"
  mkdir -p "$KF_WORK/results"
  if command -v nvidia-smi >/dev/null; then
    timeout 20 nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv || true
  fi

  if [ "${KF_SKIP_INSTALL:-0}" != 1 ]; then
    echo "installing carried wheels into $SITE:"
    ls -la "$GPU_DIR/.whl"
    rm -rf "$SITE"
    timeout 180 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$GPU_DIR"/.whl/*.whl || echo "WARNING: wheel install failed (rc $?)"
  fi
  export PYTHONPATH="$SITE:$GPU_DIR/src/platform${PYTHONPATH:+:$PYTHONPATH}"
  export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
  export HF_HOME="$KF_WORK/hf" TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1
  echo "PYTHONPATH=$PYTHONPATH"

  if [ "${KF_SKIP_INSTALL:-0}" != 1 ]; then
    # Conditional wheels (DEST/.whl-cond): only where the machine's own copy cannot serve.
    # pydantic 2.14 needs typing_extensions >= 4.16.0.
    te_old=$(timeout 30 "$PY" -c '
import importlib.metadata as m
try:
    from packaging.version import Version
    print(int(Version(m.version("typing_extensions")) < Version("4.16.0")))
except Exception:
    print(1)' 2>/dev/null)
    if [ "$te_old" != 0 ]; then
      echo "typing_extensions older than 4.16.0 (or missing): installing the carried 4.16.0"
      timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$GPU_DIR"/.whl-cond/typing_extensions-*.whl || echo "WARNING: typing_extensions install failed"
    fi
    # peft: the machine's own, unless it does not import with this transformers; then the project's pin.
    if ! timeout 120 "$PY" -c 'import peft
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.utils.integrations import dequantize_bnb_weight' >"$KF_WORK/peft-check.log" 2>&1; then
      echo "the machine's peft does not import (tail of the error below): installing the carried peft 0.21.2"
      tail -5 "$KF_WORK/peft-check.log"
      timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$GPU_DIR"/.whl-cond/peft-*.whl || echo "WARNING: peft install failed"
    fi
  fi

  # In priority order: a step that no longer fits the budget is skipped, not the run.
  run_step env 90 "$PY" env                               # versions, CUDA, bf16 matmul, bnb nf4 round trip
  run_step prep 80 "$PY" prep                             # stdlib corpus, BPE tokenizer, packed shards, task
  run_step pretrain 90 "$PY" pretrain                     # check 1: pretraining loop, bf16 autocast, MFU
  run_step speed 120 "$PY" speed                          # check 4: ~100M Llama, seq 1024: tokens/s, MFU
  run_step ft_qlora 100 "$PY" ft-qlora                    # check 2: QLoRA nf4 + merge vs base+adapter
  run_step quant_w4a16 100 "$QPY" quantize --scheme w4a16  # check 3: llm-compressor GPTQ W4A16
  run_step quant_fp8 90 "$QPY" quantize --scheme fp8        # check 3: llm-compressor FP8_DYNAMIC
  run_step ft_qlora_cmp 80 "$PY" ft-compare --method qlora  # check 2: comparison on the ~100M base
  run_step ft_lora_cmp 80 "$PY" ft-compare --method lora
  run_step ft_full_cmp 80 "$PY" ft-compare --method full

  echo
  if ! timeout 30 "$PY" -u "$GPU_DIR/checks/kfcheck.py" summary --elapsed "$(( SECONDS - START ))"; then
    echo '{"overall": "FAIL", "error": "the summary step failed; see gpu.log"}' > "$OUT/gpu_summary.json"
    echo "OVERALL: FAIL (summary step failed)"
  fi
  echo "total ${SECONDS}s; log: $OUT/gpu.log; summary: $OUT/gpu_summary.json"
  grep -q '"overall": "PASS"' "$OUT/gpu_summary.json"
}

main 2>&1 | tee "$OUT/gpu.log"
exit "${PIPESTATUS[0]}"

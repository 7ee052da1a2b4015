"""Forgetting during fine-tuning, and what EWC and replay prevent: perplexity on the general test split
(the data stage's `test` shards: standard-library source the model was pretrained on, never trained
on) before and after full SFT on the docstring task, with neither, EWC, replay, and both.

Same base model (the quickstart's pretrained model, trained here if not cached), same task examples,
same batches, same number of optimizer steps; each variant in this process with
`kubeforge.engine.session.LocalSession` (no Ray). The task's held-out validation loss is reported
too: a regulariser that stops forgetting by stopping learning is no help.

    .venv/bin/python benchmarks/bench_forgetting.py --steps 60 --ewc-strength 1000 --ewc-samples 64
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from common import REPO, pretrained_model


def run_variant(base: Path, data: Any, section: dict[str, Any], out: Path) -> tuple[Any, dict[str, Any]]:
    """Fine-tune in this process; (the tuned model, the loop's final metrics)."""
    from transformers import AutoModelForCausalLM

    from kubeforge.context import StageContext
    from kubeforge.engine.session import LocalSession
    from kubeforge.finetune.recipe import FinetuneRecipe
    from kubeforge.finetune.stage import loop_config
    from kubeforge.spec.finetune import FinetuneSpec

    spec = FinetuneSpec.model_validate(section)
    out.mkdir(parents=True)
    ctx = StageContext(pipeline=None, stage="finetune", out_dir=out, base_dir=REPO,  # type: ignore[arg-type]
                       tracker=None, reporter=None, inputs={"data": data})  # type: ignore[arg-type]
    config = loop_config(spec, ctx)
    session = LocalSession(keep_checkpoints=out / "kept")
    started = time.perf_counter()
    FinetuneRecipe(config, session).run()
    seconds = time.perf_counter() - started
    assert session.last_checkpoint is not None
    model = AutoModelForCausalLM.from_pretrained(session.last_checkpoint / "merged")
    return model, {**session.final, "seconds": seconds}


def general_rows(data: Any, count: int) -> Any:
    from kubeforge.engine.batches import TokenShards

    shards = TokenShards([data.directory / p for p in data.result.shards["test"]])
    return shards.rows(list(range(min(count, len(shards)))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO / ".kubeforge")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--test-rows", type=int, default=64)
    parser.add_argument("--ewc-strength", type=float, default=1000.0)
    parser.add_argument("--ewc-samples", type=int, default=64)
    parser.add_argument("--replay", type=float, default=0.25)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    from transformers import AutoModelForCausalLM

    from kubeforge.quantize.perplexity import perplexity

    base, data = pretrained_model(args.workdir, "bench_forgetting")
    rows = general_rows(data, args.test_rows)
    before = perplexity(AutoModelForCausalLM.from_pretrained(base), rows, 8)
    common: dict[str, Any] = {
        "base_model": str(base), "objective": "sft", "method": "full", "max_length": 256,
        "task": {"builtin": "python-docstrings", "max_examples": args.examples},
        "train": {"max_steps": args.steps, "batch_size": 8, "lr": args.lr, "warmup_steps": 5},
        "eval": {"every_steps": args.steps, "max_batches": 8}, "checkpoint": {"every_steps": args.steps},
    }
    ewc = {"strength": args.ewc_strength, "samples": args.ewc_samples}
    variants = {
        "plain": {"replay_fraction": 0},
        "ewc": {"replay_fraction": 0, "ewc": ewc},
        "replay": {"replay_fraction": args.replay},
        "ewc+replay": {"replay_fraction": args.replay, "ewc": ewc},
    }
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in variants.items():
            model, final = run_variant(base, data, {**common, **extra}, Path(tmp) / name)
            after = perplexity(model, rows, 8)
            results[name] = {
                "general_ppl_after": round(after, 3), "forgetting_pct": round(100 * (after / before - 1), 2),
                "task_val_loss_initial": round(final["initial_val_loss"], 4),
                "task_val_loss_final": round(final["val_loss"], 4), "seconds": round(final["seconds"], 1),
            }
            print(name, json.dumps(results[name]), flush=True)
    report = {"machine": platform.processor() or platform.machine(), "base": str(base),
              "general_ppl_before": round(before, 3), "args": {k: str(v) for k, v in vars(args).items()},
              "variants": results}
    print(json.dumps(report, indent=2))
    if not all(math.isfinite(r["general_ppl_after"]) for r in results.values()):
        raise SystemExit("a variant diverged")


if __name__ == "__main__":
    main()

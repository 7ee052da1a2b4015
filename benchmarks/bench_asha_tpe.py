"""ASHA + TPE vs random search without pruning: total trial-steps each needs to reach the same validation loss.

Both searches run the tune stage over the same tiny Llama (hidden 64, 2 layers) on the same data (the
data stage over 80 standard-library files, 64-token sequences), with the same search space (learning
rate, warmup, final learning-rate ratio), the same number of trials, the same per-trial step budget and
the same concurrency, one after the other in one run:

* `asha+tpe`: Optuna TPE, ASHA stopping trials at rungs of grace_period x reduction_factor^k steps;
* `random`: Optuna's random sampler, every trial runs its full budget (FIFO).

Cost is counted in trial-steps (optimizer steps summed over trials; every step costs the same, since
the architecture is not searched). The target is the best validation loss *both* searches reached:
the larger of their two best losses. For each search, the trial-steps needed to reach it are the sum,
over all its trials, of the last step each had reported when the first evaluation at or below the
target arrived at the driver (the stage's `history.jsonl` records evaluations in arrival order).
One comparison is noisy (a random search that draws a good learning rate in its first trials is
hard to beat), so it runs with several seeds and reports each ratio, their median and the ratio of the
summed trial-steps. The issue's target: the ratio asha+tpe / random is at most 0.5.

    .venv/bin/python benchmarks/bench_asha_tpe.py --samples 16 --steps 64 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

SEQ_LEN = 64
PIPELINE = "bench"
SPACE = {
    "train.lr": {"type": "loguniform", "low": 1e-5, "high": 1e-1},
    "train.warmup_steps": {"type": "int", "low": 0, "high": 16},
    "train.min_lr_ratio": {"type": "uniform", "low": 0.0, "high": 1.0},
}


def _manifest(steps: int, tune: dict[str, Any] | None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "data": {"sources": [{"type": "python-stdlib", "max_files": 80}], "tokenizer": {"vocab_size": 512},
                 "packing": {"seq_len": SEQ_LEN}},
        "pretrain": {
            "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "max_position_embeddings": SEQ_LEN},
            "train": {"max_steps": steps, "batch_size": 8, "lr": 1e-3, "warmup_steps": 4},
            # ASHA can only decide where a trial reports: an evaluation every 4 steps.
            "eval": {"every_steps": 4, "max_batches": 4},
            "resources": {"workers": 1},
        },
    }
    if tune is not None:
        spec["tune"] = tune
    return {"apiVersion": "kubeforge.io/v1alpha1", "kind": "ModelPipeline", "metadata": {"name": PIPELINE},
            "spec": spec}


def _context(root: Path, stage: str, manifest: dict[str, Any], inputs: dict[str, Any]) -> Any:
    from kubeforge.context import StageContext
    from kubeforge.progress import QuietReporter
    from kubeforge.spec.load import parse_manifest
    from kubeforge.tracking import start_stage_run
    from kubeforge.workdir import Workdir

    workdir = Workdir(root / "work")
    workdir.root.mkdir(parents=True, exist_ok=True)
    tracker = start_stage_run(f"sqlite:///{workdir.mlflow_db}", workdir, PIPELINE, stage, {}, None)
    out = root / f"{stage}.partial"
    out.mkdir(parents=True)
    return StageContext(pipeline=parse_manifest(manifest), stage=stage, out_dir=out, base_dir=root, tracker=tracker,
                        reporter=QuietReporter(), inputs=inputs)


def prepare_data(root: Path, steps: int) -> Any:
    from kubeforge.context import StageOutput
    from kubeforge.data.stage import run as run_data

    ctx = _context(root, "data", _manifest(steps, None), {})
    result = run_data(ctx.pipeline.spec.data, ctx)
    return StageOutput(name="data", key="bench", directory=ctx.out_dir, result=result, mlflow_run_id=None)


def search(root: Path, data: Any, name: str, tune: dict[str, Any], steps: int) -> dict[str, Any]:
    from kubeforge.tune.stage import HISTORY_FILE, run

    ctx = _context(root / name, "tune", _manifest(steps, tune), {"data": data})
    started = time.perf_counter()
    result = run(ctx.pipeline.spec.tune, ctx)
    wall = time.perf_counter() - started
    history = [json.loads(line) for line in (ctx.out_dir / HISTORY_FILE).read_text().splitlines()]
    return {"search": name, "result": result, "history": history, "wall_seconds": wall}


def steps_to_reach(history: list[dict[str, Any]], target: float) -> int | None:
    """Trial-steps spent (summed over trials, as the driver saw them) when an evaluation first reached target."""
    latest: dict[str, int] = {}
    for evaluation in history:
        latest[evaluation["trial_id"]] = max(latest.get(evaluation["trial_id"], 0), int(evaluation["step"]))
        if evaluation["val_loss"] <= target:
            return sum(latest.values())
    return None


def compare(root: Path, data: Any, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Both searches with one seed; the target is the best loss both reached."""
    common = {"target": "pretrain", "search_space": SPACE, "num_samples": args.samples,
              "max_concurrent": args.concurrency, "max_steps": args.steps, "seed": seed}
    searches = {
        "asha+tpe": {**common, "searcher": "tpe", "scheduler": "asha",
                     "asha": {"grace_period": args.grace, "reduction_factor": args.reduction}},
        "random": {**common, "searcher": "random", "scheduler": "none"},
    }
    runs = [search(root / f"seed{seed}", data, name, tune, args.steps) for name, tune in searches.items()]
    best = {r["search"]: r["result"]["best_metrics"]["val_loss"] for r in runs}
    target = max(best.values())
    rows = []
    for r in runs:
        result = r["result"]
        rows.append({
            "search": r["search"],
            "seed": seed,
            "best_val_loss": best[r["search"]],
            "steps_to_target": steps_to_reach(r["history"], target),
            "total_trial_steps": result.total_trial_steps,
            "completed": result.completed_trials,
            "early_stopped": result.early_stopped_trials,
            "failed": result.failed_trials,
            "wall_seconds": r["wall_seconds"],
            "best_config": result.best_config,
        })
    asha, rand = rows
    ratio = asha["steps_to_target"] / rand["steps_to_target"] if asha["steps_to_target"] and rand[
        "steps_to_target"] else None
    return {"seed": seed, "target": target, "ratio": ratio, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16, help="trials per search")
    parser.add_argument("--steps", type=int, default=64, help="optimizer steps per trial (its full budget)")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--grace", type=int, default=4, help="ASHA grace period (steps)")
    parser.add_argument("--reduction", type=int, default=3, help="ASHA reduction factor")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()

    import statistics

    import ray
    import torch

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="bench-asha-tpe-") as tmp:
        root = Path(tmp)
        data = prepare_data(root, args.steps)
        comparisons = [compare(root, data, args, seed) for seed in args.seeds]
    ray.shutdown()

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"ray {ray.__version__}; per search: {args.samples} trials x {args.steps} steps, {args.concurrency} at a "
          f"time; ASHA grace {args.grace} steps, reduction factor {args.reduction}; seeds {args.seeds}")
    print("target per seed: the larger of the two searches' best val_loss (the best loss both reached)")
    print("| seed | search | target | best val_loss | trial-steps to target | total trial-steps | completed | "
          "stopped early | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for comparison in comparisons:
        for row in comparison["rows"]:
            print(f"| {row['seed']} | {row['search']} | {comparison['target']:.4f} | {row['best_val_loss']:.4f} | "
                  f"{row['steps_to_target']} | {row['total_trial_steps']} | {row['completed']} | "
                  f"{row['early_stopped']} | {row['wall_seconds']:.0f} |")
    ratios = [c["ratio"] for c in comparisons if c["ratio"] is not None]
    for c in comparisons:
        print(f"seed {c['seed']}: trial-steps to target, asha+tpe / random = "
              + (f"{c['ratio']:.3f}" if c["ratio"] is not None else "n/a"))
    if ratios:
        sums = [sum(c["rows"][i]["steps_to_target"] or 0 for c in comparisons if c["ratio"] is not None)
                for i in (0, 1)]
        print(f"median ratio over seeds: {statistics.median(ratios):.3f}; ratio of the summed trial-steps: "
              f"{sums[0] / sums[1]:.3f} (issue target: <= 0.5)")
    print(json.dumps({"comparisons": comparisons, "args": vars(args)}, default=str))


if __name__ == "__main__":
    main()

"""Ray Train overhead: tokens/s of the pretraining stage vs a plain single-process PyTorch loop.

Same tiny Llama (hidden 128, 2 layers), same data (the data stage over 80 standard-library files,
64-token sequences), same batch size, sequence length, number of optimizer steps, optimizer and
schedule, all measured side by side in one run:

* plain PyTorch, one process, with 1 and with 2 intra-op threads;
* the pretraining stage under Ray Train with 1 worker x 1 CPU, 1 worker x 2 CPUs and 2 workers x 1 CPU
  (Ray caps each worker's torch threads at its CPU count, so the thread budgets match).

Two numbers per configuration: steady-state throughput (tokens / time spent in training steps, as
the stage reports it: evaluation, checkpoints and start-up excluded) and end-to-end throughput
(tokens / wall-clock time of the whole call, start-up of Ray Train's controller and workers included).

    .venv/bin/python benchmarks/bench_pretrain.py --steps 60
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

BATCH_SIZE = 8
SEQ_LEN = 64
MODEL = {"hidden_size": 128, "num_layers": 2, "num_heads": 2, "max_position_embeddings": 128}


def _spec(steps: int, workers: int, cpus: float) -> Any:
    from kubeforge.spec.pretrain import PretrainSpec

    return PretrainSpec.model_validate({
        "model": MODEL,
        "train": {"max_steps": steps, "batch_size": BATCH_SIZE, "lr": 3e-3, "warmup_steps": 5},
        # One evaluation and one checkpoint at the very end, as in any run; none in between.
        "eval": {"every_steps": steps, "max_batches": 2},
        "checkpoint": {"every_steps": steps, "keep": 1},
        "resources": {"workers": workers, "cpus_per_worker": cpus},
    })


def _context(root: Path, stage: str, inputs: dict[str, Any]) -> Any:
    from kubeforge.context import StageContext
    from kubeforge.progress import QuietReporter
    from kubeforge.spec.load import parse_manifest
    from kubeforge.tracking import start_stage_run
    from kubeforge.workdir import Workdir

    workdir = Workdir(root / "work")
    workdir.root.mkdir(parents=True, exist_ok=True)
    tracker = start_stage_run(f"sqlite:///{workdir.mlflow_db}", workdir, "bench", stage, {}, None)
    pipeline = parse_manifest({
        "apiVersion": "kubeforge.io/v1alpha1", "kind": "ModelPipeline", "metadata": {"name": "bench"},
        "spec": {"data": {"sources": [{"type": "python-stdlib", "max_files": 80}]}},
    })
    out = root / f"{stage}.partial"
    out.mkdir(parents=True)
    return StageContext(pipeline=pipeline, stage=stage, out_dir=out, base_dir=root, tracker=tracker,
                        reporter=QuietReporter(), inputs=inputs)


def prepare_data(root: Path) -> Any:
    from kubeforge.context import StageOutput
    from kubeforge.data.stage import run as run_data
    from kubeforge.spec.data import DataSpec

    ctx = _context(root, "data", {})
    spec = DataSpec.model_validate({
        "sources": [{"type": "python-stdlib", "max_files": 80}], "tokenizer": {"vocab_size": 512},
        "packing": {"seq_len": SEQ_LEN},
    })
    result = run_data(spec, ctx)
    return StageOutput(name="data", key="bench", directory=ctx.out_dir, result=result, mlflow_run_id=None)


def plain_pytorch(data: Any, steps: int, threads: int) -> dict[str, Any]:
    """The same model, batches, optimizer and schedule in one process, no Ray."""
    import torch

    from kubeforge.engine.batches import Batcher, RankSampler, TokenShards
    from kubeforge.engine.model import build_model
    from kubeforge.engine.optim import build_optimizer, build_scheduler
    from kubeforge.engine.steps import train_step

    torch.set_num_threads(threads)
    started = time.perf_counter()
    spec = _spec(steps, 1, threads)
    result = data.result
    model = build_model(spec, result.vocab_size, result.special_tokens)
    optimizer = build_optimizer(model, spec.train)
    scheduler = build_scheduler(optimizer, spec.train)
    shards = TokenShards([data.directory / f for f in result.shards["train"]])
    sampler = RankSampler(len(shards), 0, 1, spec.train.seed)
    batcher = Batcher(spec, result.vocab_size, result.special_tokens)
    device = torch.device("cpu")
    step_seconds = 0.0
    for step in range(steps):
        began = time.perf_counter()
        batch = batcher(shards.rows(sampler.batch(step, BATCH_SIZE)), device, None)
        train_step(model, optimizer, scheduler, [batch], spec.train.grad_clip, False, device)
        step_seconds += time.perf_counter() - began
    wall = time.perf_counter() - started
    tokens = steps * BATCH_SIZE * SEQ_LEN
    return {"config": f"plain PyTorch, {threads} thread(s)", "tokens": tokens,
            "tokens_per_second": tokens / step_seconds, "end_to_end_tokens_per_second": tokens / wall,
            "wall_seconds": wall}


def ray_train(root: Path, data: Any, steps: int, workers: int, cpus: float) -> dict[str, Any]:
    from kubeforge.pretrain.stage import run

    ctx = _context(root / f"ray-{workers}x{cpus:g}", "pretrain", {"data": data})
    started = time.perf_counter()
    result = run(_spec(steps, workers, cpus), ctx)
    wall = time.perf_counter() - started
    tokens = result.tokens_seen
    return {"config": f"Ray Train, {workers} worker(s) x {cpus:g} CPU", "tokens": tokens,
            "tokens_per_second": result.tokens_per_second, "end_to_end_tokens_per_second": tokens / wall,
            "wall_seconds": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()

    import ray
    import torch

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="bench-pretrain-") as tmp:
        root = Path(tmp)
        data = prepare_data(root)
        rows = [
            plain_pytorch(data, args.steps, 1),
            plain_pytorch(data, args.steps, 2),
            ray_train(root, data, args.steps, 1, 1),
            ray_train(root, data, args.steps, 1, 2),
            ray_train(root, data, args.steps, 2, 1),
        ]
    ray.shutdown()

    baseline = {1: rows[0], 2: rows[1]}
    cpus_of = [1, 2, 1, 2, 2]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"ray {ray.__version__}; {args.steps} steps x {BATCH_SIZE} sequences x {SEQ_LEN} tokens per worker")
    print("| configuration | CPUs | tokens | steady tokens/s | vs plain (same CPUs) | end-to-end tokens/s | wall s |")
    print("|---|---|---|---|---|---|---|")
    for row, cpus in zip(rows, cpus_of, strict=True):
        ratio = row["tokens_per_second"] / baseline[cpus]["tokens_per_second"]
        row["ratio_vs_plain"] = ratio
        print(f"| {row['config']} | {cpus} | {row['tokens']} | {row['tokens_per_second']:.0f} | {ratio:.2f}x | "
              f"{row['end_to_end_tokens_per_second']:.0f} | {row['wall_seconds']:.1f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()

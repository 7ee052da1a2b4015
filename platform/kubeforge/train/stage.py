"""`run(spec, ctx)`: pretrain a model from scratch on the data stage's token shards with Ray Train.

Resuming. Ray Train (V2, the default in Ray 2.60) writes `checkpoint_manager_snapshot.json` next to
the checkpoints under `RunConfig(storage_path, name)`; a new `TorchTrainer` with the same storage
path and name reads it, and `ray.train.get_checkpoint()` then returns the latest checkpoint in the
workers. The stage keeps both fixed (`<out_dir>/ray/pretrain`), so a rerun in the folder the executor
hands back after an interruption continues from the last checkpoint. Worker failures within one run
are recovered by Ray Train itself (`FailureConfig(max_failures)`), again via `get_checkpoint()`.
As a second line of defence, the stage also finds the newest complete checkpoint on disk itself and
passes it to the workers, which use it when Ray offers none (a snapshot lost or unreadable because
the process died while writing it).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kubeforge.context import StageContext
from kubeforge.errors import StageError
from kubeforge.spec.finetune import FinetuneSpec
from kubeforge.spec.pretrain import PretrainSpec

STAGE = "pretrain"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


def _rows(files: list[Path]) -> int:
    return sum(int(np.load(str(f), mmap_mode="r").shape[0]) for f in files)


def _shard_files(data_dir: Path, result: dict[str, Any], split: str) -> list[Path]:
    files = [data_dir / p for p in result.get("shards", {}).get(split, [])]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise StageError(STAGE, f"the data stage's {split} shard {missing[0]} does not exist")
    return files


def check_resources(spec: PretrainSpec | FinetuneSpec, cluster: dict[str, float], stage: str = STAGE) -> None:
    """Fail at once when the Ray cluster can never hold the workers: Ray would wait for them forever.
    `stage` names the spec section (the fine-tuning stage checks its workers with this too)."""
    res = spec.resources
    cpus_needed = res.workers * res.cpus_per_worker
    cpus = cluster.get("CPU", 0.0)
    if cpus_needed > cpus:
        raise StageError(
            stage,
            f"spec.{stage}.resources.workers: {res.workers} workers x {res.cpus_per_worker:g} CPU need "
            f"{cpus_needed:g} CPUs but the Ray cluster has {cpus:g}; lower resources.workers or "
            "resources.cpus_per_worker, or add nodes",
        )
    gpus = cluster.get("GPU", 0.0)
    if res.use_gpu and res.workers > gpus:
        raise StageError(
            stage,
            f"spec.{stage}.resources.workers: {res.workers} workers with use_gpu need {res.workers} GPUs "
            f"but the Ray cluster has {gpus:g}",
        )


def latest_checkpoint(experiment_dir: Path) -> tuple[Path, int] | None:
    """The newest checkpoint on disk that holds a complete state (rank 0's state and meta files)."""
    best: tuple[Path, int] | None = None
    for meta in experiment_dir.glob("checkpoint_*/meta.json"):
        if not (meta.parent / "state.pt").is_file():
            continue
        try:
            step = int(json.loads(meta.read_text())["step"])
        except (ValueError, KeyError, OSError):
            continue  # cut off while being written: an older checkpoint serves
        if best is None or step > best[1]:
            best = (meta.parent, step)
    return best


def _repair_snapshot(experiment_dir: Path, log: Any) -> None:
    """Ray Train fails on a snapshot cut off mid-write; without it the fallback checkpoint is used."""
    snapshot = experiment_dir / SNAPSHOT_FILE
    if not snapshot.is_file():
        return
    try:
        json.loads(snapshot.read_text())
    except ValueError:
        log(f"{snapshot} is unreadable (interrupted while written); resuming from the files on disk")
        snapshot.unlink()


def loop_config(spec: PretrainSpec, ctx: StageContext) -> dict[str, Any]:
    """What `train_loop_per_worker` needs besides the session: the spec and the data stage's shards.

    The tune stage builds its trials' configs with this too (with a trial's spec and no checkpoint).
    """
    if "data" not in ctx.inputs:
        raise StageError(STAGE, "needs the output of the data stage (spec.data)")
    data = ctx.inputs["data"]
    result = data.result
    train_files = _shard_files(data.directory, result, "train")
    validation_files = _shard_files(data.directory, result, "validation")
    if not train_files or _rows(train_files) == 0:
        raise StageError(STAGE, "the data stage produced no training sequences")
    if not validation_files or _rows(validation_files) == 0:
        raise StageError(STAGE, "the data stage produced no validation sequences, which pretraining evaluates on")
    seq_len = int(result["seq_len"])
    if seq_len > spec.model.max_position_embeddings:
        raise StageError(
            STAGE,
            f"spec.pretrain.model.max_position_embeddings: {spec.model.max_position_embeddings} is shorter than "
            f"the data stage's sequences ({seq_len} tokens)",
        )
    return {
        "spec": spec.model_dump(mode="json"),
        "train_files": [str(f.resolve()) for f in train_files],
        "validation_files": [str(f.resolve()) for f in validation_files],
        "vocab_size": int(result["vocab_size"]),
        "special_tokens": dict(result["special_tokens"]),
    }


def fit_with_progress(
    train_loop: Callable[[dict[str, Any]], None],
    config: dict[str, Any],
    spec: PretrainSpec | FinetuneSpec,
    ctx: StageContext,
    stage: str,
    description: str,
) -> tuple[Any, Any]:
    """Run `train_loop` on `spec.resources.workers` Ray Train workers and return Ray's result (which
    has a final checkpoint) and the `HubPoller` that followed the run.

    Shared by the pretraining and fine-tuning stages: the run lives at `<out_dir>/ray/<stage>`, so a
    rerun resumes what an earlier attempt left (see the module docstring); the workers' progress
    messages feed the progress bar, MLflow and the Prometheus gauges (label `stage`).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from kubeforge.train.hub import HubPoller, ProgressHub

    storage = (ctx.out_dir / "ray").resolve()
    experiment_dir = storage / stage
    _repair_snapshot(experiment_dir, ctx.reporter.log)
    fallback = latest_checkpoint(experiment_dir)
    if fallback is not None:
        ctx.reporter.log(f"{stage}: found the checkpoint of step {fallback[1]} from an earlier attempt")

    ctx.tracker.log_params(spec.model_dump(mode="json"))
    hub = ProgressHub.remote()  # type: ignore[attr-defined]
    config = {**config, "fallback_checkpoint": str(fallback[0]) if fallback else None, "hub": hub}
    res = spec.resources
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if res.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.workers, use_gpu=res.use_gpu, resources_per_worker={"CPU": res.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=stage,
            storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=spec.checkpoint.keep),
        ),
    )
    try:
        with ctx.reporter.task(description, total=spec.train.max_steps) as task:
            poller = HubPoller(
                hub, ctx.tracker, task, ctx.pipeline_name, ctx.stage, spec.train.max_steps, res.workers,
                ctx.reporter.log,
            )
            with poller:
                try:
                    fit = trainer.fit()
                except ray.train.TrainingFailedError as exc:
                    raise StageError(
                        stage,
                        f"training failed after spec.{stage}.max_failures={spec.max_failures} retries: {exc}; "
                        "rerun to resume from the last checkpoint",
                        resumable=True,
                    ) from exc
    finally:
        ray.kill(hub)
    if poller.error is not None:
        raise poller.error
    if fit.checkpoint is None:
        raise StageError(stage, "training ended without a final checkpoint")
    return fit, poller


def run(spec: PretrainSpec, ctx: StageContext) -> dict[str, Any]:
    import ray

    from kubeforge.train.loop import MODEL_SUBDIR, train_loop_per_worker

    config = loop_config(spec, ctx)
    data = ctx.inputs["data"]
    result = data.result
    seq_len = int(result["seq_len"])

    if not ray.is_initialized():
        # The executors normally start or join Ray; a direct call of the stage gets a local runtime.
        ray.init()
    check_resources(spec, ray.cluster_resources())
    res = spec.resources
    fit, poller = fit_with_progress(train_loop_per_worker, config, spec, ctx, STAGE, f"{STAGE}: training")

    model_dir = ctx.out_dir / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)  # left by an attempt interrupted while copying
    with fit.checkpoint.as_directory() as directory:
        shutil.copytree(Path(directory) / MODEL_SUBDIR, model_dir)
    tokenizer_dir = data.directory / result["tokenizer_dir"]
    for item in tokenizer_dir.iterdir():
        if item.is_file():
            shutil.copy2(item, model_dir / item.name)

    final: dict[str, Any] = dict(fit.metrics or {})
    summary: dict[str, Any] = {
        "model_dir": "model",
        "objective": spec.objective,
        "final_step": int(final["step"]),
        "initial_val_loss": float(final["initial_val_loss"]),
        "initial_val_perplexity": float(final["initial_val_perplexity"]),
        "val_loss": float(final["val_loss"]),
        "val_perplexity": float(final["val_perplexity"]),
        "train_loss": float(final["train_loss"]),
        "tokens_per_second": float(final["tokens_per_second"]),
        "tokens_seen": int(final["tokens_seen"]),
        "resumed_from_step": int(final["resumed_from_step"]),
        "restored_from_steps": poller.restored_steps,
        "num_parameters": int(final["num_parameters"]),
        "seq_len": seq_len,
        "workers": res.workers,
    }
    ctx.tracker.log_metrics(
        {
            "final_val_loss": summary["val_loss"],
            "final_val_perplexity": summary["val_perplexity"],
            "initial_val_perplexity": summary["initial_val_perplexity"],
            "final_tokens_per_second": summary["tokens_per_second"],
            "num_parameters": summary["num_parameters"],
        },
        step=summary["final_step"],
    )
    ctx.tracker.log_artifact(model_dir, "model")
    return summary

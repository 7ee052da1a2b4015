"""Running a recipe on Ray Train workers, with the workers' progress on the driver.

Resuming. Ray Train (V2, the default in Ray 2.60) writes `checkpoint_manager_snapshot.json` next to
the checkpoints under `RunConfig(storage_path, name)`; a new `TorchTrainer` with the same storage
path and name reads it, and `ray.train.get_checkpoint()` then returns the latest checkpoint in the
workers. A stage keeps both fixed (`<out_dir>/ray/<stage>`), so a rerun in the folder the executor
hands back after an interruption continues from the last checkpoint. Worker failures within one run
are recovered by Ray Train itself (`FailureConfig(max_failures)`), again via `get_checkpoint()`.
As a second line of defence, the driver also finds the newest complete checkpoint on disk itself and
passes it to the workers, which use it when Ray offers none (a snapshot lost or unreadable because
the process died while writing it).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from kubeforge import faults
from kubeforge.context import StageContext
from kubeforge.engine.hub import HubPoller, ProgressHub
from kubeforge.engine.recipe import ConfigT, Recipe, TrainingSection, train_worker
from kubeforge.engine.state import latest_checkpoint, repair_snapshot
from kubeforge.errors import StageError


def check_resources(spec: TrainingSection, cluster: dict[str, float], stage: str) -> None:
    """Fail at once when the Ray cluster can never hold the workers: Ray would wait for them forever.
    `stage` names the spec section."""
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


def run_figures(final: Mapping[str, Any], poller: HubPoller) -> dict[str, Any]:
    """What every training stage's result reports of its run, from the final checkpoint's metrics."""
    return {
        "final_step": int(final["step"]),
        "train_loss": float(final["train_loss"]),
        "tokens_per_second": float(final["tokens_per_second"]),
        "tokens_seen": int(final["tokens_seen"]),
        "resumed_from_step": int(final["resumed_from_step"]),
        "restored_from_steps": poller.restored_steps,
    }


def fit_with_progress(
    recipe: type[Recipe[ConfigT]],
    config: ConfigT,
    spec: TrainingSection,
    ctx: StageContext,
    description: str,
) -> tuple[Any, HubPoller]:
    """Run `recipe` on `spec.resources.workers` Ray Train workers and return Ray's result (which has
    a final checkpoint) and the `HubPoller` that followed the run.

    The run lives at `<out_dir>/ray/<stage>`, so a rerun resumes what an earlier attempt left (see the
    module docstring); the workers' progress messages feed the progress bar, MLflow and the Prometheus
    gauges (label `stage`).
    """
    stage = ctx.stage
    storage = (ctx.out_dir / "ray").resolve()
    experiment_dir = storage / stage
    repair_snapshot(experiment_dir, ctx.reporter.log)
    fallback = latest_checkpoint(experiment_dir)
    if fallback is not None:
        ctx.reporter.log(f"{stage}: found the checkpoint of step {fallback[1]} from an earlier attempt")

    ctx.tracker.log_params(spec.model_dump(mode="json"))
    hub = ProgressHub.remote()  # type: ignore[attr-defined]
    config = dataclasses.replace(config, fallback_checkpoint=str(fallback[0]) if fallback else None, hub=hub)
    res = spec.resources
    trainer = TorchTrainer(
        # The typed config travels bound to the function (Ray passes nothing when it takes no argument).
        functools.partial(train_worker, recipe, config),
        torch_config=TorchConfig(backend="nccl" if res.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.workers, use_gpu=res.use_gpu, resources_per_worker={"CPU": res.cpus_per_worker}
        ),
        # Ray Train V2's RunConfig (the type checker sees V1's, which has no worker_runtime_env).
        run_config=ray.train.RunConfig(  # type: ignore[call-arg]
            name=stage,
            storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=spec.checkpoint.keep),
            # Only a test's hold (kubeforge.faults); an empty runtime env would still be one to set up.
            worker_runtime_env={"env_vars": faults.worker_env()} if faults.worker_env() else None,
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

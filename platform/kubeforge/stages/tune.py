"""The tune stage: a hyper-parameter search (Ray Tune, Optuna, ASHA) over a training stage's loop."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kubeforge.spec.tune import TuneSpec
from kubeforge.stages import PodSize, Stage
from kubeforge.stages.results import StageResult


@dataclass(frozen=True)
class TuneResult(StageResult):
    best_config: dict[str, Any]
    """The best trial's values by dotted path: what a section with `hyperparameters_from: tune` takes."""
    best_metrics: dict[str, float]
    best_trial: str
    metric: str | list[str]
    mode: str | list[str]
    num_trials: int
    completed_trials: int
    early_stopped_trials: int
    failed_trials: int
    total_trial_steps: int
    study_storage: str
    plots: list[str]
    pareto_front: list[dict[str, Any]] | None = None
    """With several metrics: the trials no other trial beats on every one."""
    param_importances: dict[str, float] | None = None


def _pods(spec: TuneSpec) -> PodSize:
    # A pod per concurrent trial; a GPU fraction still needs a whole device on the pod.
    return PodSize(spec.max_concurrent, spec.cpus_per_trial, math.ceil(spec.gpus_per_trial))


TUNE: Stage[TuneSpec, TuneResult] = Stage(
    name="tune",
    section="tune",
    spec_type=TuneSpec,
    result_type=TuneResult,
    run="kubeforge.tune.stage:run",
    # A trial runs the target's loop on the target's inputs.
    reads_like=lambda spec: spec.tune.target,  # type: ignore[attr-defined]
    pod_size=_pods,
)

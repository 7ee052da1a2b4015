"""The evaluate stage: the candidate scored against its base model and the current champion."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubeforge.spec.evaluate import EvaluateSpec
from kubeforge.stages import Metric, PodSize, Stage
from kubeforge.stages.results import StageResult, finite

METRICS = (
    Metric("perplexity", lower_is_better=True),
    Metric("exact_match"),
    Metric("bleu"),
    Metric("rouge_l"),
    Metric("parse_rate"),
    Metric("doctest_pass_rate"),
)

HARNESS_PREFIX = "harness_"
"""lm-evaluation-harness metrics: `harness_<task>_<metric>[_<filter>]` (see `kubeforge.evaluate.harness`)."""


@dataclass(frozen=True)
class EvaluateResult(StageResult):
    candidate: dict[str, float | None]
    """The pipeline's model's score per metric (None: not measured in this run)."""
    base: dict[str, float | None] | None
    """The model it was fine-tuned from, when compared."""
    champion: dict[str, float | None] | None
    """The registered champion, when there is one."""
    champion_version: str | None
    champion_scored_version: str | None
    models: dict[str, str]
    comparison: str
    comparison_md: str
    plots: list[str]
    samples: str
    task: dict[str, Any] | None
    num_examples: int
    perplexity_split: str | None
    doctest_isolation: str | None
    harness: dict[str, Any] | None = None
    """lm-evaluation-harness run: tasks, num_fewshot, limit, the task files and the metric names it reported
    (whose values are in candidate, base and champion); None without `spec.evaluate.harness`."""

    def gate_values(self, metric: str) -> tuple[float | None, float | None]:
        return finite(self.candidate.get(metric)), finite((self.champion or {}).get(metric))

    def scored_metrics(self) -> list[str]:
        return sorted(k for k, v in self.candidate.items() if finite(v) is not None)


EVALUATE: Stage[EvaluateSpec, EvaluateResult] = Stage(
    name="evaluate",
    section="evaluate",
    spec_type=EvaluateSpec,
    result_type=EvaluateResult,
    run="kubeforge.evaluate.stage:run",
    # The candidate is the latest of the pretrained, fine-tuned and aligned (rl) models; the task is finetune's.
    reads=("data", "pretrain", "finetune", "rl"),
    pod_size=lambda spec: PodSize.of(use_gpu=spec.use_gpu),
    gpu_runs_in="driver",  # it scores the models in the stage function
    needs_model="score",
    metrics=METRICS,
    # Which harness metrics there are depends on task files read at run time: the stage checks gates on
    # them against its tasks before it scores anything (`kubeforge.evaluate.harness.check_gates`).
    metric_pattern=HARNESS_PREFIX + "[a-z_]+",
    scores_champion=True,
    local_paths=lambda spec: [("harness.task_dir", spec.harness.task_dir)]
    if spec.harness is not None and spec.harness.task_dir is not None else [],
    # The user's harness task files are read at run time: their contents belong in the cache key.
    cache_extra="kubeforge.evaluate.harness:task_dir_fingerprint",
)

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
    reads=("data", "pretrain", "finetune"),
    pod_size=lambda spec: PodSize.of(use_gpu=spec.use_gpu),
    gpu_runs_in="driver",  # it scores the models in the stage function
    needs_model="score",
    metrics=METRICS,
    scores_champion=True,
)

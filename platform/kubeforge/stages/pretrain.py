"""The pretrain stage: a model trained from scratch on the data stage's token shards with Ray Train."""

from __future__ import annotations

from dataclasses import dataclass

from kubeforge.spec.pretrain import PretrainSpec
from kubeforge.stages import Metric, PodSize, Stage, Training
from kubeforge.stages.results import ModelLineage, ModelResult


@dataclass(frozen=True)
class PretrainResult(ModelResult):
    model_dir: str
    objective: str
    final_step: int
    initial_val_loss: float
    initial_val_perplexity: float
    val_loss: float
    val_perplexity: float
    train_loss: float
    tokens_per_second: float
    tokens_seen: int
    resumed_from_step: int
    """The step this attempt's workers resumed from (0 for a fresh start)."""
    restored_from_steps: list[int]
    """Every checkpoint step the workers restored from, worker restarts included."""
    num_parameters: int
    seq_len: int
    workers: int

    def model_artifact(self) -> str | None:
        return self.model_dir

    def lineage(self) -> ModelLineage:
        return ModelLineage(method=f"pretrain-{self.objective}", format="hf")


PRETRAIN: Stage[PretrainSpec, PretrainResult] = Stage(
    name="pretrain",
    section="pretrain",
    spec_type=PretrainSpec,
    result_type=PretrainResult,
    run="kubeforge.pretrain.stage:run",
    reads=("data",),
    pod_size=lambda spec: PodSize.of_workers(spec.resources),
    model_role="base",
    metrics=(Metric("val_loss", lower_is_better=True), Metric("val_perplexity", lower_is_better=True)),
    training=Training(
        loop_config="kubeforge.pretrain.stage:loop_config",
        recipe="kubeforge.pretrain.recipe:PretrainRecipe",
        eval_metrics=lambda spec: ("val_loss", "val_perplexity"),
    ),
)

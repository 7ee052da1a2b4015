"""The reward stage: a reward model (a scalar head on a causal LM) trained on preference pairs with Ray Train."""

from __future__ import annotations

from dataclasses import dataclass

from kubeforge.spec.reward import RewardSpec
from kubeforge.stages import Metric, PodSize, Stage
from kubeforge.stages.results import ModelLineage, ModelResult

EVAL_METRICS = ("val_loss", "accuracy", "margin")
"""What every evaluation on the held-out pairs reports besides `step`."""


@dataclass(frozen=True)
class RewardResult(ModelResult):
    model_dir: str
    """A `transformers` AutoModelForSequenceClassification folder (`num_labels=1`) with the tokenizer and its
    chat template: what TRL's reward models are and what vLLM's pooling runner scores."""
    pairs_dir: str
    """The pairs' splits (`train.jsonl`, `test.jsonl`: the held-out pairs), relative to the stage folder."""
    base_model_dir: str
    method: str
    accuracy: float
    """Share of held-out pairs whose chosen answer gets the higher reward (a tie counts as wrong)."""
    margin: float
    """Mean of reward(chosen) - reward(rejected) over the held-out pairs."""
    val_loss: float
    """Mean pairwise loss, -log sigmoid(reward(chosen) - reward(rejected)), over the held-out pairs."""
    initial_accuracy: float
    initial_margin: float
    initial_val_loss: float
    final_step: int
    train_loss: float
    tokens_per_second: float
    tokens_seen: int
    resumed_from_step: int
    restored_from_steps: list[int]
    trainable_parameters: int
    total_parameters: int
    num_train_pairs: int
    num_test_pairs: int
    dropped_pairs: int
    """Pairs left out because the prompt fills max_length or the two answers are the same within it."""
    workers: int

    def model_artifact(self) -> str | None:
        return self.model_dir

    def lineage(self) -> ModelLineage:
        return ModelLineage(method=f"reward-{self.method}", format="hf")


REWARD: Stage[RewardSpec, RewardResult] = Stage(
    name="reward",
    section="reward",
    spec_type=RewardSpec,
    result_type=RewardResult,
    run="kubeforge.reward.stage:run",
    # The corpus (built-in pairs) and the model it starts from: fine-tuned when there is one, else pretrained.
    reads=("data", "pretrain", "finetune"),
    pod_size=lambda spec: PodSize.of_workers(spec.resources),
    local_paths=lambda spec: [(field, path) for field, path in (
        ("pairs.path", spec.pairs.path), ("base_model", spec.base_model),
    ) if path is not None],
    model_role="reward",
    # A model beside the pipeline's: never quantized or promoted (`StageContext.latest_model` skips it).
    candidate=False,
    metrics=(Metric("accuracy"), Metric("margin"), Metric("val_loss", lower_is_better=True)),
)

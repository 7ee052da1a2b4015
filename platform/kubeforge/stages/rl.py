"""The rl stage: the fine-tuned policy optimised against rewards (GRPO) with Ray Train."""

from __future__ import annotations

from dataclasses import dataclass

from kubeforge.spec.rl import RlSpec
from kubeforge.stages import Metric, PodSize, Stage
from kubeforge.stages.results import ModelLineage, ModelResult

EVAL_METRICS = ("reward", "response_length", "perplexity")
"""What every evaluation reports besides `step` and `val_loss` (the negated reward: what the engine's
hub tracks as the loss), and `reward_<source>` per rule and reward model."""


@dataclass(frozen=True)
class RlResult(ModelResult):
    model_dir: str
    """A `transformers` causal LM folder (LoRA merged) with the tokenizer and its chat template."""
    base_model_dir: str
    """The policy it started from, which the KL penalty held it near (the fine-tuned model)."""
    algorithm: str
    method: str
    reward: float
    """Mean reward of one sampled completion per held-out prompt, at the end."""
    initial_reward: float
    """The same, for the starting policy (same prompts, same sampling seeds)."""
    reward_gain: float
    """reward - initial_reward."""
    rewards: dict[str, float]
    """The end's mean per reward source (`rule_<name>` before weighting, `model`), held-out prompts."""
    initial_rewards: dict[str, float]
    response_length: float
    """Mean completion tokens on the held-out prompts, at the end."""
    perplexity: float | None
    """On the data stage's test split, at the end (None without a data stage sharing the policy's vocabulary)."""
    initial_perplexity: float | None
    perplexity_increase: float | None
    """perplexity / initial_perplexity - 1: what the optimisation cost the model's general language."""
    final_step: int
    train_loss: float
    tokens_per_second: float
    tokens_seen: int
    resumed_from_step: int
    restored_from_steps: list[int]
    trainable_parameters: int
    total_parameters: int
    num_train_prompts: int
    num_test_prompts: int
    dropped_prompts: int
    """Prompts left out for being longer than max_prompt_length."""
    workers: int

    def model_artifact(self) -> str | None:
        return self.model_dir

    def lineage(self) -> ModelLineage:
        return ModelLineage(method=f"{self.algorithm}-{self.method}", format="hf")


RL: Stage[RlSpec, RlResult] = Stage(
    name="rl",
    section="rl",
    spec_type=RlSpec,
    result_type=RlResult,
    run="kubeforge.rl.stage:run",
    # The task's prompts and the policy (finetune), the reward model (reward), the general test split (data).
    reads=("data", "finetune", "reward"),
    pod_size=lambda spec: PodSize.of_workers(spec.resources),
    local_paths=lambda spec: [(field, path) for field, path in (
        ("base_model", spec.base_model),
        ("rewards.model.path", spec.rewards.model.path if spec.rewards.model is not None else None),
    ) if path is not None],
    model_role="aligned",
    metrics=(
        Metric("reward"), Metric("reward_gain"), Metric("perplexity", lower_is_better=True),
        Metric("perplexity_increase", lower_is_better=True),
    ),
)

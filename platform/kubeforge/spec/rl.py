"""`spec.rl`: optimise the fine-tuned policy against rewards (GRPO or PPO), under a KL penalty to where it started."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from kubeforge.spec.base import StrictModel
from kubeforge.spec.finetune import LoraSettings
from kubeforge.spec.pretrain import CheckpointSettings, EvalSettings, Resources, TrainSettings

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]

RULES = ("doctests", "parses", "short")
"""Verifiable rewards of a completion, each in [0, 1]:

* `parses`: the function's header followed by the generated body is valid Python (an empty body is not);
* `doctests`: the whole function passes its own doctests in the sandbox evaluate uses (a record of the
  built-in task without doctests gives 0 to every completion, so it moves nothing);
* `short`: 1 - (completion tokens / rollout.max_new_tokens), 0 for one cut off at the limit.

`parses` and `doctests` need the built-in `python-docstrings` task (records name their function)."""
CODE_RULES = ("doctests", "parses")


class RewardModelSource(StrictModel):
    """A reward model: a one-label AutoModelForSequenceClassification folder with the policy's tokenizer."""

    path: str | None = None
    """Relative to the manifest; null means the reward stage's model."""
    weight: PositiveFloat = 1.0


class RewardsSpec(StrictModel):
    """What a completion earns: the weighted sum of rule rewards and a reward model's score."""

    rules: dict[str, float] = Field(default_factory=dict)
    """Weight per rule (`doctests`, `parses`, `short`)."""
    model: RewardModelSource | None = None
    doctest_timeout_s: PositiveFloat = 2.0
    """Per generated function."""
    allow_unconfined_doctests: bool = False
    """Run the `doctests` rule on Kubernetes even where the pod cannot confine generated code (no user
    namespaces or Landlock; see `kubeforge.sandbox`)."""

    @model_validator(mode="after")
    def _known_and_some(self) -> RewardsSpec:
        unknown = sorted(set(self.rules) - set(RULES))
        if unknown:
            raise ValueError(f"rules: unknown rule {', '.join(map(repr, unknown))} (known: {', '.join(RULES)})")
        if not self.rules and self.model is None:
            raise ValueError(f"no reward source: set rules ({', '.join(RULES)}) or model, or both")
        return self


class RolloutSettings(StrictModel):
    """How completions are sampled, for training and for the evaluations on held-out prompts."""

    group_size: PositiveInt = 8
    """Completions per prompt. GRPO (at least 2) scores each one's reward against its group's mean and
    spread; PPO against its value head's estimates."""
    max_new_tokens: PositiveInt = 64
    temperature: PositiveFloat = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    engine: Literal["auto", "vllm", "transformers"] = "auto"
    """What samples them: vLLM in each worker's process (its weights reloaded from the policy before every
    step), or `transformers` generate. `auto`: vLLM where it is installed."""
    vllm_gpu_memory_utilization: Annotated[float, Field(gt=0, lt=1)] = 0.3
    """On a GPU, the share vLLM's engine may take (weights and KV cache); the rest is the training's."""
    vllm_kv_cache_gib: PositiveInt = 1
    """On a CPU, vLLM's KV cache per worker (`VLLM_CPU_KVCACHE_SPACE`)."""


class PpoSettings(StrictModel):
    """PPO's own settings."""

    gamma: Annotated[float, Field(gt=0, le=1)] = 1.0
    """Discount over the completion's tokens."""
    lam: Annotated[float, Field(ge=0, le=1)] = 1.0
    """GAE's lambda: 1 sums the rewards to go, 0 trusts the value head's next estimate. TRL's default is
    0.95 with a value model started from the reward model; our value head starts untrained, and lower
    values let its noise drive the early updates (on the built-in task at 0.95 the reward fell to 0)."""
    value_coef: PositiveFloat = 0.1
    """Weight of the value head's squared error in the loss."""


RL_TRAIN_DEFAULTS = TrainSettings(lr=1e-5, max_steps=100, warmup_steps=0, weight_decay=0.0, batch_size=4)


class RlSpec(StrictModel):
    """The rl stage: GRPO or PPO in Ray Train workers over the fine-tuning task's prompts."""

    algorithm: Literal["grpo", "ppo"] = "grpo"
    """`grpo`: group-relative advantages, no value model, the KL penalty in the loss (DeepSeekMath's GRPO, as
    TRL's GRPOTrainer). `ppo`: a value head on the policy, GAE, the KL penalty in the per-token reward (as
    TRL's PPO trainer)."""
    base_model: str | None = None
    """The policy to start from, a Hugging Face causal LM folder (relative to the manifest); null means the
    finetune stage's merged model. The KL penalty holds the policy near it."""
    method: Literal["full", "lora"] = "full"
    """`lora`: adapters train and the reference is the policy with its adapters off (no second copy)."""
    lora: LoraSettings | None = None
    rewards: RewardsSpec
    rollout: RolloutSettings = RolloutSettings()
    kl_coef: Annotated[float, Field(ge=0)] = 0.04
    """Weight of the KL to the starting policy: GRPO adds its k3 estimate (exp(d) - d - 1, d = ref - policy)
    per token to the loss, PPO subtracts kl_coef x (policy - ref) per token from the reward."""
    updates_per_rollout: PositiveInt = 1
    """Optimizer steps on each batch of rollouts (TRL's `num_iterations` for GRPO, `num_ppo_epochs` for PPO);
    from the second one on, the clipped ratio to the sampling policy limits each token's update."""
    clip_range: Annotated[float, Field(gt=0, lt=1)] = 0.2
    """PPO's clipping of the ratio to the sampling policy, for both algorithms."""
    ppo: PpoSettings | None = None
    """With `algorithm: ppo` (defaults when omitted)."""
    max_prompt_length: PositiveInt = 192
    """Prompts of more tokens are left out; a prompt plus max_new_tokens must fit the model's positions."""
    train: TrainSettings = RL_TRAIN_DEFAULTS
    """`batch_size` counts prompts per micro-batch; each brings `rollout.group_size` completions."""
    eval: EvalSettings = EvalSettings(every_steps=10, max_batches=4)
    """Every `every_steps`: the mean reward of one sampled completion per held-out prompt (the fine-tuning
    task's test split, at most batch_size x max_batches per worker) and the perplexity on the data
    stage's test split."""
    checkpoint: CheckpointSettings = CheckpointSettings(every_steps=25)
    resources: Resources = Resources()
    max_failures: Annotated[int, Field(ge=0)] = 3

    @model_validator(mode="after")
    def _consistent(self) -> RlSpec:
        if self.lora is not None and self.method != "lora":
            raise ValueError(f"lora: only used with method lora (got method '{self.method}')")
        if self.ppo is not None and self.algorithm != "ppo":
            raise ValueError(f"ppo: only used with algorithm ppo (got algorithm '{self.algorithm}')")
        if self.algorithm == "grpo" and self.rollout.group_size < 2:
            raise ValueError("rollout.group_size: GRPO compares completions of the same prompt; it needs at least 2")
        return self

    @property
    def ppo_settings(self) -> PpoSettings:
        return self.ppo or PpoSettings()

    @property
    def lora_settings(self) -> LoraSettings:
        return self.lora or LoraSettings()

"""The rl training loop's configuration (light: the driver builds it without torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubeforge.engine.config import LoopConfig
from kubeforge.spec.rl import RlSpec


@dataclass(kw_only=True)
class RlLoop(LoopConfig):
    """What `kubeforge.rl.recipe.RlRecipe` needs besides the session (`stage.loop_config` builds it)."""

    spec: RlSpec
    base_model_dir: str
    """The starting policy, also the reference of the KL penalty."""
    reward_model_dir: str | None
    """A one-label sequence-classification folder sharing the policy's tokenizer, when a model rewards."""
    train_prompts: list[dict[str, Any]]
    """`input_ids` of the chat-formatted prompt and the task `record` it came from."""
    test_prompts: list[dict[str, Any]]
    """The held-out prompts every evaluation samples one completion for."""
    pad_id: int
    eos_ids: list[int]
    perplexity_shards: list[str] = field(default_factory=list)
    """The data stage's test (else validation) shards, when its vocabulary is the policy's."""
    special_tokens: dict[str, int | None] = field(default_factory=dict)
    vocab_size: int = 0

    def __post_init__(self) -> None:
        if not self.train_prompts or not self.test_prompts:
            raise ValueError("the rl loop needs training prompts and held-out prompts")

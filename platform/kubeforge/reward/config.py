"""The reward model's training loop configuration (light: the driver builds it without torch)."""

from __future__ import annotations

from dataclasses import dataclass

from kubeforge.engine.config import LoopConfig
from kubeforge.spec.reward import RewardSpec


@dataclass(kw_only=True)
class RewardLoop(LoopConfig):
    """What `kubeforge.reward.recipe.RewardRecipe` needs besides the session (`stage.loop_config` builds it)."""

    spec: RewardSpec
    base_model_dir: str
    """The causal LM folder the reward model starts from (its body; the scalar head is new)."""
    train_pairs: list[dict[str, list[int]]]
    """Encoded pairs: `chosen_input_ids` and `rejected_input_ids`."""
    test_pairs: list[dict[str, list[int]]]
    """The held-out pairs every evaluation scores."""
    pad_id: int

    def __post_init__(self) -> None:
        if not self.train_pairs or not self.test_pairs:
            raise ValueError("the reward loop needs training pairs and held-out pairs")

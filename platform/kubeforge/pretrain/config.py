"""The pretraining loop's typed configuration (light: the driver builds it without torch)."""

from __future__ import annotations

from dataclasses import dataclass

from kubeforge.engine.config import LoopConfig
from kubeforge.spec.pretrain import PretrainSpec


@dataclass(kw_only=True)
class PretrainLoop(LoopConfig):
    """The pretraining loop's configuration (`kubeforge.pretrain.stage.loop_config` builds it)."""

    spec: PretrainSpec
    train_files: list[str]
    """The data stage's training shards (absolute paths: workers may run elsewhere on a shared volume)."""
    validation_files: list[str]
    vocab_size: int
    special_tokens: dict[str, int | None]
    """The tokenizer's `pad_id`, `eos_id`, `mask_id`...: the model's config and the masking need them."""

    def __post_init__(self) -> None:
        if not self.train_files or not self.validation_files:
            raise ValueError("the pretraining loop needs training and validation shards")

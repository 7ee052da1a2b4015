"""`spec.reward`: train a reward model (a scalar head on a causal LM) on preference pairs."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from kubeforge.spec.base import StrictModel
from kubeforge.spec.finetune import LoraSettings
from kubeforge.spec.pretrain import CheckpointSettings, EvalSettings, Resources, TrainSettings

PositiveInt = Annotated[int, Field(gt=0)]


class PairsSpec(StrictModel):
    """Preference pairs: a built-in set or a JSONL file (exactly one)."""

    builtin: Literal["python-docstrings"] | None = None
    """`python-docstrings`: a function of the data stage's standard-library corpus is preferred over a
    corrupted copy of it (the pairs finetune's `dpo` objective trains on)."""
    path: str | None = None
    """JSONL of `prompt`/`chosen`/`rejected` records (optional `id`), relative to the manifest: the format of
    finetune's `dpo` task files."""
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1
    """Share of pairs held out to report accuracy and margin on; the split is by a hash of the pair's prompt,
    so no pair (and no prompt) is on both sides."""
    max_pairs: PositiveInt | None = None
    """Train on at most this many pairs (after the split, from the training side); null means all."""
    seed: int = 0
    """Seeds the corruption of the built-in pairs and the sample `max_pairs` keeps."""

    @model_validator(mode="after")
    def _exactly_one(self) -> PairsSpec:
        if (self.builtin is None) == (self.path is None):
            raise ValueError("set exactly one of builtin and path")
        return self


REWARD_TRAIN_DEFAULTS = TrainSettings(lr=1e-4, max_steps=100, warmup_steps=10, weight_decay=0.0)


class RewardSpec(StrictModel):
    """The reward stage: Ray Train over preference pairs with a pairwise (Bradley-Terry) loss."""

    base_model: str | None = None
    """A Hugging Face causal LM folder (relative to the manifest); null means the finetune stage's model, or
    the pretrain stage's without fine-tuning."""
    method: Literal["full", "lora"] = "lora"
    """`full`: every weight trains. `lora`: adapters on `lora.target_modules` plus the new scalar head."""
    lora: LoraSettings | None = None
    """Adapter settings for `lora` (defaults when omitted)."""
    pairs: PairsSpec
    max_length: PositiveInt = 256
    """Prompt plus answer, in tokens (at most the base model's positions); a longer answer is cut, and a pair
    whose two sides are then the same (or whose prompt alone fills it) is dropped."""
    train: TrainSettings = REWARD_TRAIN_DEFAULTS
    """`batch_size` counts pairs (each pair is two sequences)."""
    eval: EvalSettings = EvalSettings(every_steps=25, max_batches=10)
    """Accuracy, margin and loss on the held-out pairs every `every_steps` (and at the end)."""
    checkpoint: CheckpointSettings = CheckpointSettings(every_steps=25)
    resources: Resources = Resources()
    max_failures: Annotated[int, Field(ge=0)] = 3

    @model_validator(mode="after")
    def _consistent(self) -> RewardSpec:
        if self.lora is not None and self.method != "lora":
            raise ValueError(f"lora: only used with method lora (got method '{self.method}')")
        return self

    @property
    def lora_settings(self) -> LoraSettings:
        return self.lora or LoraSettings()

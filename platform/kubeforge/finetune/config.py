"""The fine-tuning loop's typed configuration (light: the driver builds it without torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubeforge.engine.config import LoopConfig
from kubeforge.spec.finetune import FinetuneSpec


@dataclass(kw_only=True)
class FinetuneLoop(LoopConfig):
    """The fine-tuning loop's configuration (`kubeforge.finetune.stage.loop_config` builds it)."""

    spec: FinetuneSpec
    base_model_dir: str
    """The model fine-tuned (for distillation: the teacher)."""
    student_path: str | None
    """Distillation from a model folder: the student's starting point."""
    task_dir: str
    train_examples: list[dict[str, list[int]]]
    """Encoded examples (`input_ids`/`labels`, or both sides of a preference pair) the loop trains on."""
    validation_examples: list[dict[str, list[int]]]
    """Held out of the task's training split for the evaluations during training."""
    dropped_examples: int
    """Examples whose prompt alone fills max_length (reported, not trained on)."""
    num_test_examples: int
    pad_id: int
    replay_rows: Any = None
    """Pretraining token rows (a numpy array) that replace `replay_fraction` of the examples, or None."""
    ewc_rows: Any = None
    """Pretraining token rows (a numpy array) the EWC Fisher information is estimated on, or None."""
    save_outputs: bool = True
    """Write the adapter and merged model with the final checkpoint (benchmarks that only time the loop skip it)."""

    def __post_init__(self) -> None:
        if not self.train_examples or not self.validation_examples:
            raise ValueError("the fine-tuning loop needs training and held-out validation examples")

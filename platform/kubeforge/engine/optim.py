"""AdamW and the learning-rate schedule: linear warmup to `lr`, then cosine decay to `lr x min_lr_ratio`."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from kubeforge.spec.pretrain import TrainSettings

if TYPE_CHECKING:
    import torch


def build_optimizer(model: torch.nn.Module, train: TrainSettings) -> torch.optim.AdamW:
    """AdamW without weight decay on biases, norms and embeddings' 1-d parameters (standard practice:
    decaying them towards zero only hurts). Frozen parameters (a PEFT model's base) are left out."""
    import torch

    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train.lr,
        betas=train.betas,
    )


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based, as LambdaLR counts).

    Warmup starts at 1/warmup_steps rather than 0, so that no optimizer step is wasted at lr 0.
    The cosine reaches min_lr_ratio exactly at the last step, max_steps - 1.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * cosine


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainSettings) -> torch.optim.lr_scheduler.LambdaLR:
    from functools import partial

    from torch.optim.lr_scheduler import LambdaLR

    # functools.partial of a module-level function pickles, so the scheduler's state_dict does too.
    return LambdaLR(
        optimizer,
        partial(lr_factor, warmup_steps=train.warmup_steps, max_steps=train.max_steps, min_lr_ratio=train.min_lr_ratio),
    )

"""The pairwise (Bradley-Terry) loss of a reward model, on the two sides' scalar rewards (pure torch)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PairTerms:
    """Per-pair quantities; `loss` is the batch mean (what training minimises)."""

    losses: torch.Tensor
    margins: torch.Tensor
    """reward(chosen) - reward(rejected), detached."""

    @property
    def loss(self) -> torch.Tensor:
        return self.losses.mean()

    @property
    def correct(self) -> torch.Tensor:
        """1 where the chosen side's reward is strictly higher (a tie, as with a zero head, is 0)."""
        return (self.margins > 0).float()


def pairwise_terms(chosen: torch.Tensor, rejected: torch.Tensor) -> PairTerms:
    """Bradley-Terry: P(chosen preferred) = sigmoid(r_chosen - r_rejected); the loss is its negative log,
    -log sigmoid(r_chosen - r_rejected), computed stably by logsigmoid."""
    margins = chosen.float() - rejected.float()
    return PairTerms(-F.logsigmoid(margins), margins.detach())

"""Elastic weight consolidation (`spec.finetune.ewc`): a quadratic pull towards the base model's weights.

EWC (Kirkpatrick et al., 2017) treats the pretraining corpus as the earlier task. Its loss, near the
pretrained weights theta*, is approximated by a quadratic whose curvature is the diagonal of the Fisher
information F; fine-tuning then minimises

    task loss + strength/2 x sum_i F_i (theta_i - theta*_i)^2

over the trainable parameters, so that weights the corpus barely depends on move freely and the ones
it depends on most stay close. F is the empirical Fisher: the mean over `samples` rows of the data
stage's train shards of each row's squared gradient of its language-modelling loss, one backward
pass per row (a batch's gradient would give the square of the mean, not the mean of the squares).

Only method `full`: with adapters (LoRA, prefixes) the trainable parameters start at zero and are not
the weights the corpus was learnt in, so their Fisher says little about forgetting; the spec refuses it.

Every worker estimates F on the same rows from the freshly loaded base model, before a checkpoint is
restored and before DDP wraps the model, so a resumed or restarted run uses the same F and theta*.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from collections.abc import Iterator


class EWCPenalty:
    """The Fisher diagonal and anchor of every trainable parameter, by parameter name."""

    def __init__(self, fisher: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], strength: float) -> None:
        if fisher.keys() != anchor.keys():
            raise ValueError("the Fisher information and the anchor must cover the same parameters")
        self.fisher = fisher
        self.anchor = anchor
        self.strength = strength

    @classmethod
    def estimate(cls, model: torch.nn.Module, rows: np.ndarray, strength: float, device: torch.device) -> EWCPenalty:
        """F and theta* at the model's current weights; `rows` are token rows ([N, L] integers, N >= 1)."""
        if len(rows) == 0:
            raise ValueError("the Fisher information needs at least one row")
        trainable = dict(_trainable(model))
        fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in trainable.items()}
        was_training = model.training
        model.eval()  # no dropout: the curvature of the model as it is, not of a random sub-network
        try:
            for row in rows:
                ids = torch.as_tensor(np.asarray(row, dtype=np.int64), device=device)[None]
                model.zero_grad(set_to_none=True)
                model(input_ids=ids, labels=ids).loss.backward()
                for name, parameter in trainable.items():
                    if parameter.grad is not None:
                        fisher[name] += parameter.grad.detach().float() ** 2
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was_training)
        for value in fisher.values():
            value /= len(rows)
        anchor = {name: p.detach().float().clone() for name, p in trainable.items()}
        return cls(fisher, anchor, strength)

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        """strength/2 x sum_i F_i (theta_i - theta*_i)^2 over the model's trainable parameters."""
        terms = [
            (self.fisher[name] * (parameter.float() - self.anchor[name]) ** 2).sum()
            for name, parameter in _trainable(model)
        ]
        if len(terms) != len(self.fisher):
            raise ValueError(f"the model has {len(terms)} trainable parameters, the EWC anchor {len(self.fisher)}")
        return 0.5 * self.strength * torch.stack(terms).sum()


def _trainable(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    return ((name, p) for name, p in model.named_parameters() if p.requires_grad)

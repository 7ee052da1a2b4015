"""The learning-rate schedule: linear warmup, then cosine down to lr x min_lr_ratio."""

from __future__ import annotations

import itertools

import pytest

from kubeforge.engine.optim import build_scheduler, lr_factor
from kubeforge.spec.pretrain import TrainSettings

pytestmark = pytest.mark.unit


def _lrs(train: TrainSettings) -> list[float]:
    import torch

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=train.lr)
    scheduler = build_scheduler(optimizer, train)
    seen = []
    for _ in range(train.max_steps):
        seen.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return seen


def test_warmup_rises_linearly_then_cosine_ends_at_the_floor() -> None:
    train = TrainSettings(lr=1e-3, min_lr_ratio=0.1, warmup_steps=10, max_steps=100)
    lrs = _lrs(train)
    assert lrs[:10] == pytest.approx([1e-3 * (i + 1) / 10 for i in range(10)])
    assert max(lrs) == pytest.approx(1e-3)
    assert lrs[9] == pytest.approx(1e-3)
    decay = lrs[9:]
    assert all(a >= b for a, b in itertools.pairwise(decay)), "cosine part must not rise"
    assert lrs[-1] == pytest.approx(1e-4)  # lr x min_lr_ratio at the last optimizer step
    # Halfway through the decay (steps 10..100 of 101) the cosine is midway between lr and the floor.
    assert lr_factor(10 + 45, 10, 101, 0.1) == pytest.approx(0.55)


def test_no_warmup_starts_at_full_lr_and_zero_floor_reaches_zero() -> None:
    lrs = _lrs(TrainSettings(lr=2e-3, min_lr_ratio=0.0, warmup_steps=0, max_steps=20))
    assert lrs[0] == pytest.approx(2e-3)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_scheduler_state_round_trips() -> None:
    import torch

    train = TrainSettings(max_steps=50, warmup_steps=5)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=train.lr)
    scheduler = build_scheduler(optimizer, train)
    for _ in range(17):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    other_optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=train.lr)
    other = build_scheduler(other_optimizer, train)
    other.load_state_dict(state)
    assert other.get_last_lr() == pytest.approx(scheduler.get_last_lr())
    assert other.last_epoch == 17

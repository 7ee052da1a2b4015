"""The training engine's pieces, without Ray: data split, MLM masking, a training step, checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kubeforge.engine.batches import Batcher, RankSampler, TokenShards, mask_tokens
from kubeforge.engine.model import build_model
from kubeforge.engine.optim import build_optimizer, build_scheduler
from kubeforge.engine.state import load_state, save_state
from kubeforge.engine.steps import evaluate_tokens, peak_flops, resolve_bf16, train_step
from kubeforge.spec.pretrain import PretrainSpec

pytestmark = pytest.mark.unit

SPECIAL = {"eos_id": 0, "pad_id": 1, "mask_id": 2, "unk_id": 3}
TINY = {"model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "max_position_embeddings": 32}}


def test_ranks_split_every_epoch_disjointly_and_completely() -> None:
    samplers = [RankSampler(10, rank, 3, seed=1) for rank in range(3)]
    for epoch in range(2):
        parts = [s.indices(epoch) for s in samplers]
        assert {len(p) for p in parts} == {4}  # ceil(10 / 3), padded by wrap-around
        assert set(np.concatenate(parts)) == set(range(10))
    assert not np.array_equal(samplers[0].indices(0), samplers[0].indices(1)), "each epoch reshuffles"
    # The stream is addressed by position: asking again (as a resumed run does) gives the same batch.
    assert samplers[1].batch(5, 3) == RankSampler(10, 1, 3, seed=1).batch(5, 3)


def test_token_shards_index_across_files(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.arange(12, dtype=np.int32).reshape(3, 4))
    np.save(tmp_path / "b.npy", np.arange(100, 108, dtype=np.int32).reshape(2, 4))
    shards = TokenShards([tmp_path / "a.npy", tmp_path / "b.npy"])
    assert (len(shards), shards.seq_len) == (5, 4)
    assert shards.rows([4, 0]).tolist() == [[104, 105, 106, 107], [0, 1, 2, 3]]


def test_mlm_masking_rates_and_labels() -> None:
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (200, 128), generator=generator)
    ids[:, 0] = 0  # eos tokens are never targets
    ids[:, -5:] = 1  # nor padding
    inputs, labels = mask_tokens(ids, 0.15, mask_id=2, vocab_size=1000, special_ids=[0, 1, 2, 3],
                                 generator=generator)
    chosen = labels != -100
    eligible = 200 * (128 - 6)
    assert chosen.sum().item() / eligible == pytest.approx(0.15, abs=0.01)
    assert not chosen[:, 0].any() and not chosen[:, -5:].any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(inputs[~chosen], ids[~chosen]), "tokens that are not targets are left alone"
    masked = (inputs == 2) & chosen
    kept = (inputs == ids) & chosen
    replaced = chosen & ~masked & ~kept
    n = chosen.sum().item()
    assert masked.sum().item() / n == pytest.approx(0.8, abs=0.02)
    # Random replacements can hit the original token by chance (1 in 1000), counted as kept.
    assert kept.sum().item() / n == pytest.approx(0.1, abs=0.02)
    assert replaced.sum().item() / n == pytest.approx(0.1, abs=0.02)


def test_causal_batch_ignores_padding_in_labels() -> None:
    import torch

    spec = PretrainSpec.model_validate(TINY)
    rows = np.array([[5, 6, 7, 1, 1], [8, 0, 9, 10, 11]], dtype=np.int32)
    batch = Batcher(spec, 50, SPECIAL)(rows, torch.device("cpu"), None)
    assert batch["labels"].tolist() == [[5, 6, 7, -100, -100], [8, 0, 9, 10, 11]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["count"] == 2 + 4  # shifted targets that are not padding


def test_training_steps_fit_a_repeated_batch() -> None:
    import torch

    spec = PretrainSpec.model_validate({**TINY, "train": {"lr": 1e-2, "warmup_steps": 0, "max_steps": 30,
                                                          "grad_accum_steps": 2}})
    model = build_model(spec, 64, SPECIAL)
    optimizer = build_optimizer(model, spec.train)
    scheduler = build_scheduler(optimizer, spec.train)
    batcher = Batcher(spec, 64, SPECIAL)
    rows = np.random.default_rng(0).integers(4, 64, size=(4, 16)).astype(np.int32)
    micro = [batcher(rows[:2], torch.device("cpu"), None), batcher(rows[2:], torch.device("cpu"), None)]
    losses = [train_step(model, optimizer, scheduler, micro, 1.0, False, torch.device("cpu")) for _ in range(30)]
    assert losses[0] == pytest.approx(np.log(64), abs=0.5)  # a fresh model guesses about uniformly
    assert losses[-1] < losses[0] / 3
    loss, perplexity = evaluate_tokens(model, [rows], batcher, torch.device("cpu"), False, seed=0)
    assert perplexity == pytest.approx(np.exp(loss))
    assert loss < losses[0] / 3


def test_checkpoint_state_round_trip(tmp_path: Path) -> None:
    import torch

    spec = PretrainSpec.model_validate({**TINY, "train": {"max_steps": 20, "warmup_steps": 2}})
    model = build_model(spec, 64, SPECIAL)
    optimizer = build_optimizer(model, spec.train)
    scheduler = build_scheduler(optimizer, spec.train)
    batcher = Batcher(spec, 64, SPECIAL)
    rows = np.random.default_rng(0).integers(4, 64, size=(2, 16)).astype(np.int32)
    for _ in range(3):
        train_step(model, optimizer, scheduler, [batcher(rows, torch.device("cpu"), None)], 1.0, False,
                   torch.device("cpu"))
    save_state(tmp_path, model, optimizer, scheduler, 3, 0, {"tokens_seen": 96, "initial_val_loss": 4.1})
    expected_draw = torch.rand(3)

    torch.manual_seed(123)  # scramble the RNG: loading must bring the saved state back
    fresh = build_model(spec.model_copy(update={"train": spec.train.model_copy(update={"seed": 9})}), 64, SPECIAL)
    fresh_optimizer = build_optimizer(fresh, spec.train)
    fresh_scheduler = build_scheduler(fresh_optimizer, spec.train)
    extra = load_state(tmp_path, fresh, fresh_optimizer, fresh_scheduler, 0)
    assert extra == {"step": 3, "tokens_seen": 96, "initial_val_loss": 4.1}
    assert torch.equal(torch.rand(3), expected_draw)
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
    assert fresh_scheduler.last_epoch == 3
    assert fresh_scheduler.get_last_lr() == pytest.approx(scheduler.get_last_lr())
    saved = optimizer.state_dict()["state"]
    loaded = fresh_optimizer.state_dict()["state"]
    assert all(torch.equal(saved[k]["exp_avg"], loaded[k]["exp_avg"]) for k in saved)
    # Both continue identically from here.
    batch = batcher(rows, torch.device("cpu"), None)
    a = train_step(model, optimizer, scheduler, [batch], 1.0, False, torch.device("cpu"))
    b = train_step(fresh, fresh_optimizer, fresh_scheduler, [batch], 1.0, False, torch.device("cpu"))
    assert a == pytest.approx(b, rel=1e-6)


def test_precision_and_peak_flops() -> None:
    import torch

    cpu = torch.device("cpu")
    assert resolve_bf16("auto", cpu) is False
    assert resolve_bf16("bf16", cpu) is True
    assert resolve_bf16("fp32", cpu) is False
    assert peak_flops("NVIDIA H100 80GB HBM3", bf16=True) == 989e12
    assert peak_flops("NVIDIA H100 PCIe", bf16=True) == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", bf16=False) == 156e12
    assert peak_flops("Tesla T4", bf16=True) is None

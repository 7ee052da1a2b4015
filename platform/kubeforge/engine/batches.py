"""Token rows for training and evaluation: shards on disk, the per-rank sampler, masking, batching.

Used by pretraining (its training and validation batches), fine-tuning's replay rows, and the evaluate
and quantize stages' perplexity batches. Works without Ray or a process group (the unit tests).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kubeforge.spec.pretrain import PretrainSpec


class TokenShards:
    """The rows of several (n, seq_len) int32 .npy shards as one indexable sequence, memory-mapped."""

    def __init__(self, files: Sequence[str | Path]) -> None:
        self.arrays = [np.load(str(f), mmap_mode="r") for f in files]
        self.arrays = [a for a in self.arrays if len(a)]
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def seq_len(self) -> int:
        return int(self.arrays[0].shape[1]) if self.arrays else 0

    def rows(self, indices: Sequence[int]) -> np.ndarray:
        out = np.empty((len(indices), self.seq_len), dtype=np.int64)
        for i, index in enumerate(indices):
            shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
            out[i] = self.arrays[shard][index - self.offsets[shard]]
        return out


class RankSampler:
    """DistributedSampler's split, as an endless stream addressable by position.

    Every epoch shuffles all indices with the same seed on every rank, pads by wrapping around to a
    multiple of the world size and gives rank r every world_size-th index from r. Addressing the
    stream by position (micro-batch number x batch size) instead of iterating it means a resumed run
    continues with exactly the batches the interrupted one would have seen, without saving an
    iterator.
    """

    def __init__(self, num_rows: int, rank: int, world_size: int, seed: int) -> None:
        if num_rows <= 0:
            raise ValueError("no rows to sample from")
        self.num_rows = num_rows
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.per_rank = math.ceil(num_rows / world_size)
        self._epoch = -1
        self._indices: np.ndarray = np.empty(0, dtype=np.int64)

    def indices(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            total = self.per_rank * self.world_size
            padded = np.resize(order, total)  # np.resize repeats from the start: wrap-around padding
            self._indices = padded[self.rank : total : self.world_size]
            self._epoch = epoch
        return self._indices

    def batch(self, micro_batch: int, batch_size: int) -> list[int]:
        out = []
        for position in range(micro_batch * batch_size, (micro_batch + 1) * batch_size):
            epoch, offset = divmod(position, self.per_rank)
            out.append(int(self.indices(epoch)[offset]))
        return out


def validation_batches(shards: TokenShards, rank: int, world_size: int, batch_size: int, max_batches: int) -> list[
    np.ndarray
]:
    """This rank's fixed validation micro-batches (strided split, no shuffling, same every time)."""
    mine = list(range(rank, len(shards), world_size))[: batch_size * max_batches]
    return [shards.rows(mine[i : i + batch_size]) for i in range(0, len(mine), batch_size)]


def mask_tokens(
    input_ids: torch.Tensor,
    mask_probability: float,
    mask_id: int,
    vocab_size: int,
    special_ids: Sequence[int],
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: choose mask_probability of the non-special tokens as targets; of those, 80%
    become [MASK], 10% a random token and 10% stay as they are. Labels are -100 everywhere else."""
    labels = input_ids.clone()
    probability = torch.full(input_ids.shape, mask_probability)
    special = torch.zeros(input_ids.shape, dtype=torch.bool)
    for token in special_ids:
        special |= input_ids == token
    probability.masked_fill_(special, 0.0)
    chosen = torch.bernoulli(probability, generator=generator).bool()
    labels[~chosen] = -100
    inputs = input_ids.clone()
    to_mask = torch.bernoulli(torch.full(input_ids.shape, 0.8), generator=generator).bool() & chosen
    inputs[to_mask] = mask_id
    # Half of the remaining 20% (10% overall) get a random token; the rest keep the original.
    to_random = torch.bernoulli(torch.full(input_ids.shape, 0.5), generator=generator).bool() & chosen & ~to_mask
    random_tokens = torch.randint(vocab_size, input_ids.shape, dtype=input_ids.dtype, generator=generator)
    inputs[to_random] = random_tokens[to_random]
    return inputs, labels


class Batcher:
    """Turns rows of token ids into model inputs for the spec's objective."""

    def __init__(self, spec: PretrainSpec, vocab_size: int, special_tokens: Mapping[str, int | None]) -> None:
        self.objective = spec.objective
        self.mask_probability = spec.mask_probability
        self.vocab_size = vocab_size
        self.pad_id = special_tokens.get("pad_id")
        eos_id = special_tokens.get("eos_id")
        # A pad id equal to eos (common in causal tokenizers) must not hide the real eos tokens.
        self.mask_padding = self.pad_id is not None and self.pad_id != eos_id
        self.special_ids = [v for v in special_tokens.values() if v is not None]
        mask_id = special_tokens.get("mask_id")
        if self.objective == "mlm" and mask_id is None:
            raise ValueError("the tokenizer has no mask token, which objective 'mlm' needs")
        self.mask_id = mask_id if mask_id is not None else -1

    def __call__(self, rows: np.ndarray, device: torch.device, generator: torch.Generator | None) -> dict[str, Any]:
        ids = torch.from_numpy(np.asarray(rows, dtype=np.int64))  # embedding and loss want int64
        attention = torch.ones_like(ids, dtype=torch.bool)
        if self.mask_padding:
            attention = ids != torch.tensor(self.pad_id)
        if self.objective == "mlm":
            inputs, labels = mask_tokens(
                ids, self.mask_probability, self.mask_id, self.vocab_size, self.special_ids, generator
            )
            count = int((labels != -100).sum())
        else:
            inputs, labels = ids, ids.masked_fill(~attention, -100)
            # The model predicts token t+1 from position t, so the first label never counts.
            count = int((labels[:, 1:] != -100).sum())
        return {
            "input_ids": inputs.to(device),
            "attention_mask": attention.long().to(device),
            "labels": labels.to(device),
            "count": count,
        }


def right_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths as `input_ids` padded on the right with `pad_id`, and their mask."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return input_ids.to(device), attention_mask.to(device)

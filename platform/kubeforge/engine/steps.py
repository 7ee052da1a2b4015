"""One optimizer step, one evaluation over token batches, and what they need (precision, all-reduce)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from kubeforge.engine.batches import Batcher

# Dense peak tensor FLOP/s (no sparsity) of the accelerators we know, by precision. Matched against
# torch.cuda.get_device_name(); the SXM parts come first because their names contain the shorter ones'.
_PEAK_FLOPS: tuple[tuple[str, float, float], ...] = (
    # (name fragment, bf16 peak, tf32 peak used for fp32 training)
    ("H200", 989e12, 494e12),
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 494e12),
    ("A100", 312e12, 156e12),
)


def peak_flops(device_name: str, bf16: bool) -> float | None:
    """Peak FLOP/s for MFU, or None for an accelerator we do not know (MFU is then not reported)."""
    for fragment, bf16_peak, tf32_peak in _PEAK_FLOPS:
        if fragment in device_name:
            return bf16_peak if bf16 else tf32_peak
    return None


def resolve_bf16(precision: str, device: torch.device) -> bool:
    """`auto` means bf16 autocast only on a GPU that supports it; CPU bf16 is slower than fp32 there."""
    if precision == "bf16":
        return True
    if precision == "fp32":
        return False
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The `transformers` model inside a DistributedDataParallel wrapper (FSDP2 shards the model in
    place: there is no wrapper to take off)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def is_fsdp(model: torch.nn.Module) -> bool:
    """Whether FSDP (`kubeforge.engine.fsdp`) shards the model: its state dicts and every forward
    pass are collectives."""
    from kubeforge.engine.fsdp import is_sharded

    return is_sharded(model)


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return [float(v) for v in tensor.cpu()]


def evaluate_tokens(
    model: torch.nn.Module,
    batches: Sequence[np.ndarray],
    batcher: Batcher,
    device: torch.device,
    bf16: bool,
    seed: int,
) -> tuple[float, float]:
    """Validation loss (token-weighted mean over all ranks) and perplexity."""
    model.eval()
    # MLM masks are drawn from a fixed generator so that every evaluation scores the same targets.
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    # Under FSDP every forward pass gathers parameters from all ranks: a batch without targets on one
    # rank must still run there, or the others wait for it forever.
    sharded = is_fsdp(model)
    with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
        for rows in batches:
            batch = batcher(rows, device, generator)
            if batch["count"] == 0 and not sharded:
                continue
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            if batch["count"]:
                total += float(out.loss) * batch["count"]
                count += batch["count"]
    model.train()
    total, count_sum = all_reduce_sum([total, count], device)
    loss = total / count_sum if count_sum else float("nan")
    return loss, math.exp(min(loss, 50.0))


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    micro_batches: Sequence[Mapping[str, Any]],
    grad_clip: float | None,
    bf16: bool,
    device: torch.device,
    compute_loss: Callable[[torch.nn.Module, Mapping[str, Any]], torch.Tensor] | None = None,
) -> float:
    """One optimizer step over gradient-accumulated micro-batches; returns this rank's mean loss.

    Under DDP the gradient all-reduce is skipped (no_sync) on every micro-batch but the last: the
    gradients accumulate locally and are averaged across ranks once per optimizer step. FSDP (which
    has no `no_sync`) reduce-scatters after every micro-batch instead: accumulating unsharded
    gradients would hold a full copy of them, the memory that sharding saves.
    `compute_loss(model, batch)` replaces the model's own loss (fine-tuning's DPO and distillation).
    """
    losses = []
    for index, batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        no_sync = getattr(model, "no_sync", None)
        sync_context = contextlib.nullcontext() if last or no_sync is None else no_sync()
        with sync_context:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                if compute_loss is None:
                    loss = model(
                        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
                    ).loss
                else:
                    loss = compute_loss(model, batch)
            (loss / len(micro_batches)).backward()
        losses.append(float(loss.detach()))
    if grad_clip is not None:
        # Under FSDP the gradients are sharded DTensors, whose norm torch reduces across the ranks.
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return sum(losses) / len(losses)

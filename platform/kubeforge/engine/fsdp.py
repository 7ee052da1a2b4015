"""Fully sharded data parallelism (torch FSDP2, `fully_shard`): one unit per transformer layer.

Each layer of the model (`LlamaDecoderLayer`, `BertLayer`) becomes its own FSDP unit and the root
takes the rest (embeddings, final norm, output head), so a worker holds 1/world_size of every
parameter, gradient and optimizer state and gathers one layer at a time in the forward and backward
passes. The parameters stay the model's own (`DTensor`s with their full shapes and names), so the
optimizer's decay / no-decay groups and the state dict keys are the same as without sharding.

Why not Ray's `prepare_model(parallel_strategy="fsdp")`: it wraps the whole model as one FSDP1 unit
(every parameter gathered at once: no memory saved) with flat parameters (`use_orig_params=False`:
every parameter is 1-d, so every one landed in the no-decay group), only with CUDA, and not at all
with one worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class ShardingError(ValueError):
    """FSDP asked for where it cannot shard (one worker, a model without layers to wrap)."""


def layer_classes(model: torch.nn.Module) -> tuple[type[torch.nn.Module], ...]:
    """The classes of the model's transformer layers: those `transformers` names in the model's
    `_no_split_modules` whose instances are items of a `ModuleList` (the stack of repeated layers).

    Blocks that are not in a layer stack (BERT's `BertEmbeddings`) stay in the root unit: they hold
    the input embedding, which the output head shares when the embeddings are tied, and a parameter
    must live in one unit only.
    """
    import torch

    names = set(getattr(model, "_no_split_modules", None) or ())
    stacked: dict[str, type[torch.nn.Module]] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):
            for item in module:
                if type(item).__name__ in names:
                    stacked[type(item).__name__] = type(item)
    if not stacked:
        raise ShardingError(
            f"strategy 'fsdp': {type(model).__name__} has no transformer layers to shard one by one "
            f"(no ModuleList item is one of its _no_split_modules {sorted(names)}); "
            "wrapping it as one unit would gather every parameter at once and save no memory: use 'ddp'"
        )
    return tuple(stacked[name] for name in sorted(stacked))


def shard_model(model: torch.nn.Module, device: torch.device, world_size: int) -> torch.nn.Module:
    """`model` (already on `device`) sharded over the default process group's `world_size` ranks:
    `fully_shard` on every transformer layer, bottom up, then on the root. A collective: every rank
    calls it with the same model. The model stays the same object (its class becomes an FSDP one)."""
    if world_size < 2:
        raise ShardingError(
            f"strategy 'fsdp' with {world_size} worker: nothing to shard the model across "
            "(resources.workers must be 2 or more; use strategy 'ddp' for one worker)"
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    wrap = layer_classes(model)
    mesh = init_device_mesh(device.type, (world_size,))
    for module in list(model.modules()):
        if isinstance(module, wrap):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP shards the model's parameters (then state dicts and evaluations are collectives)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)

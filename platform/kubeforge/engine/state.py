"""Checkpoints: what resuming a run needs (model, optimizer, schedule, step, every rank's RNG state),
how a worker restores it, and how the driver finds the newest complete one on disk."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kubeforge.engine.session import Session, checkpoint_dir
from kubeforge.engine.steps import is_fsdp, unwrap

STATE_FILE = "state.pt"
META_FILE = "meta.json"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
"""Ray Train's record of a run's checkpoints, next to them in the run's storage folder."""


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict | None]:
    """Unsharded model (and optimizer) state on CPU. A collective under FSDP: every rank must call it,
    and only rank 0 gets the gathered state (the others get empty dicts, which they do not write).

    The model state has the same keys and full shapes with and without FSDP, so a checkpoint resumes
    on any number of workers, with either strategy, and the final model folder is built from it the
    same way. The optimizer state is keyed by parameter name under FSDP and by position without it;
    `load_state` takes either.
    """
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(model, options=options)
        optim_state = get_optimizer_state_dict(model, optimizer, options=options) if optimizer else None
        return model_state, optim_state
    model_state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    return model_state, optimizer.state_dict() if optimizer else None


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_state(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: int,
    rank: int,
    extra: Mapping[str, Any],
    trainable_only: bool = False,
) -> None:
    """Write what resuming needs. Rank 0 writes the model, optimizer and scheduler state (replicated
    under DDP, gathered from every rank's shard under FSDP: a collective, so every rank calls this);
    every rank writes its own RNG state, since dropout and MLM masking draw different numbers per rank.
    Ray Train merges the workers' directories into one checkpoint.

    `trainable_only` keeps just the parameters that train (adapters): the frozen base weights are
    reloaded from the base model on resume, so checkpoints stay the adapter's size."""
    model_state, optim_state = full_state(model, optimizer)
    if trainable_only:
        trainable = {name for name, p in unwrap(model).named_parameters() if p.requires_grad}
        model_state = {k: v for k, v in model_state.items() if k in trainable}
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(_rng_state(), directory / f"rng_rank{rank}.pt")
    if rank == 0:
        torch.save(
            {"model": model_state, "optimizer": optim_state, "scheduler": scheduler.state_dict(), "step": step,
             **extra},
            directory / STATE_FILE,
        )
        (directory / META_FILE).write_text(json.dumps({"step": step, **extra}))


def load_state(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rank: int,
    trainable_only: bool = False,
) -> dict[str, Any]:
    """Restore what `save_state` wrote; returns the saved step and extras."""
    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        # Every rank holds the full state and keeps its own shard of it.
        options = StateDictOptions(full_state_dict=True, strict=not trainable_only)
        set_model_state_dict(model, state["model"], options=options)
        set_optimizer_state_dict(model, optimizer, _optimizer_by_name(state["optimizer"], model, optimizer),
                                 options=options)
    else:
        # With trainable_only the frozen weights are missing from the state on purpose; a key the
        # model does not have is still an error.
        unexpected = unwrap(model).load_state_dict(state["model"], strict=not trainable_only).unexpected_keys
        if unexpected:
            raise RuntimeError(f"checkpoint {directory} holds parameters the model lacks: {unexpected[:5]}")
        # It matches the saved parameters to the optimizer's by their position in the groups, so a
        # state keyed by name (saved under FSDP) loads as well: an FSDP run resumes on one worker.
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng_file = directory / f"rng_rank{rank}.pt"
    # A run resumed with more workers than it saved has no RNG state for the new ranks; they
    # continue from a seed derived from the step instead, which keeps the run reproducible.
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    else:
        seed_everything(int(state["step"]) * 1000 + rank)
    return {k: v for k, v in state.items() if k not in ("model", "optimizer", "scheduler")}


def _parameter_order(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters in the order its state dict numbers them."""
    names = {id(p): name for name, p in unwrap(model).named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _optimizer_by_name(saved: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """A position-keyed optimizer state (saved without FSDP) keyed by parameter name, as FSDP loads it:
    a run that ran out of memory under DDP resumes under FSDP."""
    if not any(isinstance(key, int) for group in saved["param_groups"] for key in group["params"]):
        return saved
    order = _parameter_order(model, optimizer)
    return {
        "state": {order[k]: v for k, v in saved["state"].items()},
        "param_groups": [{**g, "params": [order[k] for k in g["params"]]} for g in saved["param_groups"]],
    }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def restore(
    session: Session,
    fallback: str | None,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    trainable_only: bool = False,
) -> dict[str, Any] | None:
    """Load the checkpoint Ray (or Tune) offers, else the on-disk `fallback` folder; None for a fresh
    start. Tells the driver (rank 0's "restored" message) which step the run resumes from."""
    restored: dict[str, Any] | None = None
    with session.restored_checkpoint() as directory:
        if directory is not None:
            restored = load_state(directory, model, optimizer, scheduler, session.rank, trainable_only)
    if restored is None and fallback:
        restored = load_state(Path(fallback), model, optimizer, scheduler, session.rank, trainable_only)
    if restored is not None and session.rank == 0:
        session.push({"event": "restored", "step": int(restored["step"])})
    return restored


def report_checkpoint(
    session: Session,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: int,
    extra: Mapping[str, Any],
    metrics: dict[str, Any],
    trainable_only: bool = False,
) -> None:
    """Save the state to a scratch folder and hand it to Ray as the checkpoint of `step`."""
    with checkpoint_dir() as directory:
        save_state(directory, model, optimizer, scheduler, step, session.rank, extra, trainable_only)
        session.report(metrics, directory, f"checkpoint_{step:08d}")


def latest_checkpoint(experiment_dir: Path) -> tuple[Path, int] | None:
    """The newest checkpoint on disk that holds a complete state (rank 0's state and meta files)."""
    best: tuple[Path, int] | None = None
    for meta in experiment_dir.glob(f"checkpoint_*/{META_FILE}"):
        if not (meta.parent / STATE_FILE).is_file():
            continue
        try:
            step = int(json.loads(meta.read_text())["step"])
        except (ValueError, KeyError, OSError):
            continue  # cut off while being written: an older checkpoint serves
        if best is None or step > best[1]:
            best = (meta.parent, step)
    return best


def repair_snapshot(experiment_dir: Path, log: Callable[[str], None]) -> None:
    """Ray Train fails on a snapshot cut off mid-write; without it the fallback checkpoint is used."""
    snapshot = experiment_dir / SNAPSHOT_FILE
    if not snapshot.is_file():
        return
    try:
        json.loads(snapshot.read_text())
    except ValueError:
        log(f"{snapshot} is unreadable (interrupted while written); resuming from the files on disk")
        snapshot.unlink()

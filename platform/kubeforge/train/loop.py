"""The training function every Ray Train worker runs, and the pieces it is made of.

Only the pretraining stage imports this module, so torch is imported at the top. The helpers
(data split, MLM masking, checkpoint state) work without Ray or a process group, which is how the
unit tests exercise them.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kubeforge.spec.pretrain import PretrainSpec, TrainSettings
from kubeforge.train.model import build_model, count_parameters
from kubeforge.train.schedule import build_scheduler
from kubeforge.train.session import RayTrainSession, Session, TuneSession, checkpoint_dir

STATE_FILE = "state.pt"
META_FILE = "meta.json"
MODEL_SUBDIR = "model"

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


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The `transformers` model inside a DistributedDataParallel wrapper."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def _is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(model, FullyShardedDataParallel)


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict | None]:
    """Unsharded model (and optimizer) state on CPU. A collective under FSDP: every rank must call it."""
    if _is_fsdp(model):
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
    """Write what resuming needs. Rank 0 writes the (replicated) model, optimizer and scheduler state;
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
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, state["model"], options=options)
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
    else:
        # With trainable_only the frozen weights are missing from the state on purpose; a key the
        # model does not have is still an error.
        unexpected = unwrap(model).load_state_dict(state["model"], strict=not trainable_only).unexpected_keys
        if unexpected:
            raise RuntimeError(f"checkpoint {directory} holds parameters the model lacks: {unexpected[:5]}")
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(model: torch.nn.Module, spec: PretrainSpec | TrainSettings) -> torch.optim.AdamW:
    """AdamW without weight decay on biases, norms and embeddings' 1-d parameters (standard practice:
    decaying them towards zero only hurts). Frozen parameters (a PEFT model's base) are left out."""
    train = spec if isinstance(spec, TrainSettings) else spec.train
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train.lr,
        betas=train.betas,
    )


def _all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return [float(v) for v in tensor.cpu()]


def evaluate(
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
    with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
        for rows in batches:
            batch = batcher(rows, device, generator)
            if batch["count"] == 0:
                continue
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            total += float(out.loss) * batch["count"]
            count += batch["count"]
    model.train()
    total, count_sum = _all_reduce_sum([total, count], device)
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
    gradients accumulate locally and are averaged across ranks once per optimizer step.
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
        if _is_fsdp(model):
            model.clip_grad_norm_(grad_clip)  # type: ignore[operator]
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return sum(losses) / len(losses)


def restore(
    session: Session,
    config: Mapping[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    trainable_only: bool = False,
) -> dict[str, Any] | None:
    """Load the checkpoint Ray (or Tune) offers, else the stage's on-disk fallback; None for a fresh
    start. Tells the driver (rank 0's "restored" message) which step the run resumes from."""
    restored: dict[str, Any] | None = None
    with session.restored_checkpoint() as directory:
        if directory is not None:
            restored = load_state(directory, model, optimizer, scheduler, session.rank, trainable_only)
    if restored is None and config.get("fallback_checkpoint"):
        restored = load_state(
            Path(config["fallback_checkpoint"]), model, optimizer, scheduler, session.rank, trainable_only
        )
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


def make_session(config: Mapping[str, Any], use_gpu: bool) -> Session:
    """`config["session"] == "tune"` inside a Tune trial (kubeforge.tune); a Ray Train worker otherwise.
    A `Session` object in `config["session"]` is used as it is (the benchmarks run the loops without Ray)."""
    session = config.get("session")
    if session == "tune":
        return TuneSession(use_gpu)
    if session is not None and not isinstance(session, str):
        return session
    return RayTrainSession(config.get("hub"))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker (or Tune trial) entry point; `config` is built by `kubeforge.train.stage`."""
    spec = PretrainSpec.model_validate(config["spec"])
    session = make_session(config, spec.resources.use_gpu)
    rank, world_size = session.rank, session.world_size
    device = session.device
    bf16 = resolve_bf16(spec.train.precision, device)
    special_tokens: dict[str, int | None] = config["special_tokens"]
    vocab_size: int = config["vocab_size"]

    seed_everything(spec.train.seed + rank)
    hf_model = build_model(spec, vocab_size, special_tokens)
    num_parameters = count_parameters(hf_model)
    if spec.train.activation_checkpointing:
        # Non-reentrant checkpointing works with DDP's hooks and with inputs that need no grad.
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf_model.config.use_cache = False
    model = session.prepare_model(hf_model, spec.strategy)
    optimizer = build_optimizer(model, spec)
    scheduler = build_scheduler(optimizer, spec.train)

    start_step, resumed_from, tokens_seen = 0, 0, 0
    initial: dict[str, float] = {}
    restored = restore(session, config, model, optimizer, scheduler)
    if restored is not None:
        start_step = resumed_from = int(restored["step"])
        tokens_seen = int(restored.get("tokens_seen", 0))
        initial = {k: float(restored[k]) for k in ("initial_val_loss", "initial_val_perplexity") if k in restored}

    train_shards = TokenShards(config["train_files"])
    sampler = RankSampler(len(train_shards), rank, world_size, spec.train.seed)
    val_batches = validation_batches(
        TokenShards(config["validation_files"]), rank, world_size, spec.train.batch_size, spec.eval.max_batches
    )
    batcher = Batcher(spec, vocab_size, special_tokens)
    # Per-rank stream for MLM masks; restored RNG state above makes it continue where it stopped.
    mask_generator = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))
    accum = spec.train.grad_accum_steps
    tokens_per_step_rank = spec.train.batch_size * accum * train_shards.seq_len
    peak = peak_flops(torch.cuda.get_device_name(device), bf16) if device.type == "cuda" else None
    eval_seed = spec.train.seed + 7919 * (rank + 1)

    def push_eval(step: int, loss: float, perplexity: float) -> None:
        evaluation = {"step": step, "val_loss": loss, "val_perplexity": perplexity}
        if rank == 0:
            session.push({"event": "eval", **evaluation})
        session.report_eval(evaluation)

    if not initial:
        loss, perplexity = evaluate(model, val_batches, batcher, device, bf16, eval_seed)
        initial = {"initial_val_loss": loss, "initial_val_perplexity": perplexity}
        push_eval(start_step, loss, perplexity)

    last_eval: tuple[int, float, float] | None = None
    train_seconds, train_tokens = 0.0, 0
    step = start_step
    train_loss = float("nan")
    while step < spec.train.max_steps:
        started = time.perf_counter()
        micro_batches = [
            batcher(train_shards.rows(sampler.batch(step * accum + a, spec.train.batch_size)), device, mask_generator)
            for a in range(accum)
        ]
        lr = scheduler.get_last_lr()[0]
        local_loss = train_step(model, optimizer, scheduler, micro_batches, spec.train.grad_clip, bf16, device)
        # One small all-reduce per step gives the true global training loss (and syncs the timing).
        train_loss = _all_reduce_sum([local_loss], device)[0] / world_size
        elapsed = time.perf_counter() - started
        step += 1
        train_seconds += elapsed
        train_tokens += tokens_per_step_rank
        tokens_seen += tokens_per_step_rank * world_size
        tokens_per_second = tokens_per_step_rank / elapsed
        message: dict[str, Any] = {
            "event": "step", "rank": rank, "step": step, "train_loss": train_loss, "lr": lr,
            "tokens_per_second": tokens_per_second, "tokens": tokens_seen,
        }
        if peak is not None:
            message["mfu"] = 6 * num_parameters * tokens_per_second / peak
        session.push(message)

        final = step == spec.train.max_steps
        if step % spec.eval.every_steps == 0 or final:
            loss, perplexity = evaluate(model, val_batches, batcher, device, bf16, eval_seed)
            last_eval = (step, loss, perplexity)
            push_eval(step, loss, perplexity)
        if step % spec.checkpoint.every_steps == 0 and not final:
            report_checkpoint(
                session, model, optimizer, scheduler, step, {"tokens_seen": tokens_seen, **initial},
                {"step": step, "train_loss": train_loss, "resumed_from_step": resumed_from},
            )

    if last_eval is None:
        # Nothing left to train (a rerun after the last checkpoint was the final one): score it anyway.
        loss, perplexity = evaluate(model, val_batches, batcher, device, bf16, eval_seed)
        last_eval = (step, loss, perplexity)
    # Aggregate throughput: the sum of every worker's own average over the steps it trained.
    own_rate = train_tokens / train_seconds if train_seconds else 0.0
    total_rate = _all_reduce_sum([own_rate], device)[0]
    _, val_loss, val_perplexity = last_eval
    metrics = {
        "step": step, "train_loss": train_loss, "val_loss": val_loss, "val_perplexity": val_perplexity,
        "tokens_per_second": total_rate, "tokens_seen": tokens_seen, "resumed_from_step": resumed_from,
        "num_parameters": num_parameters, **initial,
    }
    extra = {"tokens_seen": tokens_seen, **initial}
    with checkpoint_dir() as directory:
        save_state(directory, model, optimizer, scheduler, step, rank, extra)
        if rank == 0:
            _save_pretrained(spec, config, directory / MODEL_SUBDIR, model)
        # A unique name: a rerun of a finished run reports its final checkpoint once more.
        session.report(metrics, directory, f"checkpoint_{step:08d}_final_{time.strftime('%Y%m%d-%H%M%S')}")


def _save_pretrained(spec: PretrainSpec, config: Mapping[str, Any], target: Path, model: torch.nn.Module) -> None:
    """A plain Hugging Face model directory built from the final, unwrapped weights (rank 0 only).

    Under FSDP the full state dict was already gathered by `save_state`'s collective; rebuilding a
    CPU model from it keeps this path the same for DDP, FSDP and single-worker runs.
    """
    state = torch.load(target.parent / STATE_FILE, map_location="cpu", weights_only=False)["model"]
    fresh = build_model(spec, config["vocab_size"], config["special_tokens"])
    fresh.load_state_dict(state)
    fresh.config.use_cache = True
    fresh.save_pretrained(str(target), safe_serialization=True)

"""`run(spec, ctx)`: pretrain a model from scratch on the data stage's token shards with Ray Train.

The workers run `kubeforge.pretrain.recipe.PretrainRecipe`; `kubeforge.engine.fit` runs them and
says how a rerun resumes from the last checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from kubeforge.context import StageContext
from kubeforge.errors import StageError
from kubeforge.pretrain.config import PretrainLoop
from kubeforge.spec.pretrain import PretrainSpec
from kubeforge.stages.data import DATA, DataResult
from kubeforge.stages.pretrain import PRETRAIN, PretrainResult

STAGE = PRETRAIN.name


def _rows(files: list[Path]) -> int:
    return sum(int(np.load(str(f), mmap_mode="r").shape[0]) for f in files)


def _shard_files(data_dir: Path, result: DataResult, split: str) -> list[Path]:
    files = [data_dir / p for p in result.shards.get(split, [])]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise StageError(STAGE, f"the data stage's {split} shard {missing[0]} does not exist")
    return files


def loop_config(spec: PretrainSpec, ctx: StageContext) -> PretrainLoop:
    """What the recipe needs besides the session: the spec and the data stage's shards.

    The tune stage builds its trials' configs with this too (with a trial's spec and no checkpoint).
    """
    data = ctx.require(DATA, "needs the output of the data stage (spec.data)")
    result = data.result
    train_files = _shard_files(data.directory, result, "train")
    validation_files = _shard_files(data.directory, result, "validation")
    if not train_files or _rows(train_files) == 0:
        raise StageError(STAGE, "the data stage produced no training sequences")
    if not validation_files or _rows(validation_files) == 0:
        raise StageError(STAGE, "the data stage produced no validation sequences, which pretraining evaluates on")
    seq_len = result.seq_len
    if seq_len > spec.model.max_position_embeddings:
        raise StageError(
            STAGE,
            f"spec.pretrain.model.max_position_embeddings: {spec.model.max_position_embeddings} is shorter than "
            f"the data stage's sequences ({seq_len} tokens)",
        )
    return PretrainLoop(
        spec=spec,
        train_files=[str(f.resolve()) for f in train_files],
        validation_files=[str(f.resolve()) for f in validation_files],
        vocab_size=result.vocab_size,
        special_tokens=dict(result.special_tokens),
    )


def check_strategy(spec: PretrainSpec, config: PretrainLoop) -> None:
    """FSDP shards the model one transformer layer at a time: refuse a model without layers to shard
    before any worker starts (in a worker the error would only be retried `max_failures` times)."""
    if spec.strategy != "fsdp":
        return
    import torch

    from kubeforge.engine.fsdp import ShardingError, layer_classes
    from kubeforge.engine.model import build_model

    with torch.device("meta"):  # the architecture without its weights
        model = build_model(spec, config.vocab_size, config.special_tokens)
    try:
        layer_classes(model)
    except ShardingError as exc:
        raise StageError(STAGE, f"spec.pretrain.strategy: {exc}") from None


def run(spec: PretrainSpec, ctx: StageContext) -> PretrainResult:
    import ray

    from kubeforge.engine.fit import check_resources, fit_with_progress
    from kubeforge.pretrain.recipe import MODEL_SUBDIR, PretrainRecipe

    config = loop_config(spec, ctx)
    check_strategy(spec, config)
    data = ctx.require(DATA, "needs the output of the data stage (spec.data)")

    if not ray.is_initialized():
        # The executors normally start or join Ray; a direct call of the stage gets a local runtime.
        ray.init()
    check_resources(spec, ray.cluster_resources(), STAGE)
    fit, poller = fit_with_progress(PretrainRecipe, config, spec, ctx, f"{STAGE}: training")

    model_dir = ctx.out_dir / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)  # left by an attempt interrupted while copying
    with fit.checkpoint.as_directory() as directory:
        shutil.copytree(Path(directory) / MODEL_SUBDIR, model_dir)
    tokenizer_dir = data.directory / data.result.tokenizer_dir
    for item in tokenizer_dir.iterdir():
        if item.is_file():
            shutil.copy2(item, model_dir / item.name)

    final: dict[str, Any] = dict(fit.metrics or {})
    summary = PretrainResult(
        model_dir="model",
        objective=spec.objective,
        final_step=int(final["step"]),
        initial_val_loss=float(final["initial_val_loss"]),
        initial_val_perplexity=float(final["initial_val_perplexity"]),
        val_loss=float(final["val_loss"]),
        val_perplexity=float(final["val_perplexity"]),
        train_loss=float(final["train_loss"]),
        tokens_per_second=float(final["tokens_per_second"]),
        tokens_seen=int(final["tokens_seen"]),
        resumed_from_step=int(final["resumed_from_step"]),
        restored_from_steps=poller.restored_steps,
        num_parameters=int(final["num_parameters"]),
        seq_len=data.result.seq_len,
        workers=spec.resources.workers,
    )
    ctx.tracker.log_metrics(
        {
            "final_val_loss": summary.val_loss,
            "final_val_perplexity": summary.val_perplexity,
            "initial_val_perplexity": summary.initial_val_perplexity,
            "final_tokens_per_second": summary.tokens_per_second,
            "num_parameters": summary.num_parameters,
        },
        step=summary.final_step,
    )
    ctx.tracker.log_artifact(model_dir, "model")
    return summary

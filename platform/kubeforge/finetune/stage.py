"""`run(spec, ctx)`: fine-tune a trained model on a task with Ray Train (SFT, DPO or distillation).

The workers run `kubeforge.finetune.recipe.FinetuneRecipe` through `kubeforge.engine.fit`, as
pretraining does: a rerun in the folder the executor hands back after an interruption continues from
the last checkpoint, worker failures are recovered by Ray Train (`max_failures`), progress reaches the
progress bar, MLflow and Prometheus (stage label `finetune`).

Outputs in the stage folder:

* `qat/` (with `qat`): the quantization-aware-trained model converted by torchao, a Hugging Face
  folder the transformers engine loads (`merged/` then holds the same weights unrounded).
* `task/`: the task's train and test splits (`train.jsonl`, `test.jsonl`, `task.json`). Training
  holds out part of the train split for its evaluations; `test.jsonl` is untouched, for `evaluate`.
* `adapter/` (lora, qlora, prefix): the peft adapter and the tokenizer.
* `merged/` (full, lora, qlora, distill): a plain Hugging Face model folder with the base's config
  (for distill: the student) and the tokenizer with the chat template; it loads in `transformers`
  and vLLM. Prefix tuning has none: its prefixes are extra attention inputs in every layer, not a
  change of weights, so they cannot be merged; `kubeforge.engine.model.load_for_inference`
  loads base + adapter.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

from kubeforge.context import StageContext
from kubeforge.errors import StageError
from kubeforge.finetune.config import FinetuneLoop
from kubeforge.spec.finetune import FinetuneSpec
from kubeforge.stages.data import DATA
from kubeforge.stages.finetune import EVAL_METRICS, FINETUNE, FinetuneResult
from kubeforge.stages.pretrain import PRETRAIN

STAGE = FINETUNE.name
TASK_SUBDIR = "task"
VALIDATION_SHARE = 0.1
"""Share of the task's train split held out for the evaluations during training (at least one batch)."""
MAX_REPLAY_POOL = 4096
"""Replay rows handed to the workers: enough for the run's draws up to this many, then reused."""


def ensure_task(spec: FinetuneSpec, ctx: StageContext) -> Path:
    """`<out_dir>/task/` with the task's splits, written once: a rerun (resuming) trains on the same split."""
    from kubeforge.finetune.task_files import load_task
    from kubeforge.formats.splits import write_splits

    task_dir = ctx.out_dir / TASK_SUBDIR
    if (task_dir / "task.json").is_file():
        return task_dir
    data = ctx.input(DATA)
    if data is None and spec.task.builtin is not None:
        raise StageError(STAGE, f"task '{spec.task.builtin}' is built from the data stage's corpus: add spec.data")
    splits = load_task(spec, ctx.base_dir, data)  # type: ignore[arg-type]  # a JSONL task needs no data stage
    # Written next to its final place and renamed, so that a half-written folder is never taken as done.
    with tempfile.TemporaryDirectory(dir=ctx.out_dir, prefix=".task-") as tmp:
        write_splits(splits, Path(tmp) / TASK_SUBDIR)
        shutil.rmtree(task_dir, ignore_errors=True)
        (Path(tmp) / TASK_SUBDIR).rename(task_dir)
    return task_dir


def _corpus(ctx: StageContext, base_model: Path, field: str, use: str, off: str) -> Any:
    """The data stage's output, checked to share the base model's tokenizer (its rows are token ids)."""
    from transformers import AutoTokenizer

    data = ctx.require(
        DATA, f"spec.finetune.{field}: {use} the data stage's corpus and this pipeline has no data stage; "
        f"add spec.data or {off}",
    )
    corpus_vocab = AutoTokenizer.from_pretrained(str(data.directory / data.result.tokenizer_dir)).get_vocab()
    if corpus_vocab != AutoTokenizer.from_pretrained(str(base_model)).get_vocab():
        raise StageError(
            STAGE, f"spec.finetune.{field}: the data stage's tokenizer is not the base model's, so its "
            f"token rows mean nothing to the model; {off} (or fine-tune the pretrain stage's model)",
        )
    return data


def _ewc_rows(spec: FinetuneSpec, ctx: StageContext, base_model: Path) -> Any:
    """Pretraining rows the Fisher information is estimated on (numpy), or None without EWC."""
    if spec.ewc is None:
        return None
    from kubeforge.finetune.replay import replay_rows

    data = _corpus(ctx, base_model, "ewc", "EWC estimates the Fisher information on", "remove ewc")
    # Another stream than replay's draws (seed + 1): the Fisher rows need not be the replayed ones.
    return replay_rows(data, spec.ewc.samples, spec.task.seed + 1)


def _replay_pool(spec: FinetuneSpec, ctx: StageContext, base_model: Path) -> Any:
    """Pretraining rows for replay (numpy), or None when replay is off."""
    if spec.replay_fraction == 0:
        return None
    from kubeforge.finetune.replay import replay_rows

    data = _corpus(ctx, base_model, "replay_fraction", "replay draws from", "set replay_fraction: 0")
    res = spec.resources
    rows_per_run = spec.train.max_steps * spec.train.grad_accum_steps * spec.train.batch_size * res.workers
    expected = math.ceil(rows_per_run * spec.replay_fraction * 1.5)  # draws vary around their mean
    return replay_rows(data, min(MAX_REPLAY_POOL, max(expected, spec.train.batch_size)), spec.task.seed)


def loop_config(spec: FinetuneSpec, ctx: StageContext) -> FinetuneLoop:
    """What the recipe needs besides the session and the hub.

    The tune stage calls this with a trial's spec (and its own context: the task splits are then
    written under the tune stage's folder) and runs the recipe as a trial.
    """
    from transformers import AutoConfig, AutoTokenizer

    from kubeforge.finetune.encoding import encode_many
    from kubeforge.finetune.methods import preflight, resolve_base_model, resolve_student_path
    from kubeforge.formats.splits import read_split

    base_model = resolve_base_model(spec, ctx.base_dir, ctx.input(PRETRAIN))
    student_path = resolve_student_path(spec, ctx.base_dir)
    preflight(spec, base_model, student_path)
    positions = int(AutoConfig.from_pretrained(str(base_model)).max_position_embeddings)
    prefix_tokens = spec.prefix_settings.num_virtual_tokens if spec.method == "prefix" else 0
    if spec.max_length + prefix_tokens > positions:
        extra = f" plus {prefix_tokens} prefix tokens" if prefix_tokens else ""
        raise StageError(
            STAGE, f"spec.finetune.max_length: {spec.max_length}{extra} exceeds the base model's "
            f"{positions} positions; lower max_length",
        )
    student = spec.distill.student if spec.distill is not None else None
    if student is not None and spec.max_length > student.max_position_embeddings:
        raise StageError(
            STAGE, f"spec.finetune.distill.student.max_position_embeddings: {student.max_position_embeddings} "
            f"is shorter than max_length ({spec.max_length})",
        )

    task_dir = ensure_task(spec, ctx)
    kind: Literal["instruction", "preference"] = "preference" if spec.objective == "dpo" else "instruction"
    tokenizer = AutoTokenizer.from_pretrained(str(base_model))
    encoded, dropped = encode_many(read_split(task_dir, "train"), tokenizer, spec.max_length, kind)
    batch_size = spec.train.batch_size
    held_out = max(batch_size, math.ceil(VALIDATION_SHARE * len(encoded)))
    if len(encoded) - held_out < batch_size:
        raise StageError(
            STAGE, f"the task has {len(encoded)} usable training examples ({dropped} dropped: the prompt alone "
            f"fills max_length); training needs at least 2 x train.batch_size ({2 * batch_size}): one batch to "
            "train on and one held out to evaluate; add examples, raise spec.finetune.max_length or lower "
            "train.batch_size",
        )
    # A fixed shuffle before the cut: the held-out examples are a sample of the task, not its first lines.
    import numpy as np

    order = np.random.default_rng([spec.task.seed, 1]).permutation(len(encoded))
    validation = [encoded[i] for i in order[:held_out]]
    train = [encoded[i] for i in order[held_out:]]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    replay = _replay_pool(spec, ctx, base_model)
    ewc_rows = _ewc_rows(spec, ctx, base_model)
    return FinetuneLoop(
        spec=spec,
        base_model_dir=str(base_model),
        student_path=str(student_path) if student_path else None,
        task_dir=str(task_dir.resolve()),
        train_examples=train,
        validation_examples=validation,
        dropped_examples=dropped,
        num_test_examples=len(read_split(task_dir, "test")),
        pad_id=int(pad_id),
        replay_rows=replay,
        ewc_rows=ewc_rows,
    )


def _copy_outputs(checkpoint: Path, out_dir: Path) -> tuple[str | None, str | None, str | None]:
    from kubeforge.finetune.recipe import ADAPTER_SUBDIR, MERGED_SUBDIR, QAT_SUBDIR

    found: list[str | None] = []
    for name in (MERGED_SUBDIR, ADAPTER_SUBDIR, QAT_SUBDIR):
        target = out_dir / name
        if target.exists():
            shutil.rmtree(target)  # left by an attempt interrupted while copying
        if (checkpoint / name).is_dir():
            shutil.copytree(checkpoint / name, target)
            found.append(name)
        else:
            found.append(None)
    return found[0], found[1], found[2]


def run(spec: FinetuneSpec, ctx: StageContext) -> FinetuneResult:
    import ray

    from kubeforge.engine.fit import check_resources, fit_with_progress, run_figures
    from kubeforge.finetune.methods import qlora_without_cuda
    from kubeforge.finetune.recipe import FinetuneRecipe

    if not ray.is_initialized():
        ray.init()  # the executors start or join Ray; a direct call of the stage gets a local runtime
    cluster = ray.cluster_resources()
    if spec.method == "qlora" and not cluster.get("GPU", 0):
        raise qlora_without_cuda("the Ray cluster")  # before check_resources: the more useful message
    check_resources(spec, cluster, STAGE)
    config = loop_config(spec, ctx)
    fit, poller = fit_with_progress(FinetuneRecipe, config, spec, ctx, f"{STAGE}: {spec.objective} ({spec.method})")
    with fit.checkpoint.as_directory() as directory:
        model_dir, adapter_dir, qat_dir = _copy_outputs(Path(directory), ctx.out_dir)

    final: dict[str, Any] = dict(fit.metrics or {})
    trainable, total = int(final["trainable_parameters"]), int(final["total_parameters"])
    evaluated: dict[str, Any] = {name: float(final[name]) for name in EVAL_METRICS[spec.objective]}
    initial: dict[str, Any] = {name: float(value) for name, value in final.items() if name.startswith("initial_")}
    summary = FinetuneResult(
        model_dir=model_dir,
        adapter_dir=adapter_dir,
        qat_dir=qat_dir,
        qat_scheme=spec.qat.scheme if spec.qat is not None else None,
        task_dir=TASK_SUBDIR,
        base_model_dir=config.base_model_dir,
        objective=spec.objective,
        method=spec.method,
        trainable_parameters=trainable,
        total_parameters=total,
        trainable_share=trainable / total,
        **run_figures(final, poller),
        num_train_examples=len(config.train_examples),
        num_validation_examples=len(config.validation_examples),
        num_test_examples=config.num_test_examples,
        dropped_examples=config.dropped_examples,
        workers=spec.resources.workers,
        merge_note=(
            "prefix tuning cannot be merged into the weights: load base_model_dir + adapter_dir"
            if spec.method == "prefix" else None
        ),
        **evaluated,
        **initial,
    )
    ctx.tracker.log_metrics(
        {
            **{f"final_{name}": value for name, value in evaluated.items()},
            "final_tokens_per_second": summary.tokens_per_second,
            "trainable_parameters": trainable,
            "total_parameters": total,
            "trainable_share": summary.trainable_share,
            "dropped_examples": summary.dropped_examples,
        },
        step=summary.final_step,
    )
    for name in (model_dir, adapter_dir, qat_dir, TASK_SUBDIR):
        if name is not None:
            ctx.tracker.log_artifact(ctx.out_dir / name, name)
    return summary

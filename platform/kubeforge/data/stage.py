"""The data stage: the document steps (`kubeforge.data.steps`: read -> normalize -> exact_dedup ->
fuzzy_dedup -> quality -> perplexity -> redact), then tokenizer -> pack.

Each finished document step is saved under the stage folder (`kubeforge.data.saved_steps`): a
killed stage resumes after the last step it finished. Ray must already be initialised by the caller.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kubeforge import faults
from kubeforge.context import StageContext
from kubeforge.data.card import StepCounts, build_card, write_card
from kubeforge.data.saved_steps import SavedSteps
from kubeforge.data.steps import DOCUMENT_STEPS, passthrough
from kubeforge.errors import StageError
from kubeforge.spec.data import DataSpec
from kubeforge.stages.data import DataResult

STEPS = (*(name for name, _ in DOCUMENT_STEPS), "tokenizer", "pack")
_SAMPLE_SIZE = 20
_HINTS = {
    "normalize": "",
    "exact_dedup": "",
    "fuzzy_dedup": " (raise threshold)",
    "quality": " (relax or null its rules)",
    "perplexity": " (raise max_perplexity)",
}


@contextmanager
def _quiet_ray_data() -> Iterator[None]:
    """Our own progress bars replace Ray Data's, which would interleave with them on the terminal."""
    from ray.data import DataContext

    context = DataContext.get_current()
    before = context.enable_progress_bars
    context.enable_progress_bars = False
    try:
        yield
    finally:
        context.enable_progress_bars = before


class _Funnel:
    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.rows: list[StepCounts] = []

    def record(self, row: StepCounts, resumed: bool = False) -> None:
        from kubeforge.metrics import DATA_CHARACTERS, DATA_DOCUMENTS

        self.rows.append(row)
        pipeline = self.ctx.pipeline_name
        DATA_DOCUMENTS.labels(pipeline, row.step, "in").set(row.documents_in)
        DATA_DOCUMENTS.labels(pipeline, row.step, "out").set(row.documents_out)
        DATA_CHARACTERS.labels(pipeline, row.step, "in").set(row.characters_in)
        DATA_CHARACTERS.labels(pipeline, row.step, "out").set(row.characters_out)
        prefix = f"data.{row.step}."
        metrics = {
            prefix + "documents_in": row.documents_in, prefix + "documents_out": row.documents_out,
            prefix + "characters_in": row.characters_in, prefix + "characters_out": row.characters_out,
            prefix + "removed": row.removed, prefix + "changed": row.changed,
        }
        self.ctx.tracker.log_metrics(metrics, step=STEPS.index(row.step))
        state = (" (disabled)" if not row.enabled else "") + (" (done by an earlier attempt)" if resumed else "")
        self.ctx.reporter.log(
            f"data: {row.step}{state}: {row.documents_in:,} -> {row.documents_out:,} documents, "
            f"{row.removed:,} removed, {row.changed:,} changed"
        )
        if row.documents_in > 0 and row.documents_out == 0:
            raise StageError(
                "data",
                f"step '{row.step}' removed every document ({row.documents_in} in); "
                f"loosen spec.data.{row.step}{_HINTS.get(row.step, '')} or disable it",
            )


def _dataset_digest(out_dir: Path, shard_paths: list[str]) -> str:
    digest = hashlib.sha256()
    for relative in sorted(shard_paths):
        digest.update(relative.encode())
        digest.update((out_dir / relative).read_bytes())
    digest.update((out_dir / "tokenizer" / "tokenizer.json").read_bytes())
    return digest.hexdigest()


def run(spec: DataSpec, ctx: StageContext) -> DataResult:
    with _quiet_ray_data():
        return _run(spec, ctx)


def _run(spec: DataSpec, ctx: StageContext) -> DataResult:
    from kubeforge.data import packing, tokenizer

    out = ctx.out_dir
    out.mkdir(parents=True, exist_ok=True)
    # A resumed `.partial` folder may hold shards of an earlier attempt.
    for stale in ("shards", "tokenizer"):
        shutil.rmtree(out / stale, ignore_errors=True)
    ctx.tracker.log_params({"data": spec.model_dump(mode="json")})
    funnel = _Funnel(ctx)
    saved_steps = SavedSteps(out, [name for name, _ in DOCUMENT_STEPS])
    removed_log: list[dict[str, Any]] = []
    frame = None
    for name, step in DOCUMENT_STEPS:
        saved = saved_steps.saved(name)
        if saved is not None:
            funnel.record(saved.counts, resumed=True)
            removed_log.extend(saved.removed)
            continue
        if frame is None and name != "read":
            frame = saved_steps.documents()
        output = step(frame, spec, ctx)
        funnel.record(output.counts)
        saved_steps.save(name, output.counts, output.removed, output.frame if output.counts.enabled else None)
        faults.hold_at(f"data.{name}")
        removed_log.extend(output.removed)
        frame = output.frame
    if frame is None:
        frame = saved_steps.documents()
    near_sample = [entry for entry in removed_log if entry["kind"] == "near"][:_SAMPLE_SIZE]
    with (out / "removed_duplicates.jsonl").open("w", encoding="utf-8") as handle:
        for entry in removed_log:
            handle.write(json.dumps(entry) + "\n")

    # -- split, tokenizer, packing
    frame["split"] = packing.assign_splits(list(frame["id"]), spec.packing)
    train = frame[frame["split"] == "train"]
    training_texts = tokenizer.training_sample(
        list(train["id"]), list(train["text"]), spec.tokenizer.max_training_characters
    )
    with ctx.reporter.task("data: tokenizer", total=None):
        trained = tokenizer.train_tokenizer(training_texts, spec.tokenizer, out / "tokenizer")
    ids = tokenizer.special_token_ids(trained)
    funnel.record(passthrough("tokenizer", frame, enabled=True, details={
        "type": spec.tokenizer.type, "vocab_size": len(trained), "trained_on_documents": len(training_texts),
        "trained_on_characters": sum(map(len, training_texts)),
    }).counts)

    with ctx.reporter.task("data: pack", total=len(frame)) as task:
        packed = packing.pack_splits(list(frame["text"]), list(frame["split"]), trained, ids, spec.packing, out)
        task.update(len(frame))
    funnel.record(passthrough("pack", frame, enabled=True, details={
        "num_sequences": packed["num_sequences"], "num_tokens": packed["num_tokens"],
    }).counts)

    frame[["id", "source", "text", "split"]].to_parquet(out / "documents.parquet", index=False)
    saved_steps.finish()

    shard_paths = [p for split in packing.SPLITS for p in packed["shards"][split]]
    dataset_hash = _dataset_digest(out, shard_paths)
    result = DataResult(
        tokenizer_dir="tokenizer",
        shards=packed["shards"],
        seq_len=spec.packing.seq_len,
        vocab_size=len(trained),
        special_tokens={name: token for name, token in ids.items()},
        num_sequences=packed["num_sequences"],
        num_tokens=packed["num_tokens"],
        num_documents=packed["num_documents"],
        dataset_hash=dataset_hash,
        documents="documents.parquet",
        removed_duplicates="removed_duplicates.jsonl",
        card="card.md",
        funnel=[row.as_dict() for row in funnel.rows],
    )
    outputs = {
        "num_documents": result.num_documents, "num_sequences": result.num_sequences,
        "num_tokens": result.num_tokens, "vocab_size": result.vocab_size, "dataset_hash": result.dataset_hash,
    }
    card = build_card(ctx.pipeline_name, funnel.rows, near_sample, outputs)
    for path in write_card(card, funnel.rows, out):
        ctx.tracker.log_artifact(path, "data")
    ctx.tracker.log_artifact(out / "removed_duplicates.jsonl", "data")
    ctx.tracker.log_artifact(out / "tokenizer", "data/tokenizer")
    ctx.tracker.log_metrics(
        {f"data.num_tokens.{split}": n for split, n in packed["num_tokens"].items()}
        | {f"data.num_sequences.{split}": n for split, n in packed["num_sequences"].items()}
    )
    ctx.tracker.set_tags({"kubeforge.dataset_hash": dataset_hash})
    ctx.tracker.log_dataset(
        name=f"{ctx.pipeline_name}-corpus", digest=dataset_hash, source=str(out), context="training",
        profile={
            "num_documents": packed["num_documents"], "num_sequences": packed["num_sequences"],
            "num_tokens": packed["num_tokens"], "seq_len": spec.packing.seq_len, "vocab_size": len(trained),
        },
    )
    return result

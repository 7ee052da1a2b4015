"""The data stage: the document steps (`kubeforge.data.steps`: read -> normalize -> exact_dedup ->
fuzzy_dedup -> quality -> perplexity -> redact), then tokenizer -> pack.

Each finished document step is saved under the stage folder (`kubeforge.data.saved_steps`): a
killed stage resumes after the last step it finished. Ray must already be initialised by the caller.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from kubeforge import faults
from kubeforge.context import StageContext
from kubeforge.data import tasks
from kubeforge.data.card import StepCounts, build_card, write_card
from kubeforge.data.saved_steps import SavedSteps
from kubeforge.data.step_io import StepInput, passthrough
from kubeforge.data.steps import DOCUMENT_STEPS
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


class _Funnel:
    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.rows: list[StepCounts] = []
        self.since = time.monotonic()

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
        now, started = time.monotonic(), self.since
        self.since = now
        state = (" (disabled)" if not row.enabled else "") + (" (done by an earlier attempt)" if resumed else "")
        self.ctx.reporter.log(
            f"data: {row.step}{state}: {row.documents_in:,} -> {row.documents_out:,} documents, "
            f"{row.removed:,} removed, {row.changed:,} changed" + ("" if resumed else f" in {now - started:.1f} s")
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
    with tasks.counting_work() as work:
        return _run(spec, ctx, work)


def _document_steps(spec: DataSpec, ctx: StageContext, funnel: _Funnel, saved_steps: SavedSteps) -> StepInput:
    """Run (or, on a resumed attempt, skip) the document steps; the documents they kept."""
    documents = characters = 0
    for name, step in DOCUMENT_STEPS:
        saved = saved_steps.saved(name)
        if saved is None:
            parts = saved_steps.parts() if name != "read" else []
            out, work = saved_steps.begin(name)
            output = step(StepInput(parts, documents, characters, out, work), spec, ctx)
            funnel.record(output.counts)
            saved_steps.save(name, output.counts, output.removed)
            faults.hold_at(f"data.{name}")
            counts = output.counts
        else:
            funnel.record(saved.counts, resumed=True)
            counts = saved.counts
        documents, characters = counts.documents_out, counts.characters_out
    return StepInput(saved_steps.parts(), documents, characters, ctx.out_dir / "documents", ctx.out_dir / "work")


def _write_removed(saved_steps: SavedSteps, out: Path) -> list[dict[str, Any]]:
    """All steps' removed duplicates in one file; the first near-duplicates, for the data card."""
    near_sample: list[dict[str, Any]] = []
    with (out / "removed_duplicates.jsonl").open("w", encoding="utf-8") as handle:
        for name, _ in DOCUMENT_STEPS:
            saved = saved_steps.saved(name)
            if saved is None or saved.removed is None:
                continue
            with saved.removed.open(encoding="utf-8") as log:
                for line in log:
                    handle.write(line)
                    if len(near_sample) < _SAMPLE_SIZE and (entry := json.loads(line))["kind"] == "near":
                        near_sample.append(entry)
    return near_sample


def _run(spec: DataSpec, ctx: StageContext, work: dict[str, tasks.NodeWork]) -> DataResult:
    from kubeforge.data import packing, tokenizer

    out = ctx.out_dir
    out.mkdir(parents=True, exist_ok=True)
    # A resumed `.partial` folder may hold the packing of an earlier attempt.
    for stale in ("shards", "tokenizer", "documents", "work"):
        shutil.rmtree(out / stale, ignore_errors=True)
    ctx.tracker.log_params({"data": spec.model_dump(mode="json")})
    funnel = _Funnel(ctx)
    saved_steps = SavedSteps(out, [name for name, _ in DOCUMENT_STEPS])
    kept = _document_steps(spec, ctx, funnel, saved_steps)
    near_sample = _write_removed(saved_steps, out)
    parts = [{"part": str(p)} for p in kept.parts]

    # -- split, tokenizer, packing
    counted = tasks.run(parts, packing.count_splits, {"spec": spec.packing}, ctx, "split", kept.documents,
                        "documents_in")
    per_split: Counter[str] = Counter()
    for counts in counted:
        per_split.update(counts["documents"])
    edges = {name: sorted(tuple(entry) for counts in counted for entry in counts["edges"][name])[:packing.EDGE_SIZE]
             for name in packing.SPLITS}
    moved = {str(idx): split for idx, split in packing.overrides(per_split, edges, spec.packing).items()}
    [fitted] = tasks.run([{}], tokenizer.fit, {
        "parts": [item["part"] for item in parts], "packing": spec.packing, "moved": moved,
        "train_characters": sum(counts["train_characters"] for counts in counted), "spec": spec.tokenizer,
        "out": str(out / "tokenizer"),
    }, ctx, "tokenizer")
    ids = {name: fitted.pop(name) for name in ("bos_id", "eos_id", "pad_id", "mask_id", "unk_id")}
    funnel.record(passthrough("tokenizer", kept.documents, kept.characters, enabled=True,
                              details={"type": spec.tokenizer.type, **fitted}).counts)

    kept.work.mkdir(parents=True)
    tokenized = tasks.run(parts, packing.tokenize_part, {
        "tokenizer_dir": str(out / "tokenizer"), "spec": spec.packing, "moved": moved, "eos_id": ids["eos_id"],
        "documents_out": str(kept.out), "work": str(kept.work),
    }, ctx, "pack", kept.documents, "documents_in")
    shards, writes = packing.plan_shards([Path(item["part"]).stem for item in parts], tokenized, spec.packing)
    per_item = packing.SHARDS_PER_ITEM
    grouped = [{"shards": writes[n : n + per_item]} for n in range(0, len(writes), per_item)]
    shards_written = tasks.run(grouped, packing.write_shards, {
        "work": str(kept.work), "seq_len": spec.packing.seq_len, "pad_id": ids["pad_id"], "out": str(out),
    }, ctx, "pack shards")
    shutil.rmtree(kept.work)
    rows_of = {path: rows for written in shards_written for path, rows in written["rows"].items()}
    num_sequences = {split: sum(rows_of[path] for path in shards[split]) for split in packing.SPLITS}
    num_tokens = {split: sum(part["tokens"][split] for part in tokenized) for split in packing.SPLITS}
    num_documents = {split: sum(part["documents"].get(split, 0) for part in tokenized) for split in packing.SPLITS}
    funnel.record(passthrough("pack", kept.documents, kept.characters, enabled=True, details={
        "num_sequences": num_sequences, "num_tokens": num_tokens,
    }).counts)
    saved_steps.finish()

    dataset_hash = _dataset_digest(out, [path for split in packing.SPLITS for path in shards[split]])
    result = DataResult(
        tokenizer_dir="tokenizer",
        shards=shards,
        seq_len=spec.packing.seq_len,
        vocab_size=fitted["vocab_size"],
        special_tokens=dict(ids),
        num_sequences=num_sequences,
        num_tokens=num_tokens,
        num_documents=num_documents,
        dataset_hash=dataset_hash,
        documents="documents",
        removed_duplicates="removed_duplicates.jsonl",
        card="card.md",
        funnel=[row.as_dict() for row in funnel.rows],
    )
    outputs = {
        "num_documents": result.num_documents, "num_sequences": result.num_sequences,
        "num_tokens": result.num_tokens, "vocab_size": result.vocab_size, "dataset_hash": result.dataset_hash,
    }
    ctx.reporter.log("data: work per node: " + "; ".join(
        f"{node}: {done.items} items, {done.seconds:.1f} s" for node, done in sorted(work.items())
    ))
    card = build_card(ctx.pipeline_name, funnel.rows, near_sample, outputs, work)
    for path in write_card(card, funnel.rows, out):
        ctx.tracker.log_artifact(path, "data")
    ctx.tracker.log_artifact(out / "removed_duplicates.jsonl", "data")
    ctx.tracker.log_artifact(out / "tokenizer", "data/tokenizer")
    ctx.tracker.log_metrics(
        {f"data.num_tokens.{split}": n for split, n in num_tokens.items()}
        | {f"data.num_sequences.{split}": n for split, n in num_sequences.items()}
    )
    ctx.tracker.set_tags({"kubeforge.dataset_hash": dataset_hash})
    ctx.tracker.log_dataset(
        name=f"{ctx.pipeline_name}-corpus", digest=dataset_hash, source=str(out), context="training",
        profile={
            "num_documents": num_documents, "num_sequences": num_sequences,
            "num_tokens": num_tokens, "seq_len": spec.packing.seq_len, "vocab_size": fitted["vocab_size"],
        },
    )
    return result

"""The data stage: read -> normalize -> exact_dedup -> fuzzy_dedup -> quality -> perplexity -> redact
-> tokenizer -> pack.

Per-document work (normalisation, quality rules, perplexity scores, redaction, MinHash signatures)
runs as Ray Data `map_batches` over the cluster; steps that need the whole corpus at once (dedup
clustering, tokenizer training, packing) run in the driver, on arrays small enough to hold there.
Ray must already be initialised by the caller.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kubeforge.context import StageContext
from kubeforge.data.card import StepCounts, build_card, write_card
from kubeforge.errors import StageError
from kubeforge.spec.data import DataSpec, NormalizeStep, QualityStep, RedactStep
from kubeforge.stages.data import DataResult

if TYPE_CHECKING:
    import pandas as pd

    from kubeforge.data.perplexity import CharNgramModel

STEPS = ("read", "normalize", "exact_dedup", "fuzzy_dedup", "quality", "perplexity", "redact", "tokenizer", "pack")
_SAMPLE_SIZE = 20
_HINTS = {
    "normalize": "",
    "exact_dedup": "",
    "fuzzy_dedup": " (raise threshold)",
    "quality": " (relax or null its rules)",
    "perplexity": " (raise max_perplexity)",
}


# ---------------------------------------------------------------------------------------------
# map functions: module-level so that Ray workers import them by name


def _normalize_map(batch: pd.DataFrame, step: NormalizeStep) -> pd.DataFrame:
    from kubeforge.data.normalize import normalize_batch

    texts, changed = normalize_batch(list(batch["text"]), step)
    return batch.assign(text=texts, changed=changed)


def _signature_map(batch: pd.DataFrame, shingle_size: int, num_perm: int, seed: int) -> pd.DataFrame:
    from kubeforge.data.dedup import signatures

    sigs, has_words = signatures(list(batch["text"]), shingle_size, num_perm, seed)
    return batch[["idx"]].assign(signature=list(sigs), has_words=has_words)


def _quality_map(batch: pd.DataFrame, step: QualityStep) -> pd.DataFrame:
    from kubeforge.data.quality import quality_batch

    return batch[["idx"]].assign(reason=quality_batch(list(batch["text"]), step))


def _perplexity_map(batch: pd.DataFrame, model: CharNgramModel) -> pd.DataFrame:
    from kubeforge.data.perplexity import perplexity_batch

    return batch[["idx"]].assign(perplexity=perplexity_batch(list(batch["text"]), model))


def _redact_map(batch: pd.DataFrame, step: RedactStep) -> pd.DataFrame:
    from kubeforge.data.redact import KINDS, redact_text

    texts: list[str] = []
    counts: dict[str, list[int]] = {kind: [] for kind in KINDS}
    for text in batch["text"]:
        redacted, found = redact_text(text, step)
        texts.append(redacted)
        for kind in KINDS:
            counts[kind].append(found[kind])
    return batch.assign(text=texts, **{f"redacted_{kind}": values for kind, values in counts.items()})


# ---------------------------------------------------------------------------------------------
# driver-side plumbing


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


def _ray_map(
    frame: pd.DataFrame, fn: Callable[..., pd.DataFrame], kwargs: dict[str, Any], ctx: StageContext, step: str,
) -> pd.DataFrame:
    """Apply `fn` to `frame` in parallel on Ray, with a progress bar; rows come back in `idx` order."""
    import pandas as pd
    import ray

    blocks = max(1, min(len(frame), 4 * max(1, int(ray.cluster_resources().get("CPU", 1)))))
    bounds = np.linspace(0, len(frame), blocks + 1).astype(int)
    parts = [frame.iloc[bounds[i] : bounds[i + 1]] for i in range(blocks) if bounds[i + 1] > bounds[i]]
    dataset = ray.data.from_pandas(parts).map_batches(fn, fn_kwargs=kwargs, batch_format="pandas", batch_size=None)
    collected = []
    done = 0
    with ctx.reporter.task(f"data: {step}", total=len(frame)) as task:
        for batch in dataset.iter_batches(batch_format="pandas", batch_size=None):
            collected.append(batch)
            done += len(batch)
            task.update(done)
    result = pd.concat(collected, ignore_index=True).sort_values("idx", kind="stable").reset_index(drop=True)
    return result


def _characters(frame: pd.DataFrame) -> int:
    return int(frame["text"].str.len().sum()) if len(frame) else 0


class _Funnel:
    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.rows: list[StepCounts] = []

    def record(self, row: StepCounts) -> None:
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
        state = "" if row.enabled else " (disabled)"
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

    def passthrough(self, step: str, frame: pd.DataFrame, enabled: bool = False) -> None:
        n, chars = len(frame), _characters(frame)
        self.record(StepCounts(step, enabled, n, n, chars, chars))


def _filtered(
    step: str, before: pd.DataFrame, keep: np.ndarray, details: dict[str, Any], funnel: _Funnel
) -> pd.DataFrame:
    after = before[keep].reset_index(drop=True)
    funnel.record(
        StepCounts(step, True, len(before), len(after), _characters(before), _characters(after), details=details)
    )
    return after


def _reference_texts(spec: DataSpec, base_dir: Path) -> Iterator[str]:
    from kubeforge.data.normalize import normalize_text
    from kubeforge.data.sources import read_documents

    for document in read_documents(spec.perplexity.reference, base_dir):
        text = document["text"]
        # The model must see text as the filtered documents look at this point of the pipeline.
        yield normalize_text(text, spec.normalize) if spec.normalize.enabled else text


def _dataset_digest(out_dir: Path, shard_paths: list[str]) -> str:
    digest = hashlib.sha256()
    for relative in sorted(shard_paths):
        digest.update(relative.encode())
        digest.update((out_dir / relative).read_bytes())
    digest.update((out_dir / "tokenizer" / "tokenizer.json").read_bytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# the stage


def run(spec: DataSpec, ctx: StageContext) -> DataResult:
    with _quiet_ray_data():
        return _run(spec, ctx)


def _run(spec: DataSpec, ctx: StageContext) -> DataResult:
    import pandas as pd

    from kubeforge.data import dedup, packing, perplexity, sources, tokenizer

    out = ctx.out_dir
    out.mkdir(parents=True, exist_ok=True)
    # A resumed `.partial` folder may hold shards of an earlier attempt with other settings.
    for stale in ("shards", "tokenizer"):
        shutil.rmtree(out / stale, ignore_errors=True)
    ctx.tracker.log_params({"data": spec.model_dump(mode="json")})
    funnel = _Funnel(ctx)

    with ctx.reporter.task("data: read", total=None) as task:
        documents = sources.read_documents(spec.sources, ctx.base_dir)
        task.update(len(documents), total=len(documents))
    if not documents:
        raise StageError("data", "the sources hold no documents; check spec.data.sources")
    frame = pd.DataFrame(documents, columns=["id", "source", "text"])
    frame.insert(0, "idx", np.arange(len(frame)))
    funnel.passthrough("read", frame, enabled=True)

    # -- normalize
    if spec.normalize.enabled:
        before_chars = _characters(frame)
        frame = _ray_map(frame, _normalize_map, {"step": spec.normalize}, ctx, "normalize")
        changed = int(frame["changed"].sum())
        frame = frame.drop(columns="changed")
        funnel.record(StepCounts("normalize", True, len(frame), len(frame), before_chars, _characters(frame), changed))
    else:
        funnel.passthrough("normalize", frame)

    removed_log: list[dict[str, Any]] = []

    # -- exact dedup
    if spec.exact_dedup.enabled:
        with ctx.reporter.task("data: exact_dedup", total=len(frame)) as task:
            keep, original = dedup.exact_duplicates(list(frame["text"]))
            task.update(len(frame))
        for i in np.flatnonzero(~keep):
            j = original[i]
            removed_log.append({
                "kind": "exact", "id": frame.at[i, "id"], "source": frame.at[i, "source"],
                "duplicate_of": frame.at[j, "id"], "duplicate_of_source": frame.at[j, "source"], "similarity": 1.0,
            })
        frame = _filtered("exact_dedup", frame, keep, {}, funnel)
    else:
        funnel.passthrough("exact_dedup", frame)

    # -- fuzzy dedup
    near_sample: list[dict[str, Any]] = []
    if spec.fuzzy_dedup.enabled:
        fuzzy = spec.fuzzy_dedup
        signed = _ray_map(
            frame, _signature_map,
            {"shingle_size": fuzzy.shingle_size, "num_perm": fuzzy.num_perm, "seed": fuzzy.seed}, ctx, "fuzzy_dedup",
        )
        sigs = np.stack(list(signed["signature"])).astype(np.uint32)
        with ctx.reporter.task("data: fuzzy_dedup clusters", total=None):
            found = dedup.near_duplicates(sigs, signed["has_words"].to_numpy(dtype=bool), fuzzy.threshold)
        for i in np.flatnonzero(~found.keep):
            j = found.kept_of[i]
            entry = {
                "kind": "near", "id": frame.at[i, "id"], "source": frame.at[i, "source"],
                "duplicate_of": frame.at[j, "id"], "duplicate_of_source": frame.at[j, "source"],
                "similarity": round(float(found.similarity[i] or 0.0), 4),
            }
            removed_log.append(entry)
            if len(near_sample) < _SAMPLE_SIZE:
                near_sample.append(entry)
        details: dict[str, Any] = {
            "bands": found.bands, "rows": found.rows, "clusters": len(found.clusters),
            "largest_cluster": max((len(c) for c in found.clusters), default=0),
            "candidate_pairs": found.candidate_pairs, "verified_pairs": found.verified_pairs,
        }
        frame = _filtered("fuzzy_dedup", frame, found.keep, details, funnel)
    else:
        funnel.passthrough("fuzzy_dedup", frame)

    with (out / "removed_duplicates.jsonl").open("w", encoding="utf-8") as handle:
        for entry in removed_log:
            handle.write(json.dumps(entry) + "\n")

    # -- quality
    if spec.quality.enabled:
        judged = _ray_map(frame, _quality_map, {"step": spec.quality}, ctx, "quality")
        # Arrow-backed string columns come back with NA, not None, for documents that passed.
        reasons = [None if pd.isna(r) else str(r) for r in judged["reason"]]
        by_rule = dict(sorted(Counter(r for r in reasons if r is not None).items()))
        keep = np.array([r is None for r in reasons], dtype=bool)
        frame = _filtered("quality", frame, keep, {"removed_by_rule": by_rule}, funnel)
    else:
        funnel.passthrough("quality", frame)

    # -- perplexity
    if spec.perplexity.enabled:
        step = spec.perplexity
        with ctx.reporter.task("data: perplexity reference model", total=None):
            model = perplexity.train(_reference_texts(spec, ctx.base_dir), step.order, step.max_reference_chars)
        scored = _ray_map(frame, _perplexity_map, {"model": model}, ctx, "perplexity")
        scores = scored["perplexity"].to_numpy(dtype=float)
        details = {
            "median_perplexity": float(np.median(scores)) if len(scores) else None,
            "max_perplexity": step.max_perplexity, "reference_vocabulary": model.vocabulary_size,
        }
        frame = _filtered("perplexity", frame, scores <= step.max_perplexity, details, funnel)
    else:
        funnel.passthrough("perplexity", frame)

    # -- redact
    if spec.redact.enabled:
        from kubeforge.data.redact import KINDS

        before_chars = _characters(frame)
        redacted = _ray_map(frame, _redact_map, {"step": spec.redact}, ctx, "redact")
        columns = [f"redacted_{kind}" for kind in KINDS]
        per_doc = redacted[columns].to_numpy(dtype=np.int64)
        totals = {kind: int(per_doc[:, k].sum()) for k, kind in enumerate(KINDS)}
        frame = redacted.drop(columns=columns)
        funnel.record(StepCounts(
            "redact", True, len(frame), len(frame), before_chars, _characters(frame),
            int((per_doc.sum(axis=1) > 0).sum()), {"replacements": totals},
        ))
    else:
        funnel.passthrough("redact", frame)

    # -- split, tokenizer, packing
    frame["split"] = packing.assign_splits(list(frame["id"]), spec.packing)
    training_texts = list(frame.loc[frame["split"] == "train", "text"])
    with ctx.reporter.task("data: tokenizer", total=None):
        trained = tokenizer.train_tokenizer(training_texts, spec.tokenizer, out / "tokenizer")
    ids = tokenizer.special_token_ids(trained)
    funnel.passthrough("tokenizer", frame, enabled=True)
    funnel.rows[-1].details = {
        "type": spec.tokenizer.type, "vocab_size": len(trained), "trained_on_documents": len(training_texts),
    }

    with ctx.reporter.task("data: pack", total=len(frame)) as task:
        packed = packing.pack_splits(list(frame["text"]), list(frame["split"]), trained, ids, spec.packing, out)
        task.update(len(frame))
    funnel.passthrough("pack", frame, enabled=True)
    funnel.rows[-1].details = {"num_sequences": packed["num_sequences"], "num_tokens": packed["num_tokens"]}

    frame[["id", "source", "text", "split"]].to_parquet(out / "documents.parquet", index=False)

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

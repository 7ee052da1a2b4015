"""The data stage's document steps: read -> normalize -> exact_dedup -> fuzzy_dedup -> quality ->
perplexity -> redact.

Each step takes the documents the step before kept (a frame of `idx`, `id`, `source`, `text`) and
returns what it keeps, its counts for the funnel, and the duplicates it removed. Per-document work
(normalisation, quality rules, perplexity scores, redaction, MinHash signatures and shingles) runs
as Ray Data `map_batches` over the cluster; dedup clustering runs in the driver, on arrays small
enough to hold there. Ray must already be initialised by the caller.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kubeforge.context import StageContext
from kubeforge.data.card import StepCounts
from kubeforge.errors import StageError
from kubeforge.spec.data import DataSpec, NormalizeStep, QualityStep, RedactStep

if TYPE_CHECKING:
    import pandas as pd

    from kubeforge.data.perplexity import CharNgramModel


@dataclass
class StepOutput:
    frame: pd.DataFrame
    """The documents the step keeps, in corpus order (`idx`)."""
    counts: StepCounts
    removed: list[dict[str, Any]] = field(default_factory=list)
    """The duplicates the step removed, each with the document it duplicates."""


Step = Callable[["pd.DataFrame", DataSpec, StageContext], StepOutput]


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


def _shingle_map(batch: pd.DataFrame, shingle_size: int) -> pd.DataFrame:
    from kubeforge.data.dedup import shingle_hashes

    return batch[["idx"]].assign(shingles=[shingle_hashes(text, shingle_size) for text in batch["text"]])


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
    return pd.concat(collected, ignore_index=True).sort_values("idx", kind="stable").reset_index(drop=True)


def characters(frame: pd.DataFrame) -> int:
    return int(frame["text"].str.len().sum()) if len(frame) else 0


def passthrough(
    step: str, frame: pd.DataFrame, enabled: bool = False, details: dict[str, Any] | None = None
) -> StepOutput:
    """The documents as they were: a disabled step, or one that makes something else of them."""
    n, chars = len(frame), characters(frame)
    return StepOutput(frame, StepCounts(step, enabled, n, n, chars, chars, details=details or {}))


def _filtered(step: str, before: pd.DataFrame, keep: np.ndarray, details: dict[str, Any]) -> StepOutput:
    after = before[keep].reset_index(drop=True)
    counts = StepCounts(step, True, len(before), len(after), characters(before), characters(after), details=details)
    return StepOutput(after, counts)


def _duplicate(kind: str, frame: pd.DataFrame, removed: int, kept: int, similarity: float) -> dict[str, Any]:
    return {
        "kind": kind, "id": frame.at[removed, "id"], "source": frame.at[removed, "source"],
        "duplicate_of": frame.at[kept, "id"], "duplicate_of_source": frame.at[kept, "source"],
        "similarity": similarity,
    }


# ---------------------------------------------------------------------------------------------
# the steps


def read(_: pd.DataFrame | None, spec: DataSpec, ctx: StageContext) -> StepOutput:
    import pandas as pd

    from kubeforge.data.sources import read_documents

    with ctx.reporter.task("data: read", total=None) as task:
        documents = read_documents(spec.sources, ctx.base_dir)
        task.update(len(documents), total=len(documents))
    if not documents:
        raise StageError("data", "the sources hold no documents; check spec.data.sources")
    frame = pd.DataFrame(documents, columns=["id", "source", "text"])
    frame.insert(0, "idx", np.arange(len(frame)))
    return passthrough("read", frame, enabled=True)


def normalize(frame: pd.DataFrame, spec: DataSpec, ctx: StageContext) -> StepOutput:
    if not spec.normalize.enabled:
        return passthrough("normalize", frame)
    before_chars = characters(frame)
    frame = _ray_map(frame, _normalize_map, {"step": spec.normalize}, ctx, "normalize")
    changed = int(frame["changed"].sum())
    frame = frame.drop(columns="changed")
    counts = StepCounts("normalize", True, len(frame), len(frame), before_chars, characters(frame), changed)
    return StepOutput(frame, counts)


def exact_dedup(frame: pd.DataFrame, spec: DataSpec, ctx: StageContext) -> StepOutput:
    from kubeforge.data.dedup import exact_duplicates

    if not spec.exact_dedup.enabled:
        return passthrough("exact_dedup", frame)
    with ctx.reporter.task("data: exact_dedup", total=len(frame)) as task:
        keep, original = exact_duplicates(list(frame["text"]))
        task.update(len(frame))
    removed = [_duplicate("exact", frame, i, original[i], 1.0) for i in np.flatnonzero(~keep)]
    output = _filtered("exact_dedup", frame, keep, {})
    output.removed = removed
    return output


def fuzzy_dedup(frame: pd.DataFrame, spec: DataSpec, ctx: StageContext) -> StepOutput:
    from kubeforge.data.dedup import near_duplicates

    fuzzy = spec.fuzzy_dedup
    if not fuzzy.enabled:
        return passthrough("fuzzy_dedup", frame)
    signed = _ray_map(
        frame, _signature_map,
        {"shingle_size": fuzzy.shingle_size, "num_perm": fuzzy.num_perm, "seed": fuzzy.seed}, ctx, "fuzzy_dedup",
    )
    sigs = np.stack(list(signed["signature"])).astype(np.uint32)

    def shingle_sets(members: np.ndarray) -> list[np.ndarray]:
        shingled = _ray_map(frame.iloc[members], _shingle_map, {"shingle_size": fuzzy.shingle_size}, ctx,
                            "fuzzy_dedup verify")
        return [np.asarray(s, dtype=np.uint64) for s in shingled["shingles"]]

    with ctx.reporter.task("data: fuzzy_dedup clusters", total=None):
        found = near_duplicates(sigs, signed["has_words"].to_numpy(dtype=bool), fuzzy.threshold, shingle_sets)
    removed = [
        _duplicate("near", frame, i, found.kept_of[i], round(float(found.similarity[i] or 0.0), 4))
        for i in np.flatnonzero(~found.keep)
    ]
    details: dict[str, Any] = {
        "bands": found.bands, "rows": found.rows, "clusters": len(found.clusters),
        "largest_cluster": max((len(c) for c in found.clusters), default=0),
        "candidate_pairs": found.candidate_pairs, "verified_pairs": found.verified_pairs,
    }
    output = _filtered("fuzzy_dedup", frame, found.keep, details)
    output.removed = removed
    return output


def quality(frame: pd.DataFrame, spec: DataSpec, ctx: StageContext) -> StepOutput:
    import pandas as pd

    if not spec.quality.enabled:
        return passthrough("quality", frame)
    judged = _ray_map(frame, _quality_map, {"step": spec.quality}, ctx, "quality")
    # Arrow-backed string columns come back with NA, not None, for documents that passed.
    reasons = [None if pd.isna(r) else str(r) for r in judged["reason"]]
    by_rule = dict(sorted(Counter(r for r in reasons if r is not None).items()))
    keep = np.array([r is None for r in reasons], dtype=bool)
    return _filtered("quality", frame, keep, {"removed_by_rule": by_rule})


def _reference_texts(spec: DataSpec, base_dir: Path) -> Iterator[str]:
    from kubeforge.data.normalize import normalize_text
    from kubeforge.data.sources import read_documents

    for document in read_documents(spec.perplexity.reference, base_dir, "spec.data.perplexity.reference"):
        text = document["text"]
        # The model must see text as the filtered documents look at this point of the pipeline.
        yield normalize_text(text, spec.normalize) if spec.normalize.enabled else text


def perplexity(frame: pd.DataFrame, spec: DataSpec, ctx: StageContext) -> StepOutput:
    from kubeforge.data.perplexity import train

    step = spec.perplexity
    if not step.enabled:
        return passthrough("perplexity", frame)
    with ctx.reporter.task("data: perplexity reference model", total=None):
        model = train(_reference_texts(spec, ctx.base_dir), step.order, step.max_reference_chars)
    scored = _ray_map(frame, _perplexity_map, {"model": model}, ctx, "perplexity")
    scores = scored["perplexity"].to_numpy(dtype=float)
    details = {
        "median_perplexity": float(np.median(scores)) if len(scores) else None,
        "max_perplexity": step.max_perplexity, "reference_vocabulary": model.vocabulary_size,
    }
    return _filtered("perplexity", frame, scores <= step.max_perplexity, details)


def redact(frame: pd.DataFrame, spec: DataSpec, ctx: StageContext) -> StepOutput:
    from kubeforge.data.redact import KINDS

    if not spec.redact.enabled:
        return passthrough("redact", frame)
    before_chars = characters(frame)
    redacted = _ray_map(frame, _redact_map, {"step": spec.redact}, ctx, "redact")
    columns = [f"redacted_{kind}" for kind in KINDS]
    per_doc = redacted[columns].to_numpy(dtype=np.int64)
    totals = {kind: int(per_doc[:, k].sum()) for k, kind in enumerate(KINDS)}
    frame = redacted.drop(columns=columns)
    return StepOutput(frame, StepCounts(
        "redact", True, len(frame), len(frame), before_chars, characters(frame),
        int((per_doc.sum(axis=1) > 0).sum()), {"replacements": totals},
    ))


DOCUMENT_STEPS: tuple[tuple[str, Step], ...] = (
    ("read", read), ("normalize", normalize), ("exact_dedup", exact_dedup), ("fuzzy_dedup", fuzzy_dedup),
    ("quality", quality), ("perplexity", perplexity), ("redact", redact),
)

"""The data stage's document steps: read -> normalize -> exact_dedup -> fuzzy_dedup -> quality ->
perplexity -> redact -> augment.

Each step reads the parts the step before kept and writes the parts it keeps (`kubeforge.data.tasks`),
every part in a Ray worker; the driver receives counts. The deduplication steps are in
`kubeforge.data.dedup_steps`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kubeforge.context import StageContext
from kubeforge.data import tasks
from kubeforge.data.dedup_steps import exact_dedup, fuzzy_dedup
from kubeforge.data.step_io import Step, StepInput, StepOutput, add_up, characters, map_parts, passthrough, unchanged
from kubeforge.errors import StageError
from kubeforge.spec.data import AugmentStep, DataSpec, NormalizeStep, QualityStep, RedactStep

if TYPE_CHECKING:
    import pandas as pd

    from kubeforge.data.perplexity import CharNgramModel
    from kubeforge.data.sources import InputFile, Piece


# ---------------------------------------------------------------------------------------------
# work on one item, in a Ray worker: module-level, so that workers import them by name


def _part_rows(file: InputFile, piece: Piece | None) -> Iterator[list[tuple[int, str, str, str]]]:
    """A file's (or a piece's) documents as rows of parts of about `PART_BYTES` of text each."""
    from kubeforge.data.sources import documents_of

    rows: list[tuple[int, str, str, str]] = []
    size = 0
    for row, document in documents_of(file, piece):
        rows.append(((file.number << 32) | row, document["id"], document["source"], document["text"]))
        size += len(document["text"])
        if size >= tasks.PART_BYTES:
            yield rows
            rows, size = [], 0
    if rows:
        yield rows


def _read_files(item: dict[str, Any], out: str) -> dict[str, Any]:
    import pandas as pd

    from kubeforge.data.sources import InputFile, Piece

    piece = Piece(item["start"], item["end"], item["first_line"]) if "piece" in item else None
    documents = text = 0
    for entry in item["files"]:
        file = InputFile(**entry)
        for sequence, rows in enumerate(_part_rows(file, piece)):
            frame = pd.DataFrame(rows, columns=list(tasks.COLUMNS))
            tasks.write_part(frame, Path(out) / tasks.part_name(file.number, item.get("piece", 0), sequence))
            documents += len(frame)
            text += characters(frame)
    return {"documents_in": documents, "characters": text}


def _normalize(frame: pd.DataFrame, step: NormalizeStep) -> tuple[pd.DataFrame, dict[str, Any]]:
    from kubeforge.data.normalize import normalize_batch

    texts, changed = normalize_batch(list(frame["text"]), step)
    return frame.assign(text=texts), {"changed": sum(changed)}


def _quality(frame: pd.DataFrame, step: QualityStep) -> tuple[pd.DataFrame, dict[str, Any]]:
    from kubeforge.data.quality import quality_batch

    reasons = quality_batch(list(frame["text"]), step)
    keep = np.array([reason is None for reason in reasons], dtype=bool)
    return frame[keep], {"removed_by_rule": dict(Counter(r for r in reasons if r is not None))}


def _perplexity(frame: pd.DataFrame, model: CharNgramModel, limit: float) -> tuple[pd.DataFrame, dict[str, Any]]:
    from kubeforge.data.perplexity import perplexity_batch

    scores = np.asarray(perplexity_batch(list(frame["text"]), model), dtype=float)
    bins = Counter(np.floor(np.log(np.maximum(scores, 1.0)) * _BINS_PER_E).astype(int).tolist())
    return frame[scores <= limit], {"log_perplexity_bins": {str(b): n for b, n in bins.items()}}


# Perplexities are reported as a histogram of their logarithm, 200 bins per factor e: a median good to
# 0.5 % from counts whose size does not grow with the corpus.
_BINS_PER_E = 200


def _median_of_bins(bins: dict[str, int]) -> float | None:
    if not bins:
        return None
    edges = sorted((int(b), n) for b, n in bins.items())
    total, seen = sum(n for _, n in edges), 0
    for edge, count in edges:
        seen += count
        if 2 * seen >= total:
            return round(float(np.exp((edge + 0.5) / _BINS_PER_E)), 3)
    return None


def _redact(frame: pd.DataFrame, step: RedactStep) -> tuple[pd.DataFrame, dict[str, Any]]:
    from kubeforge.data.redact import KINDS, redact_text

    texts: list[str] = []
    totals = dict.fromkeys(KINDS, 0)
    changed = 0
    for text in frame["text"]:
        redacted, found = redact_text(text, step)
        texts.append(redacted)
        changed += any(found.values())
        for kind in KINDS:
            totals[kind] += found[kind]
    return frame.assign(text=texts), {"changed": changed, "replacements": totals}


def _augment(frame: pd.DataFrame, step: AugmentStep) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The part's documents, each followed by its copies (`kubeforge.data.augment`)."""
    import pandas as pd

    from kubeforge.data.augment import paraphrase_documents, synonym_documents

    made: list[pd.DataFrame] = []
    stats: dict[str, int] = {}
    if step.synonyms is not None:
        copies, counts = synonym_documents(frame, step.synonyms)
        number = copies["id"].str.rsplit("-", n=1).str[-1].astype(int)
        made.append(copies.assign(copy=number))
        stats |= {f"synonyms.{name}": value for name, value in counts.items()}
    if step.paraphrase is not None:
        copies, counts = paraphrase_documents(frame, step.paraphrase)
        made.append(copies.assign(copy=(step.synonyms.copies if step.synonyms else 0) + 1))
        stats |= {f"paraphrase.{name}": value for name, value in counts.items()}
    originals = frame.assign(augmented_from=None, augmentation=None, copy=0)
    copies = pd.concat(made, ignore_index=True)
    position = dict(zip(frame["id"], frame["idx"], strict=True))
    copies["idx"] = [position[origin] | (copy << tasks.COPY_SHIFT)
                     for origin, copy in zip(copies["augmented_from"], copies["copy"], strict=True)]
    both = pd.concat([originals, copies[originals.columns]], ignore_index=True)
    both = both.assign(original=both["idx"] & tasks.ORIGINAL).sort_values(["original", "copy"], kind="stable")
    return both.drop(columns=["original", "copy"]).reset_index(drop=True), {"made": stats}


# ---------------------------------------------------------------------------------------------
# the steps


def _count_newlines(item: dict[str, Any]) -> dict[str, Any]:
    from kubeforge.data.sources import count_newlines

    return {"newlines": count_newlines(item["path"], item["start"], item["end"])}


def _read_items(spec: DataSpec, ctx: StageContext) -> list[dict[str, Any]]:
    """What each reader reads: JSONL files bigger than two parts in pieces of a part's worth of bytes,
    each piece alone; other files grouped into items of about a part's worth of bytes (a bigger file alone).

    A piece needs the number of its first line, for the documents' ids: workers count the newlines
    before each piece first (a fast pass that reads the bytes and parses nothing).
    """
    from kubeforge.data.sources import input_files, pieces, split_into_pieces

    files = input_files(spec.sources, ctx.base_dir)
    big = [f for f in files if f.format == "jsonl" and f.size > 2 * tasks.PART_BYTES]
    counts = [(f, split_into_pieces(f.size, tasks.PART_BYTES)) for f in big]
    counted = iter(tasks.run(
        [{"path": f.path, "start": start, "end": end} for f, ranges in counts for start, end in ranges],
        _count_newlines, {}, ctx, "read: lines",
    ))
    pieced = {
        f.number: pieces(f.size, tasks.PART_BYTES, [next(counted)["newlines"] for _ in ranges]) for f, ranges in counts
    }
    items: list[dict[str, Any]] = []
    size = tasks.PART_BYTES
    for file in files:
        if file.number in pieced:
            items += [{"files": [asdict(file)], "piece": n, **asdict(p)} for n, p in enumerate(pieced[file.number])]
            size = tasks.PART_BYTES
            continue
        if size + file.size > tasks.PART_BYTES:
            items.append({"files": []})
            size = 0
        items[-1]["files"].append(asdict(file))
        size += file.size
    return items


def read(step_in: StepInput, spec: DataSpec, ctx: StageContext) -> StepOutput:
    results = tasks.run(_read_items(spec, ctx), _read_files, {"out": str(step_in.out)}, ctx, "read")
    documents = add_up(results, "documents_in")
    if not documents:
        raise StageError("data", "the sources hold no documents; check spec.data.sources")
    return passthrough("read", documents, add_up(results, "characters"), enabled=True)


def normalize(step_in: StepInput, spec: DataSpec, ctx: StageContext) -> StepOutput:
    if not spec.normalize.enabled:
        return unchanged("normalize", step_in)
    _, counts = map_parts(step_in, _normalize, {"step": spec.normalize}, ctx, "normalize")
    return StepOutput(counts)


def quality(step_in: StepInput, spec: DataSpec, ctx: StageContext) -> StepOutput:
    if not spec.quality.enabled:
        return unchanged("quality", step_in)
    results, counts = map_parts(step_in, _quality, {"step": spec.quality}, ctx, "quality")
    counts.details = {"removed_by_rule": add_up(results, "removed_by_rule")}
    return StepOutput(counts)


def _reference_texts(spec: DataSpec, base_dir: Path) -> Iterator[str]:
    from kubeforge.data.normalize import normalize_text
    from kubeforge.data.sources import read_documents

    for document in read_documents(spec.perplexity.reference, base_dir, "spec.data.perplexity.reference"):
        text = document["text"]
        # The model must see text as the filtered documents look at this point of the pipeline.
        yield normalize_text(text, spec.normalize) if spec.normalize.enabled else text


def perplexity(step_in: StepInput, spec: DataSpec, ctx: StageContext) -> StepOutput:
    from kubeforge.data.perplexity import train

    step = spec.perplexity
    if not step.enabled:
        return unchanged("perplexity", step_in)
    with ctx.reporter.task("data: perplexity reference model", total=None):
        model = train(_reference_texts(spec, ctx.base_dir), step.order, step.max_reference_chars)
    results, counts = map_parts(
        step_in, _perplexity, {"model": model, "limit": step.max_perplexity}, ctx, "perplexity"
    )
    counts.details = {
        "median_perplexity": _median_of_bins(add_up(results, "log_perplexity_bins")),
        "max_perplexity": step.max_perplexity, "reference_vocabulary": model.vocabulary_size,
    }
    return StepOutput(counts)


def redact(step_in: StepInput, spec: DataSpec, ctx: StageContext) -> StepOutput:
    if not spec.redact.enabled:
        return unchanged("redact", step_in)
    results, counts = map_parts(step_in, _redact, {"step": spec.redact}, ctx, "redact")
    counts.details = {"replacements": add_up(results, "replacements")}
    return StepOutput(counts)


def augment(step_in: StepInput, spec: DataSpec, ctx: StageContext) -> StepOutput:
    from kubeforge.data.augment import preflight

    if not spec.augment.enabled:
        return unchanged("augment", step_in)
    preflight(spec.augment)
    results, counts = map_parts(step_in, _augment, {"step": spec.augment}, ctx, "augment")
    counts.details = {"made": add_up(results, "made")}
    return StepOutput(counts)


DOCUMENT_STEPS: tuple[tuple[str, Step], ...] = (
    ("read", read), ("normalize", normalize), ("exact_dedup", exact_dedup), ("fuzzy_dedup", fuzzy_dedup),
    ("quality", quality), ("perplexity", perplexity), ("redact", redact), ("augment", augment),
)

"""The data stage's document steps: read -> normalize -> exact_dedup -> fuzzy_dedup -> quality ->
perplexity -> redact -> augment.

Each step reads the parts the step before kept and writes the parts it keeps (`kubeforge.data.tasks`),
every part in a Ray worker; the driver receives counts. Deduplication is a hash aggregation across
workers: each part's keys (a text's digest, or the bands of its MinHash signature) go to files
partitioned by key, each partition is grouped by its own worker, and only the pairs of documents that
share a key come back to the driver: their number grows with the duplicates, not with the corpus.
Near-duplicate candidates are then verified by the exact Jaccard similarity of their shingle sets,
computed in workers for the candidates' documents only, and clustered in the driver; each cluster
keeps its first document in corpus order.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kubeforge.context import StageContext
from kubeforge.data import tasks
from kubeforge.data.card import StepCounts
from kubeforge.errors import StageError
from kubeforge.spec.data import AugmentStep, DataSpec, NormalizeStep, QualityStep, RedactStep

if TYPE_CHECKING:
    import pandas as pd

    from kubeforge.data.perplexity import CharNgramModel
    from kubeforge.data.sources import InputFile, Piece


@dataclass
class StepInput:
    parts: list[Path]
    """The documents of the step before, as parts in corpus order (none for `read`)."""
    documents: int
    """How many documents they hold..."""
    characters: int
    """... and characters."""
    out: Path
    """Where the step writes the parts it keeps."""
    work: Path
    """The step's scratch folder."""


@dataclass
class StepOutput:
    counts: StepCounts
    removed: list[dict[str, Any]] = field(default_factory=list)
    """The duplicates the step removed, each with the document it duplicates."""


Step = Callable[[StepInput, DataSpec, StageContext], StepOutput]

Transform = Callable[..., "tuple[pd.DataFrame, dict[str, Any]]"]
"""A step's work on one part's documents: the documents it keeps, and counts to add up."""


# ---------------------------------------------------------------------------------------------
# work on one item, in a Ray worker: module-level, so that workers import them by name


def _characters(frame: pd.DataFrame) -> int:
    return int(frame["text"].str.len().sum()) if len(frame) else 0


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
    documents = characters = 0
    for entry in item["files"]:
        file = InputFile(**entry)
        for sequence, rows in enumerate(_part_rows(file, piece)):
            frame = pd.DataFrame(rows, columns=list(tasks.COLUMNS))
            tasks.write_part(frame, Path(out) / tasks.part_name(file.number, item.get("piece", 0), sequence))
            documents += len(frame)
            characters += _characters(frame)
    return {"documents_in": documents, "characters": characters}


def _transform_part(item: dict[str, Any], transform: Transform, options: dict[str, Any], out: str) -> dict[str, Any]:
    before = tasks.read_part(item["part"])
    after, counts = transform(before, **options)
    if len(after):
        tasks.write_part(after, Path(out) / Path(item["part"]).name)
    return {
        "documents_in": len(before), "documents_out": len(after),
        "characters_in": _characters(before), "characters_out": _characters(after), **counts,
    }


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


def _drop(frame: pd.DataFrame, drop: str, look_up: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The documents not in `drop`, and the id and source of those in `look_up` (both .npy of idx)."""
    idx = frame["idx"].to_numpy()
    wanted = frame[np.isin(idx, np.load(look_up))]
    found = [[int(i), str(d), str(s)] for i, d, s in zip(wanted["idx"], wanted["id"], wanted["source"], strict=True)]
    return frame[~np.isin(idx, np.load(drop))], {"found": found}


_BUCKETED = np.dtype([("k1", "<u8"), ("k2", "<u8"), ("idx", "<i8")])


def _emit_keys(item: dict[str, Any], kind: str, options: dict[str, Any], buckets: int, work: str) -> dict[str, Any]:
    """A part's keys, sorted by partition (`k1 % buckets`), and where each partition starts."""
    from kubeforge.data import dedup

    frame = tasks.read_part(item["part"], ["idx", "text"])
    texts, idx = list(frame["text"]), frame["idx"].to_numpy(dtype=np.int64)
    if kind == "exact":
        keys = dedup.exact_keys(texts)
        k1, k2, members = keys[:, 0], keys[:, 1], idx
    else:
        sigs, has_words = dedup.signatures(texts, options["shingle_size"], options["num_perm"], options["seed"])
        bands = dedup.band_keys(sigs[has_words], options["bands"], options["rows"])
        k1 = bands.ravel()
        k2 = np.broadcast_to(np.arange(options["bands"], dtype=np.uint64), bands.shape).ravel()
        members = np.broadcast_to(idx[has_words][:, None], bands.shape).ravel()
    records = np.empty(len(k1), dtype=_BUCKETED)
    records["k1"], records["k2"], records["idx"] = k1, k2, members
    partition = records["k1"] % np.uint64(buckets)
    order = np.argsort(partition, kind="stable")
    stem = Path(item["part"]).stem
    np.save(Path(work) / f"{stem}.keys.npy", records[order])
    np.save(Path(work) / f"{stem}.starts.npy", np.searchsorted(partition[order], np.arange(buckets + 1)))
    return {"documents_in": len(frame)}


def _group_partition(item: dict[str, Any], stems: list[str], neighbours: bool, work: str) -> dict[str, Any]:
    from kubeforge.data.dedup import pairs_in_groups

    bucket = item["bucket"]
    chunks = []
    for stem in stems:
        starts = np.load(Path(work) / f"{stem}.starts.npy")
        keys = np.load(Path(work) / f"{stem}.keys.npy", mmap_mode="r")
        chunks.append(np.asarray(keys[starts[bucket] : starts[bucket + 1]]))
    records = np.concatenate(chunks)
    pairs = pairs_in_groups(records["k1"], records["k2"], records["idx"], neighbours)
    np.save(Path(work) / f"pairs-{bucket:05d}.npy", pairs)
    return {"pairs": len(pairs)}


def _shingle_part(item: dict[str, Any], nodes: str, shingle_size: int, work: str) -> dict[str, Any]:
    """The shingle sets of the part's documents in `nodes`, as (idx, offsets, values)."""
    from kubeforge.data.dedup import shingle_hashes

    frame = tasks.read_part(item["part"], ["idx", "text"])
    wanted = frame[np.isin(frame["idx"].to_numpy(), np.load(nodes))]
    sets = [shingle_hashes(text, shingle_size) for text in wanted["text"]]
    if sets:
        np.savez(
            Path(work) / f"{Path(item['part']).stem}.shingles.npz", idx=wanted["idx"].to_numpy(dtype=np.int64),
            offsets=np.cumsum([0, *map(len, sets)]), values=np.concatenate(sets),
        )
    return {"documents_in": len(frame)}


def _similarities(item: dict[str, Any], work: str) -> dict[str, Any]:
    """The exact Jaccard similarity of each pair of a chunk, from the shingle sets of `_shingle_part`."""
    from kubeforge.data.dedup import jaccard

    pairs = np.load(Path(work) / f"{item['chunk']}.npy")
    needed = np.unique(pairs)
    sets: dict[int, np.ndarray] = {}
    for path in sorted(Path(work).glob("*.shingles.npz")):
        with np.load(path) as saved:
            offsets, values = saved["offsets"], saved["values"]
            for row in np.flatnonzero(np.isin(saved["idx"], needed)):
                sets[int(saved["idx"][row])] = values[offsets[row] : offsets[row + 1]]
    similarity = np.array([jaccard(sets[int(i)], sets[int(j)]) for i, j in pairs], dtype=np.float64)
    np.save(Path(work) / f"{item['chunk']}.similarity.npy", similarity)
    return {"pairs": len(pairs)}


# ---------------------------------------------------------------------------------------------
# driver-side plumbing


def _add_up(results: list[dict[str, Any]], key: str) -> Any:
    """Sum of a count over items; counts that are dicts are summed key by key, lists concatenated."""
    values = [result[key] for result in results if key in result]
    if values and isinstance(values[0], dict):
        total: Counter[str] = Counter()
        for value in values:
            total.update(value)
        return dict(sorted(total.items()))
    if values and isinstance(values[0], list):
        return [entry for value in values for entry in value]
    return sum(values)


def _map_parts(
    step_in: StepInput, transform: Transform, options: dict[str, Any], ctx: StageContext, label: str
) -> tuple[list[dict[str, Any]], StepCounts]:
    results = tasks.run(
        [{"part": str(p)} for p in step_in.parts], _transform_part,
        {"transform": transform, "options": options, "out": str(step_in.out)}, ctx, label,
        total=step_in.documents, progress_key="documents_in",
    )
    counts = StepCounts(
        label, True, _add_up(results, "documents_in"), _add_up(results, "documents_out"),
        _add_up(results, "characters_in"), _add_up(results, "characters_out"), _add_up(results, "changed"),
    )
    return results, counts


def passthrough(step: str, documents: int, characters: int, enabled: bool = False,
                details: dict[str, Any] | None = None) -> StepOutput:
    """The documents as they were: a disabled step, or one that makes something else of them."""
    return StepOutput(StepCounts(step, enabled, documents, documents, characters, characters, details=details or {}))


def _unchanged(step: str, step_in: StepInput, details: dict[str, Any] | None = None) -> StepOutput:
    """The step left the documents as they were: disabled (without details), or found nothing to do."""
    return passthrough(step, step_in.documents, step_in.characters, enabled=details is not None, details=details)


_PARTITION_KEYS = 4_000_000


def _group_pairs(step_in: StepInput, ctx: StageContext, label: str, kind: str, options: dict[str, Any]) -> np.ndarray:
    """(i, j) pairs of documents that share a key, from keys emitted part by part and grouped by partition."""
    import ray

    # Every core busy, and no partition of more than about _PARTITION_KEYS keys (a worker's memory).
    keys = step_in.documents * options.get("bands", 1)
    buckets = max(2 * int(ray.cluster_resources().get("CPU", 1)), -(-keys // _PARTITION_KEYS))
    work = str(step_in.work)
    tasks.run(
        [{"part": str(p)} for p in step_in.parts], _emit_keys,
        {"kind": kind, "options": options, "buckets": buckets, "work": work}, ctx, label,
        total=step_in.documents, progress_key="documents_in",
    )
    tasks.run(
        [{"bucket": b} for b in range(buckets)], _group_partition,
        {"stems": [p.stem for p in step_in.parts], "neighbours": kind != "exact", "work": work}, ctx,
        f"{label} groups",
    )
    found = [np.load(step_in.work / f"pairs-{b:05d}.npy") for b in range(buckets)]
    pairs = np.concatenate(found)
    return np.unique(pairs, axis=0) if len(pairs) else np.empty((0, 2), dtype=np.int64)


def _remove(
    step: str, step_in: StepInput, ctx: StageContext, removed: np.ndarray, kept: np.ndarray,
    kind: str, similarity: np.ndarray, details: dict[str, Any],
) -> StepOutput:
    """Write the parts without the `removed` documents; each removed one is logged with its `kept` one."""
    if not len(removed):
        return _unchanged(step, step_in, details)
    np.save(step_in.work / "drop.npy", np.sort(removed))
    np.save(step_in.work / "look_up.npy", np.unique(np.concatenate([removed, kept])))
    results, counts = _map_parts(
        step_in, _drop, {"drop": str(step_in.work / "drop.npy"), "look_up": str(step_in.work / "look_up.npy")},
        ctx, step,
    )
    counts.details = details
    names = {i: (d, s) for i, d, s in _add_up(results, "found")}
    order = np.argsort(removed, kind="stable")
    log = [
        {
            "kind": kind, "id": names[int(removed[n])][0], "source": names[int(removed[n])][1],
            "duplicate_of": names[int(kept[n])][0], "duplicate_of_source": names[int(kept[n])][1],
            "similarity": round(float(similarity[n]), 4),
        }
        for n in order
    ]
    return StepOutput(counts, log)


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
    documents = _add_up(results, "documents_in")
    if not documents:
        raise StageError("data", "the sources hold no documents; check spec.data.sources")
    return passthrough("read", documents, _add_up(results, "characters"), enabled=True)


def normalize(step_in: StepInput, spec: DataSpec, ctx: StageContext) -> StepOutput:
    if not spec.normalize.enabled:
        return _unchanged("normalize", step_in)
    _, counts = _map_parts(step_in, _normalize, {"step": spec.normalize}, ctx, "normalize")
    return StepOutput(counts)


def exact_dedup(step_in: StepInput, spec: DataSpec, ctx: StageContext) -> StepOutput:
    if not spec.exact_dedup.enabled:
        return _unchanged("exact_dedup", step_in)
    pairs = _group_pairs(step_in, ctx, "exact_dedup", "exact", {})
    return _remove("exact_dedup", step_in, ctx, pairs[:, 1], pairs[:, 0], "exact", np.ones(len(pairs)), {})


def _verify(pairs: np.ndarray, step_in: StepInput, ctx: StageContext, name: str) -> np.ndarray:
    """The exact Jaccard similarity of each pair, computed in workers."""
    import ray

    chunks = np.array_split(np.arange(len(pairs)), max(1, min(len(pairs), int(ray.cluster_resources().get("CPU", 1)))))
    names = [f"{name}-{n:05d}" for n in range(len(chunks))]
    for chunk, rows in zip(names, chunks, strict=True):
        np.save(step_in.work / f"{chunk}.npy", pairs[rows])
    tasks.run([{"chunk": n} for n in names], _similarities, {"work": str(step_in.work)}, ctx, "fuzzy_dedup verify")
    return np.concatenate([np.load(step_in.work / f"{name}.similarity.npy") for name in names])


def fuzzy_dedup(step_in: StepInput, spec: DataSpec, ctx: StageContext) -> StepOutput:
    from kubeforge.data.dedup import VERIFY_TOLERANCE, clusters_of, lsh_bands

    fuzzy = spec.fuzzy_dedup
    if not fuzzy.enabled:
        return _unchanged("fuzzy_dedup", step_in)
    bands, rows = lsh_bands(fuzzy.threshold, fuzzy.num_perm)
    options = {"shingle_size": fuzzy.shingle_size, "num_perm": fuzzy.num_perm, "seed": fuzzy.seed,
               "bands": bands, "rows": rows}
    candidates = _group_pairs(step_in, ctx, "fuzzy_dedup", "bands", options)
    details: dict[str, Any] = {"bands": bands, "rows": rows, "candidate_pairs": len(candidates)}
    removed = kept = similarity = np.empty(0)
    verified = candidates
    if len(candidates):
        np.save(step_in.work / "nodes.npy", np.unique(candidates))
        tasks.run(
            [{"part": str(p)} for p in step_in.parts], _shingle_part,
            {"nodes": str(step_in.work / "nodes.npy"), "shingle_size": fuzzy.shingle_size, "work": str(step_in.work)},
            ctx, "fuzzy_dedup shingles", total=step_in.documents, progress_key="documents_in",
        )
        verified = candidates[_verify(candidates, step_in, ctx, "candidates") >= fuzzy.threshold - VERIFY_TOLERANCE]
        removed, kept = clusters_of(verified)
        if len(removed):
            similarity = _verify(np.stack([removed, kept], axis=1), step_in, ctx, "kept")
    removed_with = Counter(kept.tolist())
    details |= {
        "verified_pairs": len(verified), "clusters": len(removed_with),
        "largest_cluster": 1 + max(removed_with.values()) if removed_with else 0,
    }
    return _remove("fuzzy_dedup", step_in, ctx, removed.astype(np.int64), kept.astype(np.int64), "near", similarity,
                   details)


def quality(step_in: StepInput, spec: DataSpec, ctx: StageContext) -> StepOutput:
    if not spec.quality.enabled:
        return _unchanged("quality", step_in)
    results, counts = _map_parts(step_in, _quality, {"step": spec.quality}, ctx, "quality")
    counts.details = {"removed_by_rule": _add_up(results, "removed_by_rule")}
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
        return _unchanged("perplexity", step_in)
    with ctx.reporter.task("data: perplexity reference model", total=None):
        model = train(_reference_texts(spec, ctx.base_dir), step.order, step.max_reference_chars)
    results, counts = _map_parts(
        step_in, _perplexity, {"model": model, "limit": step.max_perplexity}, ctx, "perplexity"
    )
    counts.details = {
        "median_perplexity": _median_of_bins(_add_up(results, "log_perplexity_bins")),
        "max_perplexity": step.max_perplexity, "reference_vocabulary": model.vocabulary_size,
    }
    return StepOutput(counts)


def redact(step_in: StepInput, spec: DataSpec, ctx: StageContext) -> StepOutput:
    if not spec.redact.enabled:
        return _unchanged("redact", step_in)
    results, counts = _map_parts(step_in, _redact, {"step": spec.redact}, ctx, "redact")
    counts.details = {"replacements": _add_up(results, "replacements")}
    return StepOutput(counts)


def augment(step_in: StepInput, spec: DataSpec, ctx: StageContext) -> StepOutput:
    from kubeforge.data.augment import preflight

    if not spec.augment.enabled:
        return _unchanged("augment", step_in)
    preflight(spec.augment)
    results, counts = _map_parts(step_in, _augment, {"step": spec.augment}, ctx, "augment")
    counts.details = {"made": _add_up(results, "made")}
    return StepOutput(counts)


DOCUMENT_STEPS: tuple[tuple[str, Step], ...] = (
    ("read", read), ("normalize", normalize), ("exact_dedup", exact_dedup), ("fuzzy_dedup", fuzzy_dedup),
    ("quality", quality), ("perplexity", perplexity), ("redact", redact), ("augment", augment),
)

"""The deduplication steps, as hash aggregations across Ray workers.

Each part's keys (a text's digest, or the bands of its MinHash signature) go to files partitioned
by key, each partition is grouped by its own worker, and only the pairs of documents that share a key
come back to the driver: their number grows with the duplicates, not with the corpus. Near-duplicate
candidates are then verified by the exact Jaccard similarity of their shingle sets, computed in
workers for the candidates' documents only, and clustered in the driver; each cluster keeps its first
document in corpus order. A last pass over the parts drops the duplicates.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kubeforge.context import StageContext
from kubeforge.data import tasks
from kubeforge.data.step_io import StepInput, StepOutput, map_parts, unchanged
from kubeforge.spec.data import DataSpec

if TYPE_CHECKING:
    import pandas as pd


def _drop(frame: pd.DataFrame, drop: str, look_up: str, names: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The documents not in `drop`; the idx, id and source of those in `look_up` (both .npy of idx) go to
    a file of the folder `names`, for `_log_removed`."""
    idx = frame["idx"].to_numpy()
    wanted = frame.loc[np.isin(idx, np.load(look_up)), ["idx", "id", "source"]]
    if len(wanted):
        tasks.write_part(wanted, Path(names) / f"{int(idx[0]):020d}.parquet")
    return frame[~np.isin(idx, np.load(drop))], {}


# Entries of the removed-duplicates log written by one worker: about 20 MB of JSON.
_LOG_CHUNK = 100_000
_LINK = np.dtype([("removed", "<i8"), ("kept", "<i8"), ("similarity", "<f8")])


def _log_removed(item: dict[str, Any], kind: str, work: str) -> dict[str, Any]:
    """The log entries of a chunk of removed documents, with the ids and sources `_drop` looked up."""
    import pyarrow.parquet as pq

    links = np.load(Path(work) / f"links-{item['chunk']:05d}.npy")
    names = pq.read_table(Path(work) / "names").to_pandas().set_index("idx")
    removed, kept = names.loc[links["removed"]], names.loc[links["kept"]]
    rows = zip(removed["id"], removed["source"], kept["id"], kept["source"], links["similarity"], strict=True)
    with (Path(work) / f"removed-{item['chunk']:05d}.jsonl").open("w", encoding="utf-8") as log:
        for doc_id, source, kept_id, kept_source, similarity in rows:
            log.write(json.dumps({
                "kind": kind, "id": doc_id, "source": source, "duplicate_of": kept_id,
                "duplicate_of_source": kept_source, "similarity": round(float(similarity), 4),
            }) + "\n")
    return {"entries": len(links)}


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
    """Write the parts without the `removed` documents; each removed one is logged with its `kept` one,
    in corpus order, by workers: the driver never holds the log."""
    if not len(removed):
        return unchanged(step, step_in, details)
    work = step_in.work
    np.save(work / "drop.npy", np.sort(removed))
    np.save(work / "look_up.npy", np.unique(np.concatenate([removed, kept])))
    _, counts = map_parts(
        step_in, _drop,
        {"drop": str(work / "drop.npy"), "look_up": str(work / "look_up.npy"), "names": str(work / "names")},
        ctx, step,
    )
    counts.details = details
    links = np.empty(len(removed), dtype=_LINK)
    links["removed"], links["kept"], links["similarity"] = removed, kept, similarity
    links = links[np.argsort(removed, kind="stable")]
    chunks = range(-(-len(links) // _LOG_CHUNK))
    for chunk in chunks:
        np.save(work / f"links-{chunk:05d}.npy", links[chunk * _LOG_CHUNK : (chunk + 1) * _LOG_CHUNK])
    tasks.run([{"chunk": chunk} for chunk in chunks], _log_removed, {"kind": kind, "work": str(work)}, ctx,
              f"{step} log")
    return StepOutput(counts, [work / f"removed-{chunk:05d}.jsonl" for chunk in chunks])


def exact_dedup(step_in: StepInput, spec: DataSpec, ctx: StageContext) -> StepOutput:
    if not spec.exact_dedup.enabled:
        return unchanged("exact_dedup", step_in)
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
        return unchanged("fuzzy_dedup", step_in)
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

"""Document-level split and packing into fixed-length token rows, in Ray workers.

Each document's split comes from a hash of `packing.seed` and its id, so it does not depend on
which other documents survive cleaning: a document stays in its split across reruns. Within a split,
documents (in corpus order) are tokenised, each followed by the eos token, concatenated and cut
into rows of `seq_len` tokens, in shards of `sequences_per_shard` rows. The last, partial row of a
split is filled with the pad token rather than dropped, so a small validation split still yields a
row; trainers mask `pad_id`.

Workers tokenise the parts (`tokenize_part`: one token stream per part and split), then write the
shards (`write_shard`: each shard's rows, cut from the streams of the parts it spans), so no process
holds more than a part's tokens and a shard.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from kubeforge.data import tasks
from kubeforge.spec.data import PackingSpec

SPLITS = ("train", "validation", "test")


def split_position(doc_id: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the seed and the document id."""
    digest = hashlib.sha256(f"{seed}\x00{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(doc_id: str, spec: PackingSpec) -> str:
    position = split_position(doc_id, spec.seed)
    if position < spec.test_fraction:
        return "test"
    if position < spec.test_fraction + spec.validation_fraction:
        return "validation"
    return "train"


# Candidates to move, per split: the documents nearest the other splits' ranges. Training lies above
# [0, test + validation), so its candidates are its smallest positions and the others' their largest.
# Two per split suffice: a split gives at most one document to each of the other two.
EDGE_SIZE = 2


def edge_order(split: str, position: float) -> float:
    """Sort key that puts a split's documents nearest the other splits first."""
    return position if split == "train" else -position


def overrides(
    documents: Counter[str], edges: Mapping[str, Sequence[Sequence[Any]]], spec: PackingSpec
) -> dict[Any, str]:
    """Documents moved so that every split asked for has one, as long as the corpus has enough.

    The hash can leave a split empty only in a tiny corpus. Each empty split asked for (training
    always, test and validation with a fraction > 0) takes a document from the split that has the
    most, while that split keeps at least one: the donor's document nearest the empty split.
    `edges[split]` holds that split's first `EDGE_SIZE` documents as sorted (edge_order, key).
    """
    counts = Counter(documents)
    pools = {name: [entry[1] for entry in edges.get(name, ())] for name in SPLITS}
    wanted = [name for name, fraction in
              (("train", 1.0), ("test", spec.test_fraction), ("validation", spec.validation_fraction)) if fraction > 0]
    moved: dict[Any, str] = {}
    for name in wanted:
        donor = max(SPLITS, key=lambda split: counts[split])
        if counts[name] == 0 and counts[donor] >= 2 and pools[donor]:
            moved[pools[donor].pop(0)] = name
            counts[donor] -= 1
            counts[name] += 1
    return moved


def assign_splits(doc_ids: Sequence[str], spec: PackingSpec) -> list[str]:
    """The split of each document of a corpus at hand (the stage's workers use `split_of` and `overrides`)."""
    positions = [split_position(i, spec.seed) for i in doc_ids]
    splits = [split_of(i, spec) for i in doc_ids]
    edges = {name: sorted((edge_order(name, positions[n]), n) for n, split in enumerate(splits) if split == name)
             [:EDGE_SIZE] for name in SPLITS}
    for n, split in overrides(Counter(splits), edges, spec).items():
        splits[n] = split
    return splits


def _split_ids(frame: Any) -> list[str]:
    """The id that decides each document's split: a copy's is its original's, so that the two share it."""
    if "augmented_from" not in frame.columns:
        return list(frame["id"])
    return list(frame["augmented_from"].fillna(frame["id"]))


def _splits_of(frame: Any, spec: PackingSpec, moved: dict[str, str]) -> list[str]:
    """`moved` is keyed by the original document's `idx` as a string (it travels as JSON)."""
    pairs = zip(frame["idx"], _split_ids(frame), strict=True)
    return [moved.get(str(idx & tasks.ORIGINAL)) or split_of(doc_id, spec) for idx, doc_id in pairs]


def count_splits(item: dict[str, Any], spec: PackingSpec) -> dict[str, Any]:
    """A part's documents per split, its training characters, and per split its original documents
    nearest the other splits (`edges`, for `overrides`)."""
    frame = tasks.read_part(item["part"], ["idx", "id", "text", "augmented_from"])
    split_ids = _split_ids(frame)
    splits = [split_of(i, spec) for i in split_ids]
    train = [n for n, split in enumerate(splits) if split == "train"]
    originals = [n for n, idx in enumerate(frame["idx"]) if idx == idx & tasks.ORIGINAL]
    edges = {name: sorted(
        (edge_order(name, split_position(split_ids[n], spec.seed)), int(frame["idx"].iat[n]))
        for n in originals if splits[n] == name
    )[:EDGE_SIZE] for name in SPLITS}
    return {
        "documents_in": len(frame), "documents": dict(Counter(splits)),
        "train_characters": int(frame["text"].iloc[train].str.len().sum()) if train else 0, "edges": edges,
    }


def training_texts(
    parts: Sequence[str], spec: PackingSpec, moved: dict[str, str], keep: Callable[[str], bool]
) -> list[str]:
    """The texts of the training split's documents for which `keep(doc_id)`, in corpus order."""
    texts: list[str] = []
    for part in parts:
        frame = tasks.read_part(part, ["idx", "id", "text", "augmented_from"])
        for doc_id, text, split in zip(frame["id"], frame["text"], _splits_of(frame, spec, moved), strict=True):
            if split == "train" and keep(doc_id):
                texts.append(text)
    return texts


# Documents tokenised at a time: the Rust tokenizer's batch parallelism without holding the part's
# encodings (about 100 bytes a token in Python objects) at once.
_ENCODE_CHUNK = 1024


@lru_cache(maxsize=2)
def _load_tokenizer(directory: str) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(directory)


def tokenize_part(
    item: dict[str, Any], tokenizer_dir: str, spec: PackingSpec, moved: dict[str, str], eos_id: int,
    documents_out: str, work: str,
) -> dict[str, Any]:
    """Tokenise a part: `<work>/<part>.<split>.npy` holds its documents of that split, each followed by
    eos; and write the part's documents with their split, for the stage's `documents/`."""
    tokenizer = _load_tokenizer(tokenizer_dir)
    frame = tasks.read_part(item["part"], ["idx", "id", "source", "text", "augmented_from", "augmentation"])
    splits = _splits_of(frame, spec, moved)
    texts = list(frame["text"])
    streams: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    eos = np.array([eos_id], dtype=np.int32)
    for start in range(0, len(texts), _ENCODE_CHUNK):
        # The Rust tokenizer directly, without offsets: several times faster than the transformers wrapper.
        encoded = tokenizer.backend_tokenizer.encode_batch_fast(
            texts[start : start + _ENCODE_CHUNK], add_special_tokens=False
        )
        for encoding, split in zip(encoded, splits[start : start + _ENCODE_CHUNK], strict=True):
            streams[split] += [np.asarray(encoding.ids, dtype=np.int32), eos]
    stem = Path(item["part"]).stem
    tokens = {}
    for split, pieces in streams.items():
        stream = np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int32)
        np.save(Path(work) / f"{stem}.{split}.npy", stream)
        tokens[split] = len(stream)
    documents = frame.drop(columns="idx").assign(split=splits)
    tasks.write_part(documents, Path(documents_out) / Path(item["part"]).name)
    return {"documents_in": len(frame), "documents": dict(Counter(splits)), "tokens": tokens}


def shard_pieces(lengths: Sequence[int], shard_tokens: int) -> list[list[tuple[int, int, int]]]:
    """For each shard of `shard_tokens` tokens (the last one shorter), the (stream, start, end) slices of
    the consecutive token streams of `lengths` that make it."""
    ends = np.cumsum(np.asarray(lengths, dtype=np.int64))
    starts = ends - np.asarray(lengths, dtype=np.int64)
    total = int(ends[-1]) if len(ends) else 0
    shards = []
    for first in range(0, total, shard_tokens):
        last = min(first + shard_tokens, total)
        shards.append([
            (n, int(max(first, starts[n]) - starts[n]), int(min(last, ends[n]) - starts[n]))
            for n in range(len(lengths)) if starts[n] < last and ends[n] > first
        ])
    return shards


def plan_shards(
    stems: Sequence[str], tokenized: Sequence[dict[str, Any]], spec: PackingSpec
) -> tuple[dict[str, list[str]], list[dict[str, Any]]]:
    """Each split's shard paths, and what `write_shard` writes for each: from the parts' names (`stems`)
    and what `tokenize_part` said of them, in corpus order."""
    shards: dict[str, list[str]] = {}
    writes: list[dict[str, Any]] = []
    for split in SPLITS:
        lengths = [part["tokens"][split] for part in tokenized]
        pieces = shard_pieces(lengths, spec.seq_len * spec.sequences_per_shard)
        shards[split] = [f"shards/{split}/shard-{n:05d}.npy" for n in range(len(pieces))]
        writes += [
            {"path": path, "pieces": [[f"{stems[k]}.{split}.npy", start, end] for k, start, end in shard]}
            for path, shard in zip(shards[split], pieces, strict=True)
        ]
    return shards, writes


def write_shard(item: dict[str, Any], work: str, seq_len: int, pad_id: int, out: str) -> dict[str, Any]:
    """One shard, from its slices of the parts' token streams, as rows of `seq_len` (the last one padded)."""
    pieces = [np.load(Path(work) / name, mmap_mode="r")[start:end] for name, start, end in item["pieces"]]
    stream = np.concatenate(pieces)
    rows = np.full(-(-len(stream) // seq_len) * seq_len, pad_id, dtype=np.int32)
    rows[: len(stream)] = stream
    path = Path(out) / item["path"]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, rows.reshape(-1, seq_len))
    return {"rows": len(rows) // seq_len}


# Shards a work item writes: a shard (2 MB by default) takes a few milliseconds to write, less than a Ray
# task's round trip.
SHARDS_PER_ITEM = 8


def write_shards(item: dict[str, Any], work: str, seq_len: int, pad_id: int, out: str) -> dict[str, Any]:
    """`write_shard` for each of `item["shards"]`; the rows of each, by path."""
    return {"rows": {shard["path"]: write_shard(shard, work, seq_len, pad_id, out)["rows"] for shard in item["shards"]}}

"""Document-level split and packing into fixed-length token rows.

Each document's split comes from a hash of `packing.seed` and its id, so it does not depend on
which other documents survive cleaning: a document stays in its split across reruns. Within a split,
documents (in corpus order) are tokenised, each followed by the eos token, concatenated and cut
into rows of `seq_len` tokens. The last, partial row of a split is filled with the pad token
rather than dropped, so a small validation split still yields a row; trainers mask `pad_id`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kubeforge.spec.data import PackingSpec

SPLITS = ("train", "validation", "test")


def split_position(doc_id: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the seed and the document id."""
    digest = hashlib.sha256(f"{seed}\x00{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(doc_ids: Sequence[str], spec: PackingSpec) -> list[str]:
    """The split of each document.

    A split asked for (fraction > 0) that the hash leaves empty takes the training document whose
    position is closest to that split's range, so every requested split has data while there are at
    least as many documents as splits; this only happens for tiny corpora.
    """
    positions = [split_position(i, spec.seed) for i in doc_ids]
    splits = []
    for u in positions:
        if u < spec.test_fraction:
            splits.append("test")
        elif u < spec.test_fraction + spec.validation_fraction:
            splits.append("validation")
        else:
            splits.append("train")
    for name, fraction in (("test", spec.test_fraction), ("validation", spec.validation_fraction)):
        if fraction > 0 and name not in splits:
            train = [i for i, s in enumerate(splits) if s == "train"]
            if len(train) >= 2:
                splits[min(train, key=lambda i: positions[i])] = name
    return splits


def pack(token_ids: Sequence[Sequence[int]], eos_id: int, pad_id: int, seq_len: int) -> tuple[np.ndarray, int]:
    """Rows of shape (n, seq_len) and the number of real (non-pad) tokens in them."""
    if not token_ids:
        return np.empty((0, seq_len), dtype=np.int32), 0
    stream = np.concatenate([np.append(np.asarray(ids, dtype=np.int32), np.int32(eos_id)) for ids in token_ids])
    rows = -(-len(stream) // seq_len)
    padded = np.full(rows * seq_len, pad_id, dtype=np.int32)
    padded[: len(stream)] = stream
    return padded.reshape(rows, seq_len), len(stream)


def write_shards(rows: np.ndarray, directory: Path, per_shard: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, start in enumerate(range(0, len(rows), per_shard)):
        path = directory / f"shard-{index:05d}.npy"
        np.save(path, np.ascontiguousarray(rows[start : start + per_shard], dtype=np.int32))
        paths.append(path)
    return paths


def pack_splits(
    texts: Sequence[str], splits: Sequence[str], tokenizer: Any, ids: dict[str, int], spec: PackingSpec, out_dir: Path,
) -> dict[str, Any]:
    """Tokenise, pack and write `shards/<split>/shard-*.npy` under `out_dir`; paths returned relative to it."""
    # The Rust tokenizer directly, without offsets: several times faster than the transformers wrapper.
    batch = tokenizer.backend_tokenizer.encode_batch_fast(list(texts), add_special_tokens=False) if texts else []
    encoded = [item.ids for item in batch]
    result: dict[str, Any] = {"shards": {}, "num_sequences": {}, "num_tokens": {}, "num_documents": {}}
    for split in SPLITS:
        members = [encoded[i] for i, s in enumerate(splits) if s == split]
        rows, real = pack(members, ids["eos_id"], ids["pad_id"], spec.seq_len)
        paths = write_shards(rows, out_dir / "shards" / split, spec.sequences_per_shard)
        result["shards"][split] = [p.relative_to(out_dir).as_posix() for p in paths]
        result["num_sequences"][split] = len(rows)
        result["num_tokens"][split] = int(real)
        result["num_documents"][split] = len(members)
    return result

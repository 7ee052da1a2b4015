"""Document-level split and packing into fixed-length token rows.

Each document's split comes from a hash of `packing.seed` and its id, so it does not depend on
which other documents survive cleaning: a document stays in its split across reruns. Within a split,
documents (in corpus order) are tokenised, each followed by the eos token, concatenated and cut
into rows of `seq_len` tokens, written shard by shard as they fill. The last, partial row of a split
is filled with the pad token rather than dropped, so a small validation split still yields a row;
trainers mask `pad_id`.
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


# Documents tokenised at a time: the Rust tokenizer's batch parallelism without holding the corpus's
# encodings (about 100 bytes a token in Python objects) at once.
_ENCODE_CHUNK = 1024


class ShardWriter:
    """One split's documents, each followed by eos, as rows of `seq_len` tokens in `.npy` shards of
    `per_shard` rows, written as they fill; the last, partial row is filled with `pad_id`."""

    def __init__(self, directory: Path, seq_len: int, per_shard: int, eos_id: int, pad_id: int) -> None:
        self.directory, self.seq_len, self.per_shard = directory, seq_len, per_shard
        self.eos, self.pad_id = np.array([eos_id], dtype=np.int32), pad_id
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.paths: list[Path] = []
        self.rows = self.tokens = self.documents = 0

    def add(self, ids: Sequence[int]) -> None:
        self.pending += [np.asarray(ids, dtype=np.int32), self.eos]
        self.pending_tokens += len(ids) + 1
        self.tokens += len(ids) + 1
        self.documents += 1
        shard_tokens = self.seq_len * self.per_shard
        if self.pending_tokens >= shard_tokens:
            stream = np.concatenate(self.pending)
            full = len(stream) // shard_tokens * shard_tokens
            for start in range(0, full, shard_tokens):
                self._write(stream[start : start + shard_tokens])
            self.pending, self.pending_tokens = [stream[full:]], len(stream) - full

    def close(self) -> None:
        if self.pending_tokens:
            stream = np.concatenate(self.pending)
            padded = np.full(-(-len(stream) // self.seq_len) * self.seq_len, self.pad_id, dtype=np.int32)
            padded[: len(stream)] = stream
            self._write(padded)
        self.pending, self.pending_tokens = [], 0

    def _write(self, tokens: np.ndarray) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"shard-{len(self.paths):05d}.npy"
        rows = tokens.reshape(-1, self.seq_len)
        np.save(path, np.ascontiguousarray(rows, dtype=np.int32))
        self.paths.append(path)
        self.rows += len(rows)


def pack_splits(
    texts: Sequence[str], splits: Sequence[str], tokenizer: Any, ids: dict[str, int], spec: PackingSpec, out_dir: Path,
) -> dict[str, Any]:
    """Tokenise, pack and write `shards/<split>/shard-*.npy` under `out_dir`; paths returned relative to it."""
    writers = {
        split: ShardWriter(out_dir / "shards" / split, spec.seq_len, spec.sequences_per_shard, ids["eos_id"],
                           ids["pad_id"])
        for split in SPLITS
    }
    for start in range(0, len(texts), _ENCODE_CHUNK):
        # The Rust tokenizer directly, without offsets: several times faster than the transformers wrapper.
        encoded = tokenizer.backend_tokenizer.encode_batch_fast(
            list(texts[start : start + _ENCODE_CHUNK]), add_special_tokens=False
        )
        for item, split in zip(encoded, splits[start : start + _ENCODE_CHUNK], strict=True):
            writers[split].add(item.ids)
    result: dict[str, Any] = {"shards": {}, "num_sequences": {}, "num_tokens": {}, "num_documents": {}}
    for split, writer in writers.items():
        writer.close()
        result["shards"][split] = [p.relative_to(out_dir).as_posix() for p in writer.paths]
        result["num_sequences"][split] = writer.rows
        result["num_tokens"][split] = writer.tokens
        result["num_documents"][split] = writer.documents
    return result

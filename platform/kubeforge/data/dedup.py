"""Exact and near-duplicate (MinHash LSH) removal.

Near-duplicates, in four steps:

1. *Shingles*: a document's lower-cased `\\w+` words, taken `shingle_size` at a time. Each word
   gets a 64-bit hash (blake2b), each shingle a polynomial combination of its words' hashes put
   through the splitmix64 finaliser, kept as 32 bits.
2. *Signature*: `num_perm` multiply-shift hash functions `h_i(x) = ((a_i x + b_i) mod 2^64) >> 32`
   (Dietzfelbinger's strongly universal family for 32-bit `x`), with odd `a_i` and any `b_i` below
   2^64 drawn from `seed`; the signature is each function's minimum over the shingle set. Two
   signatures agree in a given position with probability (close to) the Jaccard similarity of the
   shingle sets. Three passes of numpy over a whole batch's shingles: a `mod (2^61 - 1)` family
   costs three times as many.
3. *LSH*: the signature is cut into `b` bands of `r` rows; documents sharing a band are candidates.
   `r` is the largest that still makes a pair exactly at `threshold` share some band with
   probability at least 99 %: since every candidate is verified exactly, a chance candidate costs
   one set intersection, while a missed pair is a duplicate kept.
4. *Verification and clustering*: a candidate pair is a duplicate when the exact Jaccard similarity
   of its shingle sets is at least `threshold` (the signature's estimate would lose pairs near the
   threshold to its noise, in both directions). Pairs are joined with union-find; each cluster keeps
   its first document in corpus order.

A bucket of `k` documents yields `2k` candidate pairs (everyone against the bucket's first member,
plus neighbours), not `k^2`: a real cluster shares many bands, so what one bucket misses another
usually links, and the cost stays linear when many documents share one bucket.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import chain

import numpy as np

_LOW32 = np.uint64(0xFFFFFFFF)
_WORD = re.compile(r"\w+")
# ASCII bytes that are not `\w` become spaces: on ASCII text, splitting that is `_WORD` three times faster.
_ASCII_NON_WORD_TO_SPACE = bytes(c if chr(c).isascii() and _WORD.fullmatch(chr(c)) else 0x20 for c in range(256))
_MULTIPLIER = np.uint64(0x100000001B3)
# The (num_perm x shingles) intermediate of `minhashes`: 8 MB, which measured about twice as fast as
# 32 MB (fewer trips to main memory), and bounded however long a document is.
_CHUNK_ELEMENTS = 1 << 20


# ----------------------------------------------------------------------------------------------
# exact


def exact_keys(texts: Sequence[str]) -> np.ndarray:
    """(n, 2) uint64: the first 128 bits of each text's SHA-256, its identity for exact dedup."""
    keys = np.empty((len(texts), 2), dtype=np.uint64)
    for row, text in enumerate(texts):
        keys[row] = np.frombuffer(hashlib.sha256(text.encode("utf-8")).digest()[:16], dtype="<u8")
    return keys


def pairs_in_groups(k1: np.ndarray, k2: np.ndarray, idx: np.ndarray, neighbours: bool) -> np.ndarray:
    """Unique (i, j), i < j, pairs of documents `idx` that share a key (k1, k2): each member against its
    group's first (smallest) member, and with `neighbours` also each against the next one."""
    if not len(idx):
        return np.empty((0, 2), dtype=np.int64)
    order = np.lexsort((idx, k2, k1))
    k1, k2, members = k1[order], k2[order], idx[order].astype(np.int64)
    same = (k1[1:] == k1[:-1]) & (k2[1:] == k2[:-1])
    starts = np.flatnonzero(np.r_[True, ~same])
    first = np.repeat(members[starts], np.diff(np.r_[starts, len(members)]))
    same_as_previous = np.r_[False, same]
    found = [np.stack([first[same_as_previous], members[same_as_previous]], axis=1)]
    if neighbours:
        found.append(np.stack([members[:-1][same], members[1:][same]], axis=1))
    pairs = np.concatenate(found)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    return np.unique(pairs, axis=0) if len(pairs) else np.empty((0, 2), dtype=np.int64)


def exact_duplicates(texts: Sequence[str]) -> tuple[np.ndarray, list[int | None]]:
    """Keep mask and, for each dropped text, the index of the earlier identical one."""
    keys = exact_keys(texts)
    pairs = pairs_in_groups(keys[:, 0], keys[:, 1], np.arange(len(texts)), neighbours=False)
    keep = np.ones(len(texts), dtype=bool)
    original: list[int | None] = [None] * len(texts)
    for kept, removed in pairs:
        keep[removed] = False
        original[int(removed)] = int(kept)
    return keep, original


# ----------------------------------------------------------------------------------------------
# signatures


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads the polynomial's structure over all 64 bits."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@lru_cache(maxsize=1 << 18)
def _word_hash(word: str | bytes) -> int:
    encoded = word if isinstance(word, bytes) else word.encode("utf-8")
    return int.from_bytes(hashlib.blake2b(encoded, digest_size=8).digest(), "little")


def _words(text: str) -> list[str] | list[bytes]:
    """The lower-cased `\\w+` words of a text (as UTF-8 bytes when it is ASCII, which is faster)."""
    if text.isascii():
        return text.encode("ascii").lower().translate(_ASCII_NON_WORD_TO_SPACE).split()
    return _WORD.findall(text.lower())


def _word_hashes(text: str) -> np.ndarray:
    words = _words(text)
    return np.fromiter(map(_word_hash, words), dtype=np.uint64, count=len(words))


def _combine(hashes: np.ndarray, width: int) -> np.ndarray:
    """The 32-bit hash of each run of `width` consecutive word hashes."""
    count = len(hashes) - width + 1
    with np.errstate(over="ignore"):
        combined = hashes[:count].copy()
        for offset in range(1, width):
            combined = combined * _MULTIPLIER ^ hashes[offset : offset + count]
        return _mix64(combined) >> np.uint64(32)


def shingle_hashes(text: str, shingle_size: int) -> np.ndarray:
    """Distinct 32-bit shingle hashes (uint64 array); a text shorter than one shingle is one shingle."""
    hashes = _word_hashes(text)
    if not len(hashes):
        return np.empty(0, dtype=np.uint64)
    return np.unique(_combine(hashes, min(shingle_size, len(hashes))))


def _distinct(values: np.ndarray) -> np.ndarray:
    """`np.unique` by sorting: several times faster than its hash table on large uint64 arrays."""
    values = np.sort(values)
    return values[np.r_[True, values[1:] != values[:-1]]] if len(values) else values


def shingle_sets(texts: Sequence[str], shingle_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every text's `shingle_hashes` at once: (the texts that have any, their sets end to end, where
    each set starts). A few passes of numpy over the whole batch instead of a few calls per text."""
    import pandas as pd

    words = [_words(text) for text in texts]
    counts = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    # Each distinct word of the batch is hashed once.
    codes, vocabulary = pd.factorize(np.fromiter(chain.from_iterable(words), dtype=object, count=int(counts.sum())))
    hashes = np.fromiter(map(_word_hash, vocabulary), dtype=np.uint64, count=len(vocabulary))[codes]
    text_of = np.repeat(np.arange(len(texts), dtype=np.uint64), counts)
    # Runs of `shingle_size` words that start and end in the same text...
    whole = _combine(hashes, shingle_size) if len(hashes) >= shingle_size else np.empty(0, dtype=np.uint64)
    inside = text_of[: len(whole)] == text_of[shingle_size - 1 :]
    keys = [(text_of[: len(whole)][inside] << np.uint64(32)) | whole[inside]]
    # ... and a text shorter than one shingle, which is one shingle of all its words.
    ends = np.cumsum(counts)
    for n in np.flatnonzero((counts > 0) & (counts < shingle_size)):
        keys.append((np.uint64(n) << np.uint64(32)) | _combine(hashes[ends[n] - counts[n] : ends[n]], int(counts[n])))
    distinct = _distinct(np.concatenate(keys))
    owner = (distinct >> np.uint64(32)).astype(np.int64)
    starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]]) if len(owner) else np.empty(0, dtype=np.int64)
    return owner[starts], distinct & _LOW32, np.r_[starts, len(distinct)]


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The multipliers (odd) and increments of `num_perm` multiply-shift hash functions."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 1 << 64, size=num_perm, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 1 << 64, size=num_perm, dtype=np.uint64)
    return a, b


def minhashes(values: np.ndarray, offsets: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(sets, num_perm) uint32: the MinHash signature of each non-empty set of 32-bit hashes, the sets
    given end to end in `values` with set `k` at `values[offsets[k]:offsets[k + 1]]`.

    Taken a slice of `values` at a time, so the (num_perm x slice) intermediate stays small
    whatever the sets' sizes; a set cut by a slice's edge gets the minimum of its two pieces.
    """
    signatures = np.full((len(offsets) - 1, len(a)), 0xFFFFFFFF, dtype=np.uint64)
    step = max(1, _CHUNK_ELEMENTS // len(a))
    for begin in range(0, len(values), step):
        end = min(begin + step, len(values))
        first = int(np.searchsorted(offsets, begin, side="right")) - 1
        last = int(np.searchsorted(offsets, end, side="left"))
        hashed = np.multiply(a[:, None], values[None, begin:end])  # wraps modulo 2^64, as meant
        hashed += b[:, None]
        hashed >>= np.uint64(32)
        starts = np.maximum(offsets[first:last], begin) - begin
        least = np.minimum.reduceat(hashed, starts, axis=1).T
        np.minimum(signatures[first:last], least, out=signatures[first:last])
    return signatures.astype(np.uint32)


def signatures(texts: Sequence[str], shingle_size: int, num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(signatures of shape (n, num_perm), whether each text had any word at all)."""
    a, b = permutations(num_perm, seed)
    out = np.full((len(texts), num_perm), 0xFFFFFFFF, dtype=np.uint32)
    present, values, offsets = shingle_sets(texts, shingle_size)
    out[present] = minhashes(values, offsets, a, b)
    has_words = np.zeros(len(texts), dtype=bool)
    has_words[present] = True
    return out, has_words


# ----------------------------------------------------------------------------------------------
# LSH parameters

# Probability, at most, that a pair whose Jaccard similarity is exactly the threshold shares no band.
MAX_MISS_AT_THRESHOLD = 0.01


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows): the most rows per band (the fewest chance candidates) with which a pair at
    `threshold` is a candidate with probability at least `1 - MAX_MISS_AT_THRESHOLD`; one row per
    band when even that misses more often."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if (1 - threshold**rows) ** bands <= MAX_MISS_AT_THRESHOLD:
            return bands, rows
    return num_perm, 1


# ----------------------------------------------------------------------------------------------
# clustering


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n)

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = int(self.parent[root])
        while self.parent[x] != root:
            self.parent[x], x = root, int(self.parent[x])
        return root

    def union(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        # The smaller index becomes the root, so a cluster's root is its first document.
        if rx < ry:
            self.parent[ry] = rx
        elif ry < rx:
            self.parent[rx] = ry


@dataclass
class NearDuplicates:
    bands: int
    rows: int
    keep: np.ndarray
    """True for documents that survive."""
    kept_of: list[int | None]
    """For each removed document, the index of its cluster's surviving document."""
    similarity: list[float | None]
    """For each removed document, the exact Jaccard similarity of its shingles to that survivor's."""
    clusters: list[list[int]] = field(default_factory=list)
    """Clusters of two or more documents, each sorted, in order of their first member."""
    candidate_pairs: int = 0
    verified_pairs: int = 0


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, bands) uint64: a hash of each band of each signature. Documents that share a band share its
    key; two bands that merely collide only add a candidate, which verification then drops."""
    keys = np.empty((len(sigs), bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for band in range(bands):
            key = np.full(len(sigs), band + 1, dtype=np.uint64)
            for column in range(band * rows, (band + 1) * rows):
                key = _mix64(key * _MULTIPLIER ^ sigs[:, column].astype(np.uint64))
            keys[:, band] = key
    return keys


def candidate_pairs(sigs: np.ndarray, active: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """Unique (i, j), i < j, pairs of active documents that share at least one band."""
    index = np.flatnonzero(active)
    keys = band_keys(sigs[index], bands, rows)
    band_of = np.broadcast_to(np.arange(bands, dtype=np.uint64), keys.shape)
    members = np.broadcast_to(index[:, None], keys.shape)
    return pairs_in_groups(keys.ravel(), band_of.ravel(), members.ravel(), neighbours=True)


def clusters_of(verified: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(removed, kept): for each document joined to an earlier one by the verified pairs, itself and
    its cluster's first document (the one kept), in document order."""
    nodes, inverse = np.unique(verified, return_inverse=True)
    forest = _UnionFind(len(nodes))
    for i, j in inverse.reshape(-1, 2):
        forest.union(int(i), int(j))
    roots = np.array([forest.find(i) for i in range(len(nodes))], dtype=np.int64)
    removed = np.flatnonzero(roots != np.arange(len(nodes)))
    return nodes[removed].astype(np.int64), nodes[roots[removed]].astype(np.int64)


# A tiny tolerance: a threshold such as 0.7 is not exactly representable as a ratio of counts.
VERIFY_TOLERANCE = 1e-9


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sets of distinct shingle hashes."""
    shared = len(np.intersect1d(a, b, assume_unique=True))
    union = len(a) + len(b) - shared
    return shared / union if union else 0.0


ShingleSets = Callable[[np.ndarray], Sequence[np.ndarray]]
"""Given sorted document indexes, their shingle sets (`shingle_hashes`) in the same order."""


def shingles_of(texts: Sequence[str], shingle_size: int) -> ShingleSets:
    """Shingle sets computed in this process, from texts at hand."""
    return lambda indexes: [shingle_hashes(texts[i], shingle_size) for i in indexes]


def near_duplicates(
    sigs: np.ndarray, active: np.ndarray, threshold: float, shingle_sets: ShingleSets
) -> NearDuplicates:
    """Cluster documents by MinHash LSH; `active` is False for documents without any shingle.

    Only the documents of candidate pairs have their shingle sets computed, for the exact check.
    """
    n, num_perm = sigs.shape
    bands, rows = lsh_bands(threshold, num_perm)
    pairs = candidate_pairs(sigs, active, bands, rows) if n else np.empty((0, 2), dtype=np.int64)
    members = np.unique(pairs)
    shingles = dict(zip(members.tolist(), shingle_sets(members), strict=True)) if len(members) else {}
    similarities = np.array([jaccard(shingles[int(i)], shingles[int(j)]) for i, j in pairs])
    verified = pairs[similarities >= threshold - VERIFY_TOLERANCE] if len(pairs) else pairs
    removed, kept = clusters_of(verified)
    keep = np.ones(n, dtype=bool)
    keep[removed] = False
    kept_of: list[int | None] = [None] * n
    similarity: list[float | None] = [None] * n
    members_of: dict[int, list[int]] = {}
    for i, root in zip(removed.tolist(), kept.tolist(), strict=True):
        kept_of[i] = root
        similarity[i] = jaccard(shingles[i], shingles[root])
        members_of.setdefault(root, [root]).append(i)
    clusters = [sorted(m) for _, m in sorted(members_of.items())]
    return NearDuplicates(
        bands=bands, rows=rows, keep=keep, kept_of=kept_of, similarity=similarity, clusters=clusters,
        candidate_pairs=len(pairs), verified_pairs=len(verified),
    )

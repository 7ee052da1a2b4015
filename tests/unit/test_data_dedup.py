"""Exact and MinHash-LSH near-duplicate removal."""

from __future__ import annotations

import random

import numpy as np
import pytest

from kubeforge.data import dedup
from kubeforge.data.dedup import (
    MAX_MISS_AT_THRESHOLD,
    exact_duplicates,
    lsh_bands,
    minhashes,
    near_duplicates,
    permutations,
    shingle_hashes,
    shingle_sets,
    shingles_of,
    signatures,
)

pytestmark = pytest.mark.unit


def _document(rng: random.Random, words: int = 400) -> str:
    vocabulary = [f"w{i}" for i in range(5000)]
    return " ".join(rng.choice(vocabulary) for _ in range(words))


def _perturb(text: str, rng: random.Random, fraction: float) -> str:
    words = text.split()
    for _ in range(int(len(words) * fraction)):
        position = rng.randrange(len(words))
        action = rng.random()
        if action < 1 / 3:
            words[position] = f"changed{rng.randrange(10**6)}"
        elif action < 2 / 3:
            words.insert(position, f"inserted{rng.randrange(10**6)}")
        else:
            del words[position]
    return " ".join(words)


def test_exact_duplicates_keep_first_occurrence() -> None:
    keep, original = exact_duplicates(["a", "b", "a", "c", "b", "a"])
    assert keep.tolist() == [True, True, False, True, False, False]
    assert original == [None, None, 0, None, 1, 0]


@pytest.mark.parametrize(("threshold", "num_perm", "expected"), [
    (0.7, 128, (32, 4)), (0.5, 128, (42, 3)), (0.8, 128, (21, 6)), (0.9, 256, (18, 14)),
])
def test_bands_catch_a_pair_at_the_threshold_with_the_fewest_chance_candidates(
    threshold: float, num_perm: int, expected: tuple[int, int]
) -> None:
    bands, rows = lsh_bands(threshold, num_perm)
    assert (bands, rows) == expected and bands * rows <= num_perm
    assert (1 - threshold**rows) ** bands <= MAX_MISS_AT_THRESHOLD
    # One more row per band would miss pairs at the threshold more often than allowed.
    assert (1 - threshold ** (rows + 1)) ** (num_perm // (rows + 1)) > MAX_MISS_AT_THRESHOLD


def _near(texts: list[str], threshold: float = 0.7, num_perm: int = 128):  # type: ignore[no-untyped-def]
    sigs, has_words = signatures(texts, shingle_size=5, num_perm=num_perm, seed=1)
    return near_duplicates(sigs, has_words, threshold, shingles_of(texts, 5))


def _jaccard(a: str, b: str) -> float:
    from kubeforge.data.dedup import jaccard, shingle_hashes

    return jaccard(shingle_hashes(a, 5), shingle_hashes(b, 5))


def test_pairs_just_above_and_below_the_threshold_are_told_apart_exactly() -> None:
    # Copies whose true Jaccard similarity sits within a few points of the threshold, where the
    # signature's estimate (standard error about 0.04 at 128 permutations) cannot tell them apart.
    rng = random.Random(3)
    originals = [_document(rng, words=600) for _ in range(40)]
    copies, truth = [], []
    for original in originals:
        copy = _perturb(original, rng, 0.04)
        copies.append(copy)
        truth.append(_jaccard(original, copy))
    assert sum(0.65 <= j < 0.7 for j in truth) >= 5 and sum(0.7 <= j < 0.75 for j in truth) >= 5
    found = _near(originals + copies)
    removed = [not keep for keep in found.keep[40:]]
    assert removed == [j >= 0.7 for j in truth]
    assert all(found.similarity[40 + k] == pytest.approx(truth[k]) for k in range(40) if removed[k])


def test_signature_agreement_estimates_jaccard() -> None:
    shared = " ".join(f"s{i}" for i in range(300))
    a = shared + " " + " ".join(f"a{i}" for i in range(100))
    b = shared + " " + " ".join(f"b{i}" for i in range(100))
    sigs, has_words = signatures([a, b], shingle_size=1, num_perm=512, seed=3)
    assert has_words.all()
    # |A ∩ B| / |A ∪ B| = 300 / 500
    assert (sigs[0] == sigs[1]).mean() == pytest.approx(0.6, abs=0.07)


def test_planted_near_duplicates_removed_distinct_kept() -> None:
    rng = random.Random(7)
    originals = [_document(rng) for _ in range(30)]
    # 1% of words edited touches about 5% of the 5-word shingles: Jaccard near 0.9.
    copies = [_perturb(originals[i], rng, 0.01) for i in range(10)]
    texts = originals + copies
    found = _near(texts)
    assert found.keep[:30].all(), "a distinct document was removed"
    assert not found.keep[30:].any(), "a planted near-duplicate survived"
    assert found.kept_of[30:] == list(range(10))
    assert all(s is not None and s >= 0.7 for s in found.similarity[30:])
    assert found.clusters == [[i, 30 + i] for i in range(10)]


def test_cluster_keeps_first_document_in_corpus_order() -> None:
    rng = random.Random(11)
    base = _document(rng)
    copy_first = _perturb(base, rng, 0.02)
    texts = [_document(rng), copy_first, base, _perturb(base, rng, 0.02)]
    found = _near(texts)
    assert found.keep.tolist() == [True, True, False, False]
    assert found.kept_of == [None, None, 1, 1]


def test_heavily_edited_copy_is_not_a_duplicate() -> None:
    rng = random.Random(5)
    base = _document(rng)
    assert _near([base, _perturb(base, rng, 0.4)]).keep.all()


def test_documents_without_words_never_cluster() -> None:
    texts = ["...", "!!!", "real words here"]
    _, has_words = signatures(texts, shingle_size=5, num_perm=64, seed=1)
    assert has_words.tolist() == [False, False, True]
    assert _near(texts, threshold=0.5, num_perm=64).keep.all()


def test_a_batch_of_shingle_sets_is_each_texts_own() -> None:
    rng = random.Random(13)
    # Texts shorter than one shingle, without words, and ending in the words the next one starts with:
    # no shingle may span two texts.
    texts = ["", "one two", "...", _document(rng, 30), "w1 w2 w3 w4 w5 w6", "w7 w8 w9", "Word word WORD", "solo"]
    present, values, offsets = shingle_sets(texts, 5)
    expected = [n for n, text in enumerate(texts) if len(shingle_hashes(text, 5))]
    assert present.tolist() == expected == [1, 3, 4, 5, 6, 7]
    for k, n in enumerate(present):
        assert values[offsets[k] : offsets[k + 1]].tolist() == shingle_hashes(texts[n], 5).tolist()


def test_ascii_texts_split_into_the_same_words_as_the_regex() -> None:
    # The fast path for ASCII text must agree with `\\w+` on underscores, digits and punctuation; the
    # non-word "∎" sends the second text down the regex path without adding a word.
    ascii_text = "Alpha beta_gamma, DELTA-7 (epsilon)! zeta's_9 eta\tTHETA\n"
    assert dedup._words(ascii_text) == [b"alpha", b"beta_gamma", b"delta", b"7", b"epsilon", b"zeta", b"s_9", b"eta",
                                        b"theta"]
    assert shingle_hashes(ascii_text, 3).tolist() == shingle_hashes(ascii_text + " ∎", 3).tolist()


def test_minhashes_are_each_sets_minimum_whatever_the_slicing(monkeypatch: pytest.MonkeyPatch) -> None:
    sets = [[5, 9, 1 << 31], [7], [3, 4, 5, 6, 8, 0xFFFFFFFF], [2, 11]]
    a, b = permutations(4, seed=2)
    expected = [
        [min(((int(a[i]) * x + int(b[i])) % (1 << 64)) >> 32 for x in values) for i in range(4)] for values in sets
    ]
    values = np.array([x for values in sets for x in values], dtype=np.uint64)
    offsets = np.cumsum([0, *map(len, sets)])
    for elements in (1 << 20, 4 * 3, 4):  # all at once; slices that cut sets; one value a slice
        monkeypatch.setattr(dedup, "_CHUNK_ELEMENTS", elements)
        assert minhashes(values, offsets, a, b).tolist() == expected


def test_seed_changes_signatures_deterministically() -> None:
    text = ["one two three four five six seven"]
    first, _ = signatures(text, 3, 64, seed=1)
    again, _ = signatures(text, 3, 64, seed=1)
    other, _ = signatures(text, 3, 64, seed=2)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)

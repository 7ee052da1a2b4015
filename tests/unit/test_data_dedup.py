"""Exact and MinHash-LSH near-duplicate removal."""

from __future__ import annotations

import random

import numpy as np
import pytest

from kubeforge.data.dedup import exact_duplicates, near_duplicates, optimal_bands, signatures

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


def test_optimal_bands_match_datasketch() -> None:
    # Values datasketch 1.6.5's _optimal_param(threshold, num_perm, 0.5, 0.5) returns.
    assert optimal_bands(0.7, 128) == (14, 9)
    assert optimal_bands(0.5, 128) == (25, 5)
    assert optimal_bands(0.8, 128) == (9, 13)
    assert optimal_bands(0.9, 256) == (9, 28)


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
    sigs, has_words = signatures(texts, shingle_size=5, num_perm=128, seed=1)
    found = near_duplicates(sigs, has_words, threshold=0.7)
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
    sigs, has_words = signatures(texts, shingle_size=5, num_perm=128, seed=1)
    found = near_duplicates(sigs, has_words, threshold=0.7)
    assert found.keep.tolist() == [True, True, False, False]
    assert found.kept_of == [None, None, 1, 1]


def test_heavily_edited_copy_is_not_a_duplicate() -> None:
    rng = random.Random(5)
    base = _document(rng)
    texts = [base, _perturb(base, rng, 0.4)]
    sigs, has_words = signatures(texts, shingle_size=5, num_perm=128, seed=1)
    assert near_duplicates(sigs, has_words, threshold=0.7).keep.all()


def test_documents_without_words_never_cluster() -> None:
    sigs, has_words = signatures(["...", "!!!", "real words here"], shingle_size=5, num_perm=64, seed=1)
    assert has_words.tolist() == [False, False, True]
    found = near_duplicates(sigs, has_words, threshold=0.5)
    assert found.keep.all()


def test_seed_changes_signatures_deterministically() -> None:
    text = ["one two three four five six seven"]
    first, _ = signatures(text, 3, 64, seed=1)
    again, _ = signatures(text, 3, 64, seed=1)
    other, _ = signatures(text, 3, 64, seed=2)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)

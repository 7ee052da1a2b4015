"""Heuristic quality rules in the style of Gopher (Rae et al., 2021) and C4.

Words are whitespace-separated tokens, as in Gopher. Every rule is a field of `QualityStep`; a
null (or, for the n-gram rules, an absent `n`) switches it off. A document is removed by the first
rule it fails, and that rule's name is recorded as the reason, so the data card can say which
rule removed how much.

The word n-gram rules are computed for a whole batch of documents at once (`quality_batch`): on
documents of a few hundred words, per-document array operations would cost more in call overhead
than in work. The per-document functions are the batch computation on a batch of one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np

from kubeforge.spec.data import QualityStep

_SYMBOL = re.compile(r"[^\w\s]|_")
_DIGIT = re.compile(r"\d")
# A whitespace-separated word with at least one letter, found in one pass over the text.
_ALPHA_WORD = re.compile(r"(?<!\S)(?=\S*?[^\W\d_])\S+")

_Ints = np.ndarray[Any, np.dtype[np.int64]]
_Floats = np.ndarray[Any, np.dtype[np.float64]]
_Bools = np.ndarray[Any, np.dtype[np.bool_]]


# On ASCII text (most of any corpus) the character rules are counted with `bytes.translate`, which
# deletes the bytes a rule does not count: several times faster than a regex scan. The tables are
# built from the regexes themselves, so both paths count the same characters.
_ASCII = [chr(c) for c in range(128)]
_NOT_SYMBOL = "".join(c for c in _ASCII if not _SYMBOL.fullmatch(c)).encode("ascii")
_NOT_DIGIT = "".join(c for c in _ASCII if not _DIGIT.fullmatch(c)).encode("ascii")
# Letters stay, whitespace (as `str.split` knows it) becomes a space, anything else goes: what is left
# of a word is empty exactly when it has no letter.
_LETTERS_AND_SPACES = bytes(ord(" ") if chr(c).isspace() else c for c in range(256))
_NOT_LETTER_OR_SPACE = "".join(c for c in _ASCII if not (c.isspace() or re.fullmatch(r"[^\W\d_]", c))).encode("ascii")


def symbol_ratio(text: str) -> float:
    """Share of characters that are neither letters, digits nor whitespace."""
    if not text:
        return 0.0
    if text.isascii():
        return len(text.encode("ascii").translate(None, _NOT_SYMBOL)) / len(text)
    return len(_SYMBOL.findall(text)) / len(text)


def digit_ratio(text: str) -> float:
    if not text:
        return 0.0
    if text.isascii():
        return len(text.encode("ascii").translate(None, _NOT_DIGIT)) / len(text)
    return _DIGIT.subn("", text)[1] / len(text)


def alpha_word_fraction(text: str, words: list[str]) -> float:
    """Share of the text's words (`words`, its whitespace-separated tokens) with at least one letter; a
    text without words has none."""
    if not words:
        return 0.0
    if text.isascii():
        return len(text.encode("ascii").translate(_LETTERS_AND_SPACES, _NOT_LETTER_OR_SPACE).split()) / len(words)
    return len(_ALPHA_WORD.findall(text)) / len(words)


def duplicate_line_fraction(text: str) -> float:
    """Share of non-blank lines equal (ignoring surrounding whitespace) to an earlier line."""
    lines = [line.strip() for line in text.split("\n")]
    lines = [line for line in lines if line]
    return (len(lines) - len(set(lines))) / len(lines) if lines else 0.0


@dataclass(frozen=True)
class _Grams:
    """The word n-grams of a batch, for one n, that occur at least twice in their document."""

    starts: _Ints
    """Position of each occurrence's first word, ascending."""
    ids: _Ints
    """Id of the n-gram at each start: 0, 1, ... in order of first appearance in the batch."""
    at: _Ints
    """`ids` indexed by position, -1 where no n-gram that occurs twice starts."""
    new: _Bools
    """Whether each start is the first occurrence of its n-gram in its document."""


class _Batch:
    """The words of several documents laid end to end, for n-gram statistics over all of them at once.

    N-gram ids are per document: the same words in two documents get different ids, so counting ids
    counts within a document. Ids are numbered in order of first appearance, so a document's ids are
    all larger than any earlier document's, and an occurrence repeats an earlier one exactly when its
    id is at most the largest id before it.
    """

    def __init__(self, documents: list[list[str]]) -> None:
        import pandas as pd

        counts = np.fromiter(map(len, documents), dtype=np.int64, count=len(documents))
        self.size = int(counts.sum())
        self.documents = len(documents)
        words = np.fromiter(chain.from_iterable(documents), dtype=object, count=self.size)
        # Hashing rather than sorting: the words are many and only ever compared for equality.
        word_ids, distinct = pd.factorize(words)
        self.word_ids: _Ints = word_ids.astype(np.int64, copy=False)
        self.distinct = len(distinct)
        self.lengths: _Ints = np.fromiter(map(len, distinct), dtype=np.int64, count=len(distinct))[self.word_ids]
        self.document: _Ints = np.repeat(np.arange(self.documents, dtype=np.int64), counts)
        ends = np.cumsum(counts)
        self.end: _Ints = np.repeat(ends, counts)  # of each word's document
        self.before: _Ints = np.concatenate(([0], np.cumsum(self.lengths)))  # characters before each word
        self.totals: _Ints = np.diff(self.before[ends], prepend=0)
        self._grams: dict[int, _Grams] = {}

    def grams(self, n: int) -> _Grams:
        import pandas as pd

        if n < 1:
            raise ValueError(f"n-grams need n >= 1, got {n}")
        if n not in self._grams:
            if n == 1:
                places = np.arange(self.size, dtype=np.int64)
                keys = self.document * self.distinct + self.word_ids
            else:
                # An n-gram occurs twice only if both its halves do, so only there does it need an id; a
                # pair of half ids (each below `size`) fits one int64.
                half = n // 2
                left, right = self.grams(n - half), self.grams(half)
                places = left.starts[left.starts + n <= self.end[left.starts]]
                places = places[right.at[places + n - half] >= 0]
                keys = left.at[places] * self.size + right.at[places + n - half]
            ids = pd.factorize(keys)[0].astype(np.int64, copy=False)
            repeated = np.bincount(ids) >= 2
            kept = repeated[ids]
            starts = places[kept]
            ids = (np.cumsum(repeated) - 1)[ids[kept]]
            at = np.full(self.size, -1, dtype=np.int64)
            at[starts] = ids
            new = np.ones(len(ids), dtype=np.bool_)
            new[1:] = ids[1:] > np.maximum.accumulate(ids)[:-1]
            self._grams[n] = _Grams(starts, ids, at, new)
        return self._grams[n]

    def covered_fraction(self, starts: _Ints, n: int) -> _Floats:
        """Per document, the share of word characters inside the n-grams starting at `starts` (ascending),
        each word counted once."""
        # Each n-gram covers words up to the next one's start; one that starts in a later document does
        # so beyond this n-gram's end, as no n-gram crosses a document's end.
        ends = np.minimum(starts + n, np.append(starts[1:], self.size))
        chars = self.before[ends] - self.before[starts]
        covered = np.bincount(self.document[starts], weights=chars, minlength=self.documents)
        fractions: _Floats = covered / np.maximum(self.totals, 1)
        return fractions

    def top_ngram_fractions(self, n: int) -> _Floats:
        grams = self.grams(n)
        first = grams.starts[grams.new]  # indexed by id, as ids are numbered in order of first appearance
        counts = np.bincount(grams.ids, minlength=len(first))
        documents = self.document[first]
        chars = self.before[first + n] - self.before[first]
        # Ascending by document, count, characters and then latest first occurrence, so that each
        # document's chosen n-gram is the last of its run.
        order = np.lexsort((-np.arange(len(first)), chars, counts, documents))
        last = np.ones(len(order), dtype=np.bool_)
        last[:-1] = documents[order][1:] != documents[order][:-1]
        chosen = np.zeros(len(first), dtype=np.bool_)
        chosen[order[last]] = True
        return self.covered_fraction(grams.starts[chosen[grams.ids]], n)

    def duplicate_ngram_fractions(self, n: int) -> _Floats:
        grams = self.grams(n)
        return self.covered_fraction(grams.starts[~grams.new], n)


def top_ngram_fraction(words: list[str], n: int) -> float:
    """Share of word characters covered by the occurrences of the most frequent word n-gram.

    An n-gram that occurs once does not count. Ties go to the n-gram with more characters, then to
    the one whose first occurrence comes first. Overlapping occurrences mark each word once.
    """
    return float(_Batch([words]).top_ngram_fractions(n)[0])


def duplicate_ngram_fraction(words: list[str], n: int) -> float:
    """Share of word characters inside word n-grams that already occurred earlier in the text.

    Overlapping duplicate n-grams mark each word once, so the fraction never exceeds 1.
    """
    return float(_Batch([words]).duplicate_ngram_fractions(n)[0])


def _failed_text_rule(text: str, words: list[str], step: QualityStep) -> str | None:
    """Name of the first rule other than the word n-gram rules that the text fails, or None."""
    length = len(text)
    if step.min_chars is not None and length < step.min_chars:
        return "min_chars"
    if step.max_chars is not None and length > step.max_chars:
        return "max_chars"
    if step.max_symbol_ratio is not None and symbol_ratio(text) > step.max_symbol_ratio:
        return "max_symbol_ratio"
    if step.max_digit_ratio is not None and digit_ratio(text) > step.max_digit_ratio:
        return "max_digit_ratio"
    if step.min_alpha_word_fraction is not None and alpha_word_fraction(text, words) < step.min_alpha_word_fraction:
        return "min_alpha_word_fraction"
    line_limit = step.max_duplicate_line_fraction
    if line_limit is not None and duplicate_line_fraction(text) > line_limit:
        return "max_duplicate_line_fraction"
    return None


def quality_batch(texts: list[str], step: QualityStep) -> list[str | None]:
    """For each text, the name of the first rule it fails (e.g. `max_top_ngram_fraction[2]`), or None."""
    words = [text.split() for text in texts]
    reasons = [_failed_text_rule(text, split, step) for text, split in zip(texts, words, strict=True)]
    pending = [index for index, reason in enumerate(reasons) if reason is None]
    if not pending or not (step.max_top_ngram_fraction or step.max_duplicate_ngram_fraction):
        return reasons
    batch = _Batch([words[index] for index in pending])
    rules = [
        (f"max_top_ngram_fraction[{n}]", limit, batch.top_ngram_fractions, n)
        for n, limit in sorted(step.max_top_ngram_fraction.items())
    ] + [
        (f"max_duplicate_ngram_fraction[{n}]", limit, batch.duplicate_ngram_fractions, n)
        for n, limit in sorted(step.max_duplicate_ngram_fraction.items())
    ]
    undecided = np.ones(len(pending), dtype=np.bool_)
    for name, limit, fractions, n in rules:
        failed = undecided & (fractions(n) > limit)
        for position in np.flatnonzero(failed):
            reasons[pending[position]] = name
        undecided &= ~failed
    return reasons


def failed_rule(text: str, step: QualityStep) -> str | None:
    """Name of the first rule the text fails (e.g. `max_top_ngram_fraction[2]`), or None if it passes."""
    return quality_batch([text], step)[0]

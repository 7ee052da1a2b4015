"""Heuristic quality rules in the style of Gopher (Rae et al., 2021) and C4.

Words are whitespace-separated tokens, as in Gopher. Every rule is a field of `QualityStep`; a
null (or, for the n-gram rules, an absent `n`) switches it off. A document is removed by the first
rule it fails, and that rule's name is recorded as the reason, so the data card can say which
rule removed how much.
"""

from __future__ import annotations

import re

import numpy as np

from kubeforge.spec.data import QualityStep

_SYMBOL = re.compile(r"[^\w\s]|_")
_DIGIT = re.compile(r"\d")
# A whitespace-separated word with at least one letter, found in one pass over the text.
_ALPHA_WORD = re.compile(r"(?<!\S)(?=\S*?[^\W\d_])\S+")


def symbol_ratio(text: str) -> float:
    """Share of characters that are neither letters, digits nor whitespace."""
    return len(_SYMBOL.findall(text)) / len(text) if text else 0.0


def digit_ratio(text: str) -> float:
    return _DIGIT.subn("", text)[1] / len(text) if text else 0.0


def alpha_word_fraction(text: str, words: list[str]) -> float:
    """Share of the text's words (`words`, its whitespace-separated tokens) with at least one letter; a
    text without words has none."""
    return len(_ALPHA_WORD.findall(text)) / len(words) if words else 0.0


def duplicate_line_fraction(text: str) -> float:
    """Share of non-blank lines equal (ignoring surrounding whitespace) to an earlier line."""
    lines = [line.strip() for line in text.split("\n")]
    lines = [line for line in lines if line]
    return (len(lines) - len(set(lines))) / len(lines) if lines else 0.0


class _Words:
    """A document's words as integer ids and character lengths, for vectorised n-gram statistics."""

    def __init__(self, words: list[str]) -> None:
        ids = {word: n for n, word in enumerate(dict.fromkeys(words))}
        self.ids = np.array([ids[w] for w in words], dtype=np.int64)
        self.lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        self.total = int(self.lengths.sum())
        self._grams: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def grams(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(first position of each distinct n-gram, distinct n-gram index of every position)."""
        if n not in self._grams:
            count = len(self.ids) - n + 1
            bits = max(1, int(self.ids.max()).bit_length())
            if bits * n <= 64:  # the n word ids packed side by side
                keys = self.ids[:count].astype(np.uint64)
                for k in range(1, n):
                    keys = (keys << np.uint64(bits)) | self.ids[k : k + count].astype(np.uint64)
            else:  # an n-gram is its two halves, each a distinct-gram index below 2^32
                half = n // 2
                left = self.grams(n - half)[1][:count].astype(np.uint64)
                right = self.grams(half)[1][n - half : n - half + count].astype(np.uint64)
                keys = (left << np.uint64(32)) | right
            _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
            self._grams[n] = (first, np.asarray(inverse).ravel())
        return self._grams[n]

    def covered_fraction(self, starts: np.ndarray, n: int) -> float:
        """Characters of the words inside n-grams starting at `starts`, each word counted once."""
        cover = np.zeros(len(self.ids) + 1, dtype=np.int64)
        np.add.at(cover, starts, 1)
        np.add.at(cover, starts + n, -1)
        inside = np.cumsum(cover[:-1]) > 0
        return float(self.lengths[inside].sum()) / self.total


def top_ngram_fraction(words: list[str] | _Words, n: int) -> float:
    """Share of word characters covered by the occurrences of the most frequent word n-gram.

    Ties go to the n-gram with more characters; an n-gram that occurs once does not count.
    """
    data = words if isinstance(words, _Words) else _Words(words)
    if data.total == 0 or len(data.ids) < n:
        return 0.0
    first, inverse = data.grams(n)
    counts = np.bincount(inverse, minlength=len(first))
    chars = np.convolve(data.lengths, np.ones(n, dtype=np.int64), mode="valid")[first]
    best = int(np.lexsort((chars, counts))[-1])
    if counts[best] < 2:
        return 0.0
    return data.covered_fraction(np.flatnonzero(inverse == best), n)


def duplicate_ngram_fraction(words: list[str] | _Words, n: int) -> float:
    """Share of word characters inside word n-grams that already occurred earlier in the text.

    Overlapping duplicate n-grams mark each word once, so the fraction never exceeds 1.
    """
    data = words if isinstance(words, _Words) else _Words(words)
    if data.total == 0 or len(data.ids) < n:
        return 0.0
    first, inverse = data.grams(n)
    repeats = np.flatnonzero(first[inverse] != np.arange(len(inverse)))
    return data.covered_fraction(repeats, n) if len(repeats) else 0.0


def failed_rule(text: str, step: QualityStep) -> str | None:
    """Name of the first rule the text fails (e.g. `max_top_ngram_fraction[2]`), or None if it passes."""
    length = len(text)
    if step.min_chars is not None and length < step.min_chars:
        return "min_chars"
    if step.max_chars is not None and length > step.max_chars:
        return "max_chars"
    if step.max_symbol_ratio is not None and symbol_ratio(text) > step.max_symbol_ratio:
        return "max_symbol_ratio"
    if step.max_digit_ratio is not None and digit_ratio(text) > step.max_digit_ratio:
        return "max_digit_ratio"
    words = text.split()
    if step.min_alpha_word_fraction is not None and alpha_word_fraction(text, words) < step.min_alpha_word_fraction:
        return "min_alpha_word_fraction"
    line_limit = step.max_duplicate_line_fraction
    if line_limit is not None and duplicate_line_fraction(text) > line_limit:
        return "max_duplicate_line_fraction"
    data = _Words(words)
    for n, limit in sorted(step.max_top_ngram_fraction.items()):
        if top_ngram_fraction(data, n) > limit:
            return f"max_top_ngram_fraction[{n}]"
    for n, limit in sorted(step.max_duplicate_ngram_fraction.items()):
        if duplicate_ngram_fraction(data, n) > limit:
            return f"max_duplicate_ngram_fraction[{n}]"
    return None


def quality_batch(texts: list[str], step: QualityStep) -> list[str | None]:
    return [failed_rule(t, step) for t in texts]

"""Normalisation and every quality rule."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from kubeforge.data.normalize import normalize_batch, normalize_text
from kubeforge.data.quality import (
    alpha_word_fraction,
    duplicate_line_fraction,
    duplicate_ngram_fraction,
    failed_rule,
    quality_batch,
    top_ngram_fraction,
)
from kubeforge.spec.data import NormalizeStep, QualityStep

pytestmark = pytest.mark.unit

# Every rule off: each test switches on exactly the rule it checks.
OFF = QualityStep(
    min_chars=None,
    max_chars=None,
    max_symbol_ratio=None,
    max_digit_ratio=None,
    min_alpha_word_fraction=None,
    max_duplicate_line_fraction=None,
    max_top_ngram_fraction={},
    max_duplicate_ngram_fraction={},
)
PROSE = "The quick brown fox jumps over the lazy dog while seven wizards quietly judge boxing contests nearby."


def only(**rule: object) -> QualityStep:
    return OFF.model_copy(update=rule)


def test_normalize_unicode_forms() -> None:
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    assert normalize_text(decomposed, NormalizeStep(unicode_form="NFC")) == composed
    assert normalize_text(composed, NormalizeStep(unicode_form="NFD")) == decomposed
    assert normalize_text("\ufb01le", NormalizeStep(unicode_form="NFKC")) == "file"
    assert normalize_text("\ufb01le", NormalizeStep(unicode_form="NFC")) == "\ufb01le"


def test_normalize_whitespace_and_blank_lines() -> None:
    text = "a  \r\nb\t\n\n\n\n\nc \n"
    assert normalize_text(text, NormalizeStep()) == "a\nb\n\n\nc\n"
    kept = normalize_text(text, NormalizeStep(strip_trailing_whitespace=False, max_consecutive_blank_lines=None))
    assert kept == "a  \nb\t\n\n\n\n\nc \n"
    assert normalize_text("x\n\n\n\ny", NormalizeStep(max_consecutive_blank_lines=0)) == "x\ny"


def test_normalize_batch_reports_changes() -> None:
    texts, changed = normalize_batch(["clean\n", "dirty  \n"], NormalizeStep())
    assert texts == ["clean\n", "dirty\n"]
    assert changed == [False, True]


def test_all_rules_off_keeps_anything() -> None:
    assert failed_rule("", OFF) is None
    assert failed_rule("%%%% 1234 1234 1234", OFF) is None


def test_min_and_max_chars() -> None:
    assert failed_rule("short", only(min_chars=10)) == "min_chars"
    assert failed_rule("long enough", only(min_chars=10)) is None
    assert failed_rule("x" * 11, only(max_chars=10)) == "max_chars"
    assert failed_rule("x" * 10, only(max_chars=10)) is None


def test_symbol_ratio() -> None:
    assert failed_rule("{}[]();: ab", only(max_symbol_ratio=0.5)) == "max_symbol_ratio"
    assert failed_rule(PROSE, only(max_symbol_ratio=0.05)) is None


def test_digit_ratio() -> None:
    assert failed_rule("0x00 0x01 0x02 0x03", only(max_digit_ratio=0.3)) == "max_digit_ratio"
    assert failed_rule(PROSE, only(max_digit_ratio=0.01)) is None


def test_alpha_word_fraction() -> None:
    assert alpha_word_fraction("abc 123\ta1  --", ["abc", "123", "a1", "--"]) == 0.5
    assert alpha_word_fraction("", []) == 0.0
    assert failed_rule("12 34 56 word", only(min_alpha_word_fraction=0.4)) == "min_alpha_word_fraction"
    assert failed_rule(PROSE, only(min_alpha_word_fraction=1.0)) is None


def test_duplicate_lines() -> None:
    text = "return x\n  return x\n\nreturn x\nother\n"
    assert duplicate_line_fraction(text) == pytest.approx(0.5)
    assert failed_rule(text, only(max_duplicate_line_fraction=0.4)) == "max_duplicate_line_fraction"
    assert failed_rule(text, only(max_duplicate_line_fraction=0.5)) is None


def test_top_ngram_fraction() -> None:
    words = ["spam", "eggs", "spam", "eggs", "spam", "eggs", "ham"]
    # "spam eggs" occurs 3 times and covers 6 of 7 words: 24 of 27 word characters.
    assert top_ngram_fraction(words, 2) == pytest.approx(24 / 27)
    assert top_ngram_fraction(PROSE.split(), 2) == 0.0
    text = " ".join(words)
    assert failed_rule(text, only(max_top_ngram_fraction={2: 0.5})) == "max_top_ngram_fraction[2]"
    assert failed_rule(text, only(max_top_ngram_fraction={2: 0.9})) is None


def test_duplicate_ngram_fraction() -> None:
    words = ["a", "b", "c", "d", "e", "a", "b", "c", "d", "e", "f"]
    # The second "a b c d e" repeats the first 5-gram: 5 of 11 word characters.
    assert duplicate_ngram_fraction(words, 5) == pytest.approx(5 / 11)
    assert duplicate_ngram_fraction(words, 6) == 0.0
    text = " ".join(words)
    assert failed_rule(text, only(max_duplicate_ngram_fraction={5: 0.4})) == "max_duplicate_ngram_fraction[5]"
    assert failed_rule(text, only(max_duplicate_ngram_fraction={5: 0.5, 6: 0.01})) is None


def test_default_rules_keep_ordinary_stdlib_modules() -> None:
    import json
    import textwrap

    for module in (textwrap, json):
        assert module.__file__ is not None
        with open(module.__file__, encoding="utf-8") as handle:
            assert failed_rule(handle.read(), QualityStep()) is None


def test_top_ngram_tie_goes_to_the_first_occurrence() -> None:
    # "a a" and "b c" both occur twice with 2 characters, but the overlapping "a a" covers 3 words of
    # 8 and "b c" covers 4: the one that occurs first is chosen.
    first_aa, first_bc = "a a a b c d b c", "b c d b c a a a"
    assert top_ngram_fraction(first_aa.split(), 2) == pytest.approx(3 / 8)
    assert top_ngram_fraction(first_bc.split(), 2) == pytest.approx(4 / 8)
    step = only(max_top_ngram_fraction={2: 0.45})
    assert quality_batch([first_aa, first_bc, first_aa], step) == [None, "max_top_ngram_fraction[2]", None]


def reference_fractions(words: list[str], n: int) -> tuple[float, float]:
    """Top and duplicate n-gram fractions straight from their definitions, one n-gram at a time."""
    total = sum(map(len, words))
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(grams)
    first: dict[tuple[str, ...], int] = {}
    for i, gram in enumerate(grams):
        first.setdefault(gram, i)

    def covered(starts: list[int]) -> float:
        inside = {i + k for i in starts for k in range(n)}
        return sum(len(words[i]) for i in inside) / total if total else 0.0

    repeated = [gram for gram, count in counts.items() if count >= 2]
    top = 0.0
    if repeated:
        best = max(repeated, key=lambda gram: (counts[gram], sum(map(len, gram)), -first[gram]))
        top = covered([i for i, gram in enumerate(grams) if gram == best])
    return top, covered([i for i, gram in enumerate(grams) if first[gram] != i])


def reference_failed_rule(text: str, step: QualityStep) -> str | None:
    """`failed_rule` with the n-gram rules from `reference_fractions`."""
    text_rules = step.model_copy(update={"max_top_ngram_fraction": {}, "max_duplicate_ngram_fraction": {}})
    if (reason := failed_rule(text, text_rules)) is not None:
        return reason
    words = text.split()
    for n, limit in sorted(step.max_top_ngram_fraction.items()):
        if reference_fractions(words, n)[0] > limit:
            return f"max_top_ngram_fraction[{n}]"
    for n, limit in sorted(step.max_duplicate_ngram_fraction.items()):
        if reference_fractions(words, n)[1] > limit:
            return f"max_duplicate_ngram_fraction[{n}]"
    return None


def random_documents(count: int) -> list[str]:
    rng = random.Random(0)
    vocabularies = [
        ["a", "b"],
        ["spam", "eggs", "ham", "é", "日本語", "naïve"],
        [f"w{i}" for i in range(40)],
        ["1234", "$$", "--", "x1", "café", "ok", "+", "7"],
    ]
    fixed = ["", " \n\t ", "one", "two words", "three small words", "a a a a", "日本語 日本語 日本語"]
    documents = list(fixed)
    while len(documents) < count:
        vocabulary = rng.choice(vocabularies)
        words = [rng.choice(vocabulary) for _ in range(rng.choice([1, 3, 6, 12, 40, 120]))]
        if rng.random() < 0.3:  # a passage repeated, so that the duplicate n-gram rules fire
            passage = ["".join(rng.choices("abcdefgh", k=rng.randrange(2, 7))) for _ in range(rng.randrange(5, 25))]
            words = [*words, *passage * rng.randrange(2, 4), *words]
        lines = [" ".join(words[i : i + 10]) for i in range(0, len(words), 10)]
        documents.append("\n".join(lines))
    return documents


def test_batch_matches_per_document_definitions() -> None:
    documents = random_documents(300)
    steps = [
        QualityStep(),
        QualityStep(min_chars=None, max_duplicate_line_fraction=None, min_alpha_word_fraction=None),
        only(max_top_ngram_fraction={3: 0.2, 4: 0.15}),
        only(max_top_ngram_fraction={4: 0.1}, max_duplicate_ngram_fraction={2: 0.5, 5: 0.3}),
        only(max_duplicate_ngram_fraction={5: 0.5, 10: 0.2}),
        only(max_duplicate_ngram_fraction={7: 0.2}),
    ]
    seen: set[str | None] = set()
    for step in steps:
        reasons = quality_batch(documents, step)
        assert reasons == [failed_rule(text, step) for text in documents]
        assert reasons == [reference_failed_rule(text, step) for text in documents]
        seen.update(reasons)
    assert {
        None,
        "min_chars",
        "max_symbol_ratio",
        "max_digit_ratio",
        "min_alpha_word_fraction",
        "max_duplicate_line_fraction",
        "max_top_ngram_fraction[2]",
        "max_top_ngram_fraction[3]",
        "max_top_ngram_fraction[4]",
        "max_duplicate_ngram_fraction[2]",
        "max_duplicate_ngram_fraction[5]",
        "max_duplicate_ngram_fraction[7]",
        "max_duplicate_ngram_fraction[10]",
    } <= seen


def test_ngram_fractions_match_definitions_on_short_and_repetitive_words() -> None:
    for text in random_documents(150):
        words = text.split()
        for n in (1, 2, 3, 5):
            assert (top_ngram_fraction(words, n), duplicate_ngram_fraction(words, n)) == reference_fractions(words, n)


def test_ascii_fast_path_counts_characters_as_the_regexes_do() -> None:
    from kubeforge.data import quality

    rng = random.Random(17)
    alphabet = [chr(c) for c in range(128)] + [" "] * 40 + list("abcXYZ019_") * 4
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 120))) for _ in range(400)]
    texts += ["word\x1cword", "a1 22 _x_ ..b"]
    for text in texts:
        words = text.split()
        assert quality.symbol_ratio(text) == len(quality._SYMBOL.findall(text)) / len(text), repr(text)
        assert quality.digit_ratio(text) == len(quality._DIGIT.findall(text)) / len(text), repr(text)
        expected = len(quality._ALPHA_WORD.findall(text)) / len(words) if words else 0.0
        assert alpha_word_fraction(text, words) == expected, repr(text)

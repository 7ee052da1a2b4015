"""Normalisation and every quality rule."""

from __future__ import annotations

import pytest

from kubeforge.data.normalize import normalize_batch, normalize_text
from kubeforge.data.quality import (
    alpha_word_fraction,
    duplicate_line_fraction,
    duplicate_ngram_fraction,
    failed_rule,
    top_ngram_fraction,
)
from kubeforge.spec.data import NormalizeStep, QualityStep

pytestmark = pytest.mark.unit

# Every rule off: each test switches on exactly the rule it checks.
OFF = QualityStep(
    min_chars=None, max_chars=None, max_symbol_ratio=None, max_digit_ratio=None, min_alpha_word_fraction=None,
    max_duplicate_line_fraction=None, max_top_ngram_fraction={}, max_duplicate_ngram_fraction={},
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

"""Unicode and whitespace normalisation (the first cleaning step, so later steps compare like with like)."""

from __future__ import annotations

import re
import unicodedata

from kubeforge.spec.data import NormalizeStep


def normalize_text(text: str, step: NormalizeStep) -> str:
    text = unicodedata.normalize(step.unicode_form, text)
    # Windows and old-Mac line ends would otherwise make identical files differ for exact dedup.
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if step.strip_trailing_whitespace:
        text = "\n".join(line.rstrip() for line in text.split("\n"))
    if step.max_consecutive_blank_lines is not None:
        keep = step.max_consecutive_blank_lines
        # A run of k blank lines is k+1 newlines (possibly with blanks between them).
        text = re.sub(rf"\n(?:[ \t]*\n){{{keep + 1},}}", "\n" * (keep + 1), text)
    return text


def normalize_batch(texts: list[str], step: NormalizeStep) -> tuple[list[str], list[bool]]:
    """Normalised texts and whether each one changed."""
    out = [normalize_text(t, step) for t in texts]
    return out, [a != b for a, b in zip(out, texts, strict=True)]

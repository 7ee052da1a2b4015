"""What makes two task examples the same, and which of train and test an example goes to.

Identical examples are dropped first (`normalise`d text compared), then each example goes to `test` when
a hash of its normalised *prompt* falls below `test_fraction`. The hash is not seeded, so an example's
split never changes between runs or seeds, and two examples with the same prompt (a property getter and
setter with the same docstring, two answers to one question) always land on the same side: nothing the
model is tested on was a training prompt.
"""

from __future__ import annotations

import hashlib
from typing import Any


def normalise(text: str) -> str:
    """Text with trailing whitespace and blank lines gone: formatting-only copies count as duplicates."""
    return "\n".join(line.rstrip() for line in text.split("\n") if line.strip())


def record_content(record: dict[str, Any], kind: str) -> str:
    """The fields that make a record what it is (its id aside), joined: equal contents are duplicates."""
    fields = ("instruction", "input", "output") if kind == "instruction" else ("prompt", "chosen", "rejected")
    return "\x00".join(str(record.get(name, "")) for name in fields)


def _split_position(key: str) -> float:
    """A uniform number in [0, 1) fixed by the example's normalised prompt (not seeded, on purpose)."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_by_prompt(
    records: list[dict[str, Any]], keys: list[str], test_fraction: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train and test by hash position. A tiny task whose hashes leave one side empty gets the example
    (and every example sharing its prompt) whose position lies closest to the other side, as the data
    stage does for its splits: a handful of hand-written examples still yields a test set."""
    positions = [_split_position(k) for k in keys]
    is_test = [u < test_fraction for u in positions]
    distinct = sorted(set(zip(positions, keys, strict=True)))
    if len(distinct) >= 2 and not any(is_test):
        moved = distinct[0][0]
        is_test = [u == moved for u in positions]
    elif len(distinct) >= 2 and all(is_test):
        moved = distinct[-1][0]
        is_test = [u != moved for u in positions]
    train = [r for r, t in zip(records, is_test, strict=True) if not t]
    test = [r for r, t in zip(records, is_test, strict=True) if t]
    return train, test

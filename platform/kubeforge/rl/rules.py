"""Rule rewards of generated completions (`spec.rl.rewards.rules`), each in [0, 1], checked as evaluate
scores them: the body must parse after the function's header, and the whole function must pass its
doctests in the sandbox (`kubeforge.sandbox`), where generated code cannot reach the network or write
outside a scratch folder."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubeforge.formats.functions import body_parses, function_header
from kubeforge.sandbox import DoctestCase, run_doctests


@dataclass(frozen=True)
class Completion:
    record: Mapping[str, Any]
    """The task record of its prompt (the built-in task's name the function: `entry_point`, `input`)."""
    text: str
    """The generated answer, up to the end of sequence."""
    tokens: int
    """Generated tokens, the end of sequence included."""
    finished: bool
    """It ended with an end-of-sequence token within max_new_tokens."""


def short(completions: Sequence[Completion], max_new_tokens: int) -> list[float]:
    return [1.0 - c.tokens / max_new_tokens if c.finished else 0.0 for c in completions]


def parses(completions: Sequence[Completion]) -> list[float]:
    return [float(body_parses(function_header(c.record), c.text)) for c in completions]


def doctests(completions: Sequence[Completion], timeout_s: float) -> list[float]:
    """1 for a function that passes its doctests; only bodies that parse are run (the rest cannot pass)."""
    runnable = [
        i for i, c in enumerate(completions)
        if c.record.get("has_doctests") and body_parses(function_header(c.record), c.text)
    ]
    outcomes = run_doctests(
        [DoctestCase.of_record(completions[i].record, function_header(completions[i].record) + completions[i].text)
         for i in runnable],
        timeout_s,
    )
    scores = [0.0] * len(completions)
    for index, outcome in zip(runnable, outcomes, strict=True):
        scores[index] = float(outcome.passed)
    return scores


def rule_rewards(
    completions: Sequence[Completion], rules: Sequence[str], max_new_tokens: int, doctest_timeout_s: float
) -> dict[str, list[float]]:
    """Each rule's reward of every completion (unweighted)."""
    scored: dict[str, list[float]] = {}
    for rule in rules:
        if rule == "short":
            scored[rule] = short(completions, max_new_tokens)
        elif rule == "parses":
            scored[rule] = parses(completions)
        elif rule == "doctests":
            scored[rule] = doctests(completions, doctest_timeout_s)
        else:
            raise ValueError(f"unknown rule reward '{rule}'")
    return scored

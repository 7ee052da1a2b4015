"""Promotion gates: pure checks of a candidate's metrics, with a report a person can act on."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kubeforge import stages
from kubeforge.spec.promotion import Gate
from kubeforge.stages.results import StageResult


@dataclass(frozen=True)
class GateOutcome:
    gate: Gate
    value: float | None
    champion: float | None
    passed: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "metric": self.gate.metric,
            "min": self.gate.min,
            "max": self.gate.max,
            "max_regression": self.gate.max_regression,
            "value": self.value,
            "champion": self.champion,
            "passed": self.passed,
            "detail": self.detail,
        }


class MissingMetric(Exception):
    """A gate names a metric its stage did not produce in this run (e.g. perplexity without a test split)."""


def candidate_value(gate: Gate, results: dict[str, StageResult]) -> tuple[float, float | None]:
    """The candidate's value of the gate's metric, and the champion's where the stage scored one."""
    result = results.get(gate.stage)
    if result is None:
        raise MissingMetric(f"{gate.metric}: the {gate.stage} stage did not run")
    value, champion = result.gate_values(gate.name)
    if value is None:
        raise MissingMetric(
            f"{gate.metric}: the {gate.stage} stage produced no value for it in this run "
            f"(it has: {', '.join(result.scored_metrics())})"
        )
    return value, champion


def check(gate: Gate, value: float, champion: float | None) -> GateOutcome:
    failures: list[str] = []
    notes: list[str] = []
    if gate.min is not None and value < gate.min:
        failures.append(f"{value:.6g} is below min {gate.min:g}")
    if gate.max is not None and value > gate.max:
        failures.append(f"{value:.6g} is above max {gate.max:g}")
    if gate.max_regression is not None:
        if champion is None:
            notes.append("no champion score to compare with")
        else:
            lower_better = gate.name in stages.lower_is_better()
            worse_by = (value - champion) if lower_better else (champion - value)
            relative = worse_by / abs(champion) if champion else (math.inf if worse_by > 0 else 0.0)
            verdict = f"{relative:+.2%} worse than the champion's {champion:.6g}" if relative > 0 else (
                f"{-relative:.2%} better than the champion's {champion:.6g}")
            if relative > gate.max_regression:
                failures.append(f"{value:.6g} is {verdict} (max {gate.max_regression:.2%})")
            else:
                notes.append(f"{value:.6g} is {verdict}")
    if not failures and not notes:
        notes.append(f"{value:.6g} within bounds")
    passed = not failures
    return GateOutcome(gate, value, champion, passed, "; ".join(failures or notes))


def evaluate_gates(gates: list[Gate], results: dict[str, StageResult]) -> list[GateOutcome]:
    """Check every gate (not just up to the first failure): the report must name each one that failed."""
    outcomes = []
    for gate in gates:
        try:
            value, champion = candidate_value(gate, results)
        except MissingMetric as exc:
            outcomes.append(GateOutcome(gate, None, None, False, str(exc)))
            continue
        outcomes.append(check(gate, value, champion))
    return outcomes


def report(outcomes: list[GateOutcome]) -> str:
    """A Markdown table of every gate and its verdict."""
    lines = ["| gate | value | champion | verdict |", "|---|---:|---:|---|"]
    for o in outcomes:
        bounds = ", ".join(
            f"{name} {value:g}" for name, value in
            (("min", o.gate.min), ("max", o.gate.max), ("max_regression", o.gate.max_regression)) if value is not None
        )
        value = "" if o.value is None else f"{o.value:.6g}"
        champion = "" if o.champion is None else f"{o.champion:.6g}"
        verdict = ("pass" if o.passed else "FAIL") + f": {o.detail}"
        lines.append(f"| {o.gate.metric} ({bounds}) | {value} | {champion} | {verdict} |")
    return "\n".join(lines) + "\n"

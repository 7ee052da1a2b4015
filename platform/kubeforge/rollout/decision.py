"""Rollout decisions, pure: judge analysis values, step a canary, conclude an A/B test.

Nothing here reads a clock, talks to Prometheus or Kubernetes, or writes a file: the caller (the local
`kubeforge rollout` loop or the operator) passes `now` in seconds, runs the queries of
`kubeforge.rollout.queries`, applies the returned `Action`, and persists `CanaryState.to_dict()`.

Canary rules (one analysis every `analysis.interval_s`, see `analysis_due`):

* a step completes at a *passing* analysis taken once the step's `pause_s` has elapsed; so it needs at
  least one pass during the step, and the newest evidence when traffic moves up is healthy. An
  inconclusive or failing analysis never completes a step, nor does a call without results;
* failed analyses are counted over the whole rollout, not per step and not consecutively (like Argo
  Rollouts' `failureLimit`, which counts every failed measurement of its analysis run): a candidate that
  flaps fail/pass/fail must not creep to 100% because every failure was followed by a pass;
* inconclusive analyses (no data, NaN) are counted consecutively; any conclusive analysis resets the
  streak. `inconclusive_limit` in a row rolls back rather than wait forever;
* the last step completing promotes (100% to the candidate); rolling back sends 0%;
* `promoted` and `rolled_back` are terminal: `advance` then returns Action "none".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from kubeforge.rollout.stats import ABComparison
from kubeforge.spec.deployment import ABRollout, Analysis, CanaryRollout

Verdict = Literal["pass", "fail", "inconclusive"]
Phase = Literal["progressing", "promoted", "rolled_back"]
ActionKind = Literal["set_weight", "promote", "rollback", "none"]

ERROR_RATE = "error_rate"
P95_LATENCY = "p95_latency_s"
P95_TTFT = "p95_ttft_s"
BUILTIN_CHECKS = (ERROR_RATE, P95_LATENCY, P95_TTFT)
"""Names of the built-in checks, in the order they are judged (and keys of the values passed to `judge`)."""

HISTORY_LIMIT = 50
"""Analysis records kept in `CanaryState.history`: the state lives in a Kubernetes status, and an object
in etcd is capped at 1.5 MiB, while a long rollout takes thousands of analyses."""

_PHASES: tuple[Phase, ...] = ("progressing", "promoted", "rolled_back")
_VERDICTS: tuple[Verdict, ...] = ("pass", "fail", "inconclusive")


@dataclass(frozen=True)
class CheckResult:
    name: str
    value: float | None
    """None when Prometheus had no data (an empty result or NaN); +/-inf are real values (and fail)."""
    min: float | None
    max: float | None
    verdict: Verdict
    detail: str
    """One line naming the value and the bound it was compared with."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": _float_out(self.value),
            "min": self.min,
            "max": self.max,
            "verdict": self.verdict,
            "detail": self.detail,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CheckResult:
        return cls(
            name=str(data["name"]),
            value=_float_in(data.get("value")),
            min=_float_in(data.get("min")),
            max=_float_in(data.get("max")),
            verdict=_literal(data["verdict"], _VERDICTS, "verdict"),
            detail=str(data.get("detail", "")),
        )


@dataclass(frozen=True)
class Action:
    """What the caller must do now: set the candidate's traffic share, promote, roll back, or nothing."""

    kind: ActionKind
    weight: int
    """Percent of traffic the candidate should receive after this action (current weight for "none")."""
    reason: str


@dataclass(frozen=True)
class AnalysisRecord:
    time: float
    step: int
    weight: int
    overall: Verdict
    results: tuple[CheckResult, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "step": self.step,
            "weight": self.weight,
            "overall": self.overall,
            "results": [r.to_dict() for r in self.results],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AnalysisRecord:
        return cls(
            time=float(data["time"]),
            step=int(data["step"]),
            weight=int(data["weight"]),
            overall=_literal(data["overall"], _VERDICTS, "overall"),
            results=tuple(CheckResult.from_dict(r) for r in data.get("results", [])),
        )


@dataclass(frozen=True)
class CanaryState:
    phase: Phase
    step: int
    """Index into `CanaryRollout.steps` of the step in progress (the last step once terminal)."""
    weight: int
    """Percent of traffic the candidate receives now."""
    step_started: float
    last_analysis: float | None
    failures: int
    """Failed analyses over the whole rollout."""
    inconclusive_streak: int
    """Inconclusive analyses in a row."""
    passed_in_step: int
    """Passing analyses during the current step."""
    history: tuple[AnalysisRecord, ...] = ()
    """The newest `HISTORY_LIMIT` analyses, oldest first."""
    reason: str = ""
    """Why the last transition happened (the rollback or promotion reason once terminal)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only (non-finite values as "+Inf"/"-Inf"), so `json.dumps(allow_nan=False)` works."""
        return {
            "phase": self.phase,
            "step": self.step,
            "weight": self.weight,
            "step_started": self.step_started,
            "last_analysis": self.last_analysis,
            "failures": self.failures,
            "inconclusive_streak": self.inconclusive_streak,
            "passed_in_step": self.passed_in_step,
            "history": [r.to_dict() for r in self.history],
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CanaryState:
        last = data.get("last_analysis")
        return cls(
            phase=_literal(data["phase"], _PHASES, "phase"),
            step=int(data["step"]),
            weight=int(data["weight"]),
            step_started=float(data["step_started"]),
            last_analysis=None if last is None else float(last),
            failures=int(data["failures"]),
            inconclusive_streak=int(data["inconclusive_streak"]),
            passed_in_step=int(data["passed_in_step"]),
            history=tuple(AnalysisRecord.from_dict(r) for r in data.get("history", [])),
            reason=str(data.get("reason", "")),
        )


# --- judging analysis values ---------------------------------------------------------------------------


def _bounds(analysis: Analysis) -> list[tuple[str, float | None, float | None]]:
    """(name, min, max) of every check the analysis asks for: built-ins with a threshold, then custom ones."""
    builtin = [
        (ERROR_RATE, analysis.max_error_rate),
        (P95_LATENCY, analysis.max_p95_latency_s),
        (P95_TTFT, analysis.max_p95_ttft_s),
    ]
    checks: list[tuple[str, float | None, float | None]] = [(n, None, m) for n, m in builtin if m is not None]
    checks.extend((c.name, c.min, c.max) for c in analysis.checks)
    return checks


def check_names(analysis: Analysis) -> list[str]:
    """Names `judge` expects values for (and `builtin_queries` returns queries for), in order."""
    return [name for name, _, _ in _bounds(analysis)]


def judge_value(name: str, value: float | None, low: float | None, high: float | None) -> CheckResult:
    """One check; bounds are inclusive (a value equal to `max` passes)."""
    if value is None or math.isnan(value):
        return CheckResult(name, None, low, high, "inconclusive", f"{name}: no data (empty result or NaN)")
    if high is not None and value > high:
        return CheckResult(name, value, low, high, "fail", f"{name} {_num(value)} > max {_num(high)}")
    if low is not None and value < low:
        return CheckResult(name, value, low, high, "fail", f"{name} {_num(value)} < min {_num(low)}")
    within = " and ".join(
        part for part in (
            f">= min {_num(low)}" if low is not None else "",
            f"<= max {_num(high)}" if high is not None else "",
        ) if part
    )
    return CheckResult(name, value, low, high, "pass", f"{name} {_num(value)} {within}")


def judge(analysis: Analysis, values: Mapping[str, float | None]) -> list[CheckResult]:
    """Judge every check of the analysis; a check whose value is missing, None or NaN is inconclusive."""
    return [judge_value(name, values.get(name), low, high) for name, low, high in _bounds(analysis)]


def overall(results: Sequence[CheckResult]) -> Verdict:
    """"fail" if any check failed, else "inconclusive" if any was; no results at all is no evidence."""
    verdicts = {r.verdict for r in results}
    if "fail" in verdicts:
        return "fail"
    if "inconclusive" in verdicts or not results:
        return "inconclusive"
    return "pass"


# --- the canary state machine -----------------------------------------------------------------------------


def start(policy: CanaryRollout, now: float) -> CanaryState:
    """The state at the first step; the caller sets the candidate's weight to `state.weight`."""
    first = policy.steps[0]
    return CanaryState(
        phase="progressing",
        step=0,
        weight=first.weight,
        step_started=now,
        last_analysis=None,
        failures=0,
        inconclusive_streak=0,
        passed_in_step=0,
        reason=f"step 1/{len(policy.steps)} at {first.weight}%",
    )


def analysis_due(policy: CanaryRollout, state: CanaryState, now: float) -> bool:
    """True once `interval_s` has passed since the last analysis or, for the first one, since the start:
    analysing right at the start would measure a window with almost no candidate traffic."""
    if state.phase != "progressing":
        return False
    since = state.step_started if state.last_analysis is None else max(state.step_started, state.last_analysis)
    return now - since >= policy.analysis.interval_s


def advance(
    policy: CanaryRollout, state: CanaryState, now: float, results: Sequence[CheckResult] | None
) -> tuple[CanaryState, Action]:
    """Record an analysis taken at `now` (`results`; None when no analysis ran) and decide what to do."""
    if state.phase != "progressing":
        return state, Action("none", state.weight, state.reason)
    if not 0 <= state.step < len(policy.steps):
        raise ValueError(f"canary state is at step {state.step + 1}, but the rollout has {len(policy.steps)} steps")
    if results is None:
        return state, Action("none", state.weight, "no analysis")

    verdict = overall(results)
    record = AnalysisRecord(now, state.step, state.weight, verdict, tuple(results))
    state = replace(state, last_analysis=now, history=(*state.history, record)[-HISTORY_LIMIT:])
    if verdict == "fail":
        return _on_fail(policy, state, results)
    if verdict == "inconclusive":
        return _on_inconclusive(policy, state, results)
    return _on_pass(policy, state, now)


def abort(state: CanaryState, reason: str) -> tuple[CanaryState, Action]:
    """Roll back on a person's request (`kubeforge rollout abort`); a terminal rollout stays as it is."""
    if state.phase != "progressing":
        return state, Action("none", state.weight, state.reason)
    return _rollback(state, f"aborted: {reason}")


def _on_fail(
    policy: CanaryRollout, state: CanaryState, results: Sequence[CheckResult]
) -> tuple[CanaryState, Action]:
    failures = state.failures + 1
    state = replace(state, failures=failures, inconclusive_streak=0)
    limit = policy.analysis.failure_limit
    failed = "; ".join(r.detail for r in results if r.verdict == "fail")
    if failures >= limit:
        return _rollback(state, f"{failures} failed analyses (failure_limit {limit}); last: {failed}")
    return state, Action("none", state.weight, f"analysis failed ({failures}/{limit}): {failed}")


def _on_inconclusive(
    policy: CanaryRollout, state: CanaryState, results: Sequence[CheckResult]
) -> tuple[CanaryState, Action]:
    streak = state.inconclusive_streak + 1
    state = replace(state, inconclusive_streak=streak)
    limit = policy.analysis.inconclusive_limit
    missing = "; ".join(r.detail for r in results if r.verdict == "inconclusive") or "no checks ran"
    if streak >= limit:
        reason = f"{streak} inconclusive analyses in a row (inconclusive_limit {limit}); last: {missing}"
        return _rollback(state, reason)
    return state, Action("none", state.weight, f"analysis inconclusive ({streak}/{limit} in a row): {missing}")


def _on_pass(policy: CanaryRollout, state: CanaryState, now: float) -> tuple[CanaryState, Action]:
    state = replace(state, inconclusive_streak=0, passed_in_step=state.passed_in_step + 1)
    step = policy.steps[state.step]
    elapsed = now - state.step_started
    if elapsed < step.pause_s:
        return state, Action("none", state.weight, f"analysis passed; step {state.step + 1} pauses "
                                                   f"{_num(step.pause_s - elapsed)}s more")
    done = f"step {state.step + 1}/{len(policy.steps)} at {state.weight}% passed"
    if state.step + 1 == len(policy.steps):
        reason = f"{done}: all steps passed, candidate promoted"
        return replace(state, phase="promoted", weight=100, reason=reason), Action("promote", 100, reason)
    nxt = policy.steps[state.step + 1]
    reason = f"{done}; step {state.step + 2}/{len(policy.steps)} at {nxt.weight}%"
    state = replace(state, step=state.step + 1, weight=nxt.weight, step_started=now, passed_in_step=0, reason=reason)
    return state, Action("set_weight", nxt.weight, reason)


def _rollback(state: CanaryState, reason: str) -> tuple[CanaryState, Action]:
    return replace(state, phase="rolled_back", weight=0, reason=reason), Action("rollback", 0, reason)


# --- A/B ----------------------------------------------------------------------------------------------


def ab_due(policy: ABRollout, started: float, now: float) -> bool:
    """True once the split has run for `duration_s`: only then is the comparison made (once)."""
    return now - started >= policy.duration_s


def ab_decide(policy: ABRollout, comparison: ABComparison) -> Action:
    """Conclude an A/B test from its comparison.

    * the candidate wins and `promote_winner` is set → promote (100%);
    * the stable variant wins → roll back (0%): a significantly worse candidate keeps no traffic, whatever
      `promote_winner` says, since that setting only allows acting on a *win*;
    * no significant difference, too few samples, or a win without `promote_winner` → "none": the split
      stays at `policy.weight` until a person promotes or aborts, because nothing justifies moving traffic.
    """
    what = f"{comparison.metric}: {comparison.reason}"
    if comparison.winner == "candidate" and policy.promote_winner:
        return Action("promote", 100, f"candidate won on {what}")
    if comparison.winner == "stable":
        return Action("rollback", 0, f"stable won on {what}")
    if comparison.winner == "candidate":
        return Action("none", policy.weight, f"candidate won on {what}; promote_winner is off")
    return Action("none", policy.weight, f"no winner on {what}")


# --- helpers ---------------------------------------------------------------------------------------------


def _num(value: float) -> str:
    return f"{value:.4g}"


def _float_out(value: float | None) -> float | str | None:
    """JSON has no infinities (and Kubernetes rejects NaN): write them the way Prometheus does."""
    if value is None or math.isfinite(value):
        return value
    return "+Inf" if value > 0 else "-Inf"


def _float_in(value: Any) -> float | None:
    return None if value is None else float(value)  # float() reads "+Inf" and "-Inf" too


def _literal(value: Any, allowed: tuple[str, ...], field: str) -> Any:
    if value not in allowed:
        raise ValueError(f"{field}: {value!r} is not one of {', '.join(allowed)}")
    return value

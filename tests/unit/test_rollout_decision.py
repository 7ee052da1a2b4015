"""The pure rollout decisions: judging analysis values, the canary state machine, concluding an A/B test."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from pydantic import ValidationError

from kubeforge.rollout.decision import (
    BUILTIN_CHECKS,
    HISTORY_LIMIT,
    Action,
    CanaryState,
    CheckResult,
    ab_decide,
    ab_due,
    abort,
    advance,
    analysis_due,
    judge,
    overall,
    start,
)
from kubeforge.rollout.stats import ABComparison, VariantSummary, Winner
from kubeforge.spec.deployment import ABRollout, Analysis, CanaryRollout

pytestmark = pytest.mark.unit

HEALTHY = {"error_rate": 0.001, "p95_latency_s": 0.2}
FAILING = {"error_rate": 0.05, "p95_latency_s": 0.2}
NO_DATA: dict[str, float | None] = {}

Values = Mapping[str, float | None]


def canary(steps: list[tuple[int, float]] | None = None, **analysis: Any) -> CanaryRollout:
    settings: dict[str, Any] = {
        "prometheus": "http://prometheus:9090",
        "interval_s": 30,
        "max_error_rate": 0.01,
        "max_p95_latency_s": 0.5,
        "failure_limit": 2,
        "inconclusive_limit": 3,
    }
    settings.update(analysis)
    return CanaryRollout.model_validate({
        "strategy": "canary",
        "candidate": "models:/quickstart/4",
        "steps": [{"weight": w, "pause_s": p} for w, p in (steps or [(10, 60), (50, 60), (100, 30)])],
        "analysis": settings,
    })


def walk(
    policy: CanaryRollout, values: Callable[[float], Values], until: float = 1000, tick: float = 10
) -> tuple[CanaryState, list[tuple[float, Action]]]:
    """Drive the state machine the way the operator does: wake every `tick`, analyse when due.
    Returns the final state and every action other than "none", with its time."""
    state, t, actions = start(policy, 0.0), 0.0, []
    while t < until and state.phase == "progressing":
        t += tick
        results = judge(policy.analysis, values(t)) if analysis_due(policy, state, t) else None
        state, action = advance(policy, state, t, results)
        if action.kind != "none":
            actions.append((t, action))
    return state, actions


# --- judge --------------------------------------------------------------------------------------------


def test_judge_compares_each_check_with_its_bound_and_names_both() -> None:
    analysis = Analysis.model_validate({
        "prometheus": "http://p:9090",
        "max_error_rate": 0.01,
        "max_p95_ttft_s": 0.3,
        "checks": [
            {"name": "tokens_per_s", "query": "x", "min": 5},
            {"name": "in_flight", "query": "y", "min": 0, "max": 8},
        ],
    })
    results = judge(analysis, {"error_rate": 0.01, "p95_ttft_s": 0.31, "tokens_per_s": 3, "in_flight": 2})
    assert [(r.name, r.verdict, r.min, r.max) for r in results] == [
        ("error_rate", "pass", None, 0.01),  # bounds are inclusive
        ("p95_ttft_s", "fail", None, 0.3),
        ("tokens_per_s", "fail", 5, None),
        ("in_flight", "pass", 0, 8),
    ]
    assert [r.detail for r in results] == [
        "error_rate 0.01 <= max 0.01",
        "p95_ttft_s 0.31 > max 0.3",
        "tokens_per_s 3 < min 5",
        "in_flight 2 >= min 0 and <= max 8",
    ]
    assert overall(results) == "fail"


def test_missing_none_or_nan_values_are_inconclusive_never_a_pass() -> None:
    analysis = canary().analysis
    results = judge(analysis, {"error_rate": float("nan")})  # p95_latency_s missing altogether
    assert [(r.name, r.value, r.verdict) for r in results] == [
        ("error_rate", None, "inconclusive"),
        ("p95_latency_s", None, "inconclusive"),
    ]
    assert results[0].detail == "error_rate: no data (empty result or NaN)"
    assert overall(judge(analysis, {"error_rate": 0.0, "p95_latency_s": None})) == "inconclusive"
    assert overall(judge(analysis, {"error_rate": 0.0, "p95_latency_s": 0.1})) == "pass"
    assert overall([]) == "inconclusive"


def test_an_infinite_quantile_is_a_value_and_fails() -> None:
    # histogram_quantile returns +Inf when the 95th percentile lies in the +Inf bucket: slow, not missing.
    [_, latency] = judge(canary().analysis, {"error_rate": 0.0, "p95_latency_s": math.inf})
    assert (latency.verdict, latency.value) == ("fail", math.inf)


def test_the_spec_reserves_the_builtin_check_names() -> None:
    for name in BUILTIN_CHECKS:
        with pytest.raises(ValidationError, match="taken by the built-in checks"):
            canary(checks=[{"name": name, "query": "x", "max": 1}])


# --- the canary state machine --------------------------------------------------------------------------


def test_healthy_analyses_walk_every_step_in_order_then_promote() -> None:
    state, actions = walk(canary(), lambda t: HEALTHY)
    assert [(t, a.kind, a.weight) for t, a in actions] == [
        (60, "set_weight", 50),
        (120, "set_weight", 100),
        (150, "promote", 100),
    ]
    assert actions[-1][1].reason == "step 3/3 at 100% passed: all steps passed, candidate promoted"
    assert (state.phase, state.weight, state.step, state.failures) == ("promoted", 100, 2, 0)
    assert [(r.time, r.step, r.weight, r.overall) for r in state.history] == [
        (30, 0, 10, "pass"), (60, 0, 10, "pass"), (90, 1, 50, "pass"), (120, 1, 50, "pass"), (150, 2, 100, "pass"),
    ]


def test_first_analysis_waits_one_interval_and_then_every_interval() -> None:
    policy = canary()
    state = start(policy, 1000.0)
    assert (state.weight, state.step, state.phase) == (10, 0, "progressing")
    assert not analysis_due(policy, state, 1029.9)
    assert analysis_due(policy, state, 1030.0)
    state, _ = advance(policy, state, 1031.0, judge(policy.analysis, HEALTHY))
    assert not analysis_due(policy, state, 1060.0)
    assert analysis_due(policy, state, 1061.0)


def test_a_failing_check_rolls_back_at_the_failure_limit_and_never_promotes() -> None:
    state, actions = walk(canary(failure_limit=2), lambda t: FAILING)
    assert [(t, a.kind, a.weight) for t, a in actions] == [(60, "rollback", 0)]
    assert (state.phase, state.weight, state.failures, state.step) == ("rolled_back", 0, 2, 0)
    assert state.reason == "2 failed analyses (failure_limit 2); last: error_rate 0.05 > max 0.01"


def test_failures_count_over_the_whole_rollout_so_a_flapping_candidate_rolls_back() -> None:
    # fail, pass, fail: never two failures in a row, but two in total.
    state, actions = walk(canary(failure_limit=2), lambda t: FAILING if t in (30, 90) else HEALTHY)
    assert [(t, a.kind, a.weight) for t, a in actions] == [(60, "set_weight", 50), (90, "rollback", 0)]
    assert state.failures == 2


def test_a_failure_below_the_limit_holds_the_weight_and_the_rollout_goes_on() -> None:
    state, actions = walk(canary(failure_limit=3), lambda t: FAILING if t == 30 else HEALTHY)
    assert [(t, a.kind, a.weight) for t, a in actions] == [
        (60, "set_weight", 50), (120, "set_weight", 100), (150, "promote", 100),
    ]
    assert state.failures == 1


def test_inconclusive_analyses_never_advance_and_roll_back_at_the_limit() -> None:
    state, actions = walk(canary(inconclusive_limit=3), lambda t: NO_DATA)
    assert [(t, a.kind, a.weight) for t, a in actions] == [(90, "rollback", 0)]
    assert (state.phase, state.step, state.passed_in_step) == ("rolled_back", 0, 0)
    assert state.reason.startswith("3 inconclusive analyses in a row (inconclusive_limit 3); last: error_rate: no data")


def test_the_inconclusive_streak_resets_on_a_conclusive_analysis() -> None:
    values: dict[float, Values] = {30: NO_DATA, 60: NO_DATA, 90: FAILING, 120: NO_DATA, 150: NO_DATA}
    policy = canary(inconclusive_limit=3, failure_limit=5)
    state, actions = walk(policy, lambda t: values[t], until=150)
    assert actions == []
    assert (state.phase, state.step, state.weight, state.inconclusive_streak, state.failures) == (
        "progressing", 0, 10, 2, 1)


def test_an_inconclusive_analysis_at_the_end_of_the_pause_does_not_complete_the_step() -> None:
    # A pass earlier in the step is not enough: traffic only moves up on fresh, healthy evidence.
    state, actions = walk(canary(), lambda t: NO_DATA if t == 60 else HEALTHY, until=90)
    assert [(t, a.kind, a.weight) for t, a in actions] == [(90, "set_weight", 50)]
    assert state.step == 1


def test_passes_before_the_pause_has_elapsed_do_not_advance() -> None:
    policy = canary(steps=[(10, 300), (100, 0)])
    state, actions = walk(policy, lambda t: HEALTHY, until=290)
    assert actions == []
    assert (state.step, state.weight, state.passed_in_step) == (0, 10, 9)
    state, action = advance(policy, state, 300, judge(policy.analysis, HEALTHY))
    assert (action.kind, action.weight, state.step, state.passed_in_step) == ("set_weight", 100, 1, 0)
    # pause 0: the last step completes at its first passing analysis.
    state, action = advance(policy, state, 330, judge(policy.analysis, HEALTHY))
    assert (action.kind, action.weight, state.phase) == ("promote", 100, "promoted")


def test_a_call_without_results_changes_nothing() -> None:
    policy = canary(steps=[(10, 0)])
    state = start(policy, 0.0)
    assert advance(policy, state, 500.0, None) == (state, Action("none", 10, "no analysis"))


def test_terminal_phases_return_none_and_stay_put() -> None:
    policy = canary()
    promoted, _ = walk(policy, lambda t: HEALTHY)
    again, action = advance(policy, promoted, 2000.0, judge(policy.analysis, FAILING))
    assert again == promoted
    assert (action.kind, action.weight) == ("none", 100)
    assert not analysis_due(policy, promoted, 5000.0)
    rolled_back, _ = walk(policy, lambda t: FAILING)
    assert advance(policy, rolled_back, 2000.0, judge(policy.analysis, HEALTHY))[1].kind == "none"
    assert abort(rolled_back, "operator request")[1].kind == "none"


def test_abort_rolls_back_with_the_reason() -> None:
    state, action = abort(start(canary(), 0.0), "latency complaints")
    assert (state.phase, state.weight, action) == (
        "rolled_back", 0, Action("rollback", 0, "aborted: latency complaints"))


def test_a_state_beyond_the_policys_steps_is_an_error() -> None:
    state = start(canary(), 0.0)
    with pytest.raises(ValueError, match="at step 4, but the rollout has 1 steps"):
        advance(canary(steps=[(100, 0)]), CanaryState(**{**state.__dict__, "step": 3}), 30.0, [])


def test_history_keeps_only_the_newest_records() -> None:
    policy = canary(inconclusive_limit=500)
    state, _ = walk(policy, lambda t: NO_DATA, until=30 * (HISTORY_LIMIT + 10))
    assert len(state.history) == HISTORY_LIMIT
    assert state.history[-1].time == 30 * (HISTORY_LIMIT + 10)
    assert state.inconclusive_streak == HISTORY_LIMIT + 10


def test_state_round_trips_through_strict_json() -> None:
    policy = canary(failure_limit=3)
    state = start(policy, 1.5)
    state, _ = advance(policy, state, 31.5, judge(policy.analysis, {"error_rate": 0.0, "p95_latency_s": math.inf}))
    state, _ = advance(policy, state, 61.5, judge(policy.analysis, {"error_rate": None}))
    state, _ = advance(policy, state, 91.5, judge(policy.analysis, HEALTHY))
    text = json.dumps(state.to_dict(), allow_nan=False)  # Kubernetes rejects NaN and Infinity
    data = json.loads(text)
    assert data["history"][0]["results"][1]["value"] == "+Inf"
    assert data["history"][1]["results"][0]["value"] is None
    assert (data["phase"], data["step"], data["weight"], data["failures"]) == ("progressing", 1, 50, 1)
    assert CanaryState.from_dict(data) == state
    with pytest.raises(ValueError, match="phase: 'paused' is not one of"):
        CanaryState.from_dict({**data, "phase": "paused"})


def test_check_result_round_trips() -> None:
    result = CheckResult("p95_ttft_s", -math.inf, 0.0, 1.0, "fail", "p95_ttft_s -inf < min 0")
    assert CheckResult.from_dict(json.loads(json.dumps(result.to_dict(), allow_nan=False))) == result


# --- A/B ----------------------------------------------------------------------------------------------


def ab(**settings: Any) -> ABRollout:
    return ABRollout.model_validate({"strategy": "ab", "candidate": "models:/quickstart/4",
                                     "prometheus": "http://p:9090", "duration_s": 600, **settings})


def comparison(winner: Winner | None) -> ABComparison:
    summary = VariantSummary(1000, median_le=0.25)
    return ABComparison("latency", "mann_whitney_u", 1.0, 0.001 if winner else 0.4, summary, summary,
                        winner, "r")


def test_ab_is_due_after_its_duration() -> None:
    policy = ab()
    assert not ab_due(policy, 100.0, 699.9)
    assert ab_due(policy, 100.0, 700.0)


def test_ab_decide_promotes_only_a_winning_candidate_with_promote_winner() -> None:
    assert ab_decide(ab(promote_winner=True), comparison("candidate")) == Action(
        "promote", 100, "candidate won on latency: r")
    assert ab_decide(ab(weight=30), comparison("candidate")) == Action(
        "none", 30, "candidate won on latency: r; promote_winner is off")
    assert ab_decide(ab(), comparison("stable")) == Action("rollback", 0, "stable won on latency: r")
    assert ab_decide(ab(promote_winner=True, weight=20), comparison(None)) == Action(
        "none", 20, "no winner on latency: r")

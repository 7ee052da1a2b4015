"""The rollout controller's state handling against a real MLflow registry (SQLite), with analyses given by
the test instead of Prometheus (the Prometheus path runs in test_serve.py): promotion moves `champion`,
rollback leaves it and records why, a controller restarted mid-way resumes instead of starting over, an
abort request rolls back, A/B conclusions, metrics counted once, and the `kubeforge rollout` CLI.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from click.testing import CliRunner

from kubeforge import metrics
from kubeforge.cli import main
from kubeforge.registry.audit import CHAMPION
from kubeforge.registry.client import Registry
from kubeforge.rollout.controller import (
    TAG_REASON,
    TAG_RESULT,
    RolloutController,
    RolloutStore,
    Subject,
)
from kubeforge.rollout.decision import CheckResult, judge
from kubeforge.rollout.stats import ABComparison, VariantSummary
from kubeforge.spec.deployment import ABRollout, CanaryRollout
from tests.helpers import two_version_registry

pytestmark = pytest.mark.integration

PROMETHEUS = "http://127.0.0.1:9"  # never asked: the tests pass the analyses in


class RecordingRouter:
    def __init__(self, fail_once: bool = False) -> None:
        self.weights: list[int] = []
        self.fail_once = fail_once

    def set_weight(self, weight: int) -> None:
        if self.fail_once:
            self.fail_once = False
            raise ConnectionError("router unreachable")
        self.weights.append(weight)


class Script:
    """Analyses in order: each item is the error rate the next analysis measures (None: no data)."""

    def __init__(self, values: Sequence[float | None]) -> None:
        self.values = list(values)
        self.calls = 0

    def __call__(self, policy: CanaryRollout, subject: Subject) -> list[CheckResult]:
        value = self.values[min(self.calls, len(self.values) - 1)]
        self.calls += 1
        return judge(policy.analysis, {"error_rate": value})


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    return two_version_registry(tmp_path_factory.mktemp("registry"),
                                ["canary-ok", "canary-bad", "canary-resume", "canary-abort", "ab-win", "ab-tie"])


def canary(steps: list[tuple[int, float]], failure_limit: int = 2) -> CanaryRollout:
    return CanaryRollout.model_validate({
        "strategy": "canary", "candidate": "models:/m/2",
        "steps": [{"weight": w, "pause_s": p} for w, p in steps],
        "analysis": {"prometheus": PROMETHEUS, "interval_s": 10, "max_error_rate": 0.05,
                     "failure_limit": failure_limit, "inconclusive_limit": 3},
    })


def subject(model: str) -> Subject:
    return Subject("chat", model, "1", model, "2")


def run_until_done(controller: RolloutController, start: float = 1000.0, step: float = 10.0, ticks: int = 20) -> None:
    controller.start(start)
    for i in range(1, ticks + 1):
        if controller.tick(start + i * step).done:
            return
    raise AssertionError("the rollout did not end")


def test_passing_analyses_walk_the_steps_and_promote(registry: Registry, tmp_path: Path) -> None:
    router = RecordingRouter()
    store = RolloutStore(tmp_path)
    policy = canary([(10, 0), (50, 20)])
    promotions = metrics.ROLLOUT_PROMOTIONS.labels(deployment="chat")._value.get()
    controller = RolloutController(policy, subject("canary-ok"), router, registry, store, measure=Script([0.0]))
    run_until_done(controller)
    record = store.load()
    assert record is not None and record.phase == "promoted"
    assert [e.kind for e in record.events] == ["start", "set_weight", "promote"]
    assert router.weights[0] == 10 and router.weights[-1] == 100 and 50 in router.weights
    assert registry.alias("canary-ok", CHAMPION).version == "2"
    assert registry.version("canary-ok", "2").tags[TAG_RESULT] == "promoted"
    assert metrics.ROLLOUT_PROMOTIONS.labels(deployment="chat")._value.get() == promotions + 1


def test_failing_analyses_roll_back_and_leave_champion(registry: Registry, tmp_path: Path) -> None:
    router = RecordingRouter()
    store = RolloutStore(tmp_path)
    rollbacks = metrics.ROLLOUT_ROLLBACKS.labels(deployment="chat")._value.get()
    # fail, pass, fail: failures count over the whole rollout, so the second one rolls back.
    controller = RolloutController(canary([(20, 100)]), subject("canary-bad"), router, registry, store,
                                   measure=Script([0.3, 0.0, 0.2]))
    run_until_done(controller)
    record = store.load()
    assert record is not None and record.phase == "rolled_back" and record.weight == 0
    assert router.weights[-1] == 0
    assert "error_rate 0.2 > max 0.05" in record.reason
    assert registry.alias("canary-bad", CHAMPION).version == "1"
    tags = registry.version("canary-bad", "2").tags
    assert tags[TAG_RESULT] == "rolled_back" and "failure_limit 2" in tags[TAG_REASON]
    assert metrics.ROLLOUT_ROLLBACKS.labels(deployment="chat")._value.get() == rollbacks + 1
    # Starting again on the finished record only reconciles: nothing is counted or moved twice.
    again = RolloutController(canary([(20, 100)]), subject("canary-bad"), RecordingRouter(), registry, store,
                              measure=Script([0.0]))
    assert again.start(5000.0).phase == "rolled_back"
    assert again.tick(5100.0).phase == "rolled_back"
    assert metrics.ROLLOUT_ROLLBACKS.labels(deployment="chat")._value.get() == rollbacks + 1


def test_a_restarted_controller_resumes_at_its_step(registry: Registry, tmp_path: Path) -> None:
    store = RolloutStore(tmp_path)
    policy = canary([(10, 0), (40, 0), (70, 0)])
    first = RolloutController(policy, subject("canary-resume"), RecordingRouter(), registry, store,
                              measure=Script([0.0]))
    first.start(0.0)
    assert first.tick(10.0).weight == 40
    # The process dies. A new one starts on the same record: it resumes at 40%, not at the first step,
    # and a router that cannot be reached yet fails the start without losing the record.
    router = RecordingRouter(fail_once=True)
    second = RolloutController(policy, subject("canary-resume"), router, registry, store, measure=Script([0.0]))
    with pytest.raises(ConnectionError):
        second.start(15.0)
    assert second.start(16.0).weight == 40
    assert router.weights == [40]
    assert second.tick(25.0).weight == 70
    # A new candidate version is a new rollout, not a resumption.
    other = Subject("chat", "canary-resume", "1", "canary-resume", "3")
    fresh = RolloutController(policy, other, RecordingRouter(), registry, RolloutStore(tmp_path))
    assert fresh.start(30.0).weight == 10


def test_an_abort_request_rolls_back(registry: Registry, tmp_path: Path) -> None:
    store = RolloutStore(tmp_path)
    router = RecordingRouter()
    controller = RolloutController(canary([(25, 600)]), subject("canary-abort"), router, registry, store,
                                   measure=Script([0.0]))
    controller.start(0.0)
    store.request_abort("latency complaints", "alice")
    record = controller.tick(1.0)
    assert record.phase == "rolled_back" and router.weights[-1] == 0
    assert record.reason == "aborted: latency complaints (by alice)"
    assert record.events[-1].kind == "abort"
    assert not store.abort_path.exists()
    assert registry.alias("canary-abort", CHAMPION).version == "1"


def ab_policy(promote_winner: bool) -> ABRollout:
    return ABRollout.model_validate({"strategy": "ab", "candidate": "models:/m/2", "weight": 30, "duration_s": 60,
                                     "metric": "error_rate", "prometheus": PROMETHEUS,
                                     "promote_winner": promote_winner})


def comparison(winner: str | None) -> ABComparison:
    return ABComparison("error_rate", "two_proportion_z", -4.2, 0.00003, VariantSummary(500, error_rate=0.01),
                        VariantSummary(900, error_rate=0.05), winner, "candidate 1.0% vs stable 5.0%")  # type: ignore[arg-type]


@pytest.mark.parametrize(("model", "winner", "phase", "weight"), [
    ("ab-win", "candidate", "promoted", 100),
    ("ab-tie", None, "concluded", 30),
])
def test_ab_test_concludes_after_its_duration(registry: Registry, tmp_path: Path, model: str, winner: str | None,
                                              phase: str, weight: int) -> None:
    store = RolloutStore(tmp_path)
    windows: list[float] = []

    def compare(policy: ABRollout, subject: Subject, end: float) -> ABComparison:
        windows.append(end)
        return comparison(winner)

    router = RecordingRouter()
    controller = RolloutController(ab_policy(True), subject(model), router, registry, store, compare=compare)
    assert controller.start(100.0).weight == 30
    assert not controller.tick(150.0).done and windows == []
    record = controller.tick(170.0)
    assert (record.phase, record.weight, router.weights[-1]) == (phase, weight, weight)
    assert windows == [160.0]  # the comparison window ends at start + duration, not at the late tick
    assert record.ab is not None and record.ab["p_value"] == 0.00003
    assert registry.alias(model, CHAMPION).version == ("2" if winner else "1")


def test_rollout_cli_status_plot_and_abort(registry: Registry, tmp_path: Path) -> None:
    folder = tmp_path / "deployments" / "chat"
    store = RolloutStore(folder)
    controller = RolloutController(canary([(10, 0), (50, 600)], failure_limit=5), subject("canary-ok"),
                                   RecordingRouter(), registry, store, measure=Script([0.0, 0.2, None]))
    controller.start(0.0)
    for now in (10.0, 20.0, 30.0):
        controller.tick(now)
    runner = CliRunner()
    result = runner.invoke(main, ["rollout", "status", "chat", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "canary rollout, progressing" in result.output
    assert "candidate canary-ok version 2: 50%" in result.output
    assert "no data" in result.output and "inconclusive" in result.output  # the last analysis
    png = folder / "timeline.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The document alone: this process is also the test session's Ray driver, whose actors' log lines
    # (Ray Train's placement-group cleaner, left by earlier tests) may reach the same stdout.
    as_json, _ = json.JSONDecoder().raw_decode(runner.invoke(main, ["rollout", "status", "chat", "--workdir",
                                                                    str(tmp_path), "-o", "json"]).output)
    assert [a["overall"] for a in as_json["canary"]["history"]] == ["pass", "fail", "inconclusive"]

    result = runner.invoke(main, ["rollout", "abort", "chat", "--reason", "manual stop", "--user", "bob",
                                  "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert controller.tick(31.0).reason == "aborted: manual stop (by bob)"
    result = runner.invoke(main, ["rollout", "abort", "chat", "--reason", "again", "--workdir", str(tmp_path)])
    assert result.exit_code != 0 and "already ended (rolled_back)" in result.output
    missing = runner.invoke(main, ["rollout", "status", "nope", "--workdir", str(tmp_path)])
    assert missing.exit_code != 0 and "deployment 'nope': no rollout recorded" in missing.output

"""The retraining loop's decisions without a cluster: triggers, guard rails, a turn's outcome from what the
registry shows after its run, the audit store, the CLI, and the manifest's rules."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from kubeforge.cli import main
from kubeforge.errors import KubeForgeError
from kubeforge.monitor.loop import (
    LoopStore,
    Trigger,
    Turn,
    TurnRecord,
    check_pipeline,
    due_trigger,
    loop_store,
    refusal,
    retrain_sources,
)
from kubeforge.spec.load import SpecError, parse_deployment, parse_manifest
from kubeforge.spec.monitor import RetrainSpec

pytestmark = pytest.mark.unit

NOW = 1_800_000_000.0


def retrain(**fields: Any) -> RetrainSpec:
    return RetrainSpec.model_validate({"pipeline": "p.yaml", **fields})


def ended(turn: int, started: float, ended_at: float, outcome: str = "promoted") -> TurnRecord:
    return TurnRecord(turn, Trigger("drift", "x"), started, "p.yaml", "1", ended=ended_at, outcome=outcome)


def test_a_crossed_signal_or_the_schedule_triggers_and_nothing_else_does() -> None:
    drift = due_trigger(retrain(), {"token_js": 0.41, "prompt_length_psi": 0.3}, NOW - 10, NOW)
    assert drift is not None and drift.kind == "drift"
    assert drift.detail == "crossed: prompt_length_psi 0.3, token_js 0.41" and drift.signals["token_js"] == 0.41
    assert due_trigger(retrain(), {}, NOW - 10, NOW) is None
    assert due_trigger(retrain(on_drift=False, schedule_s=60), {"token_js": 0.41}, NOW - 59, NOW) is None
    scheduled = due_trigger(retrain(on_drift=False, schedule_s=60), {}, NOW - 60, NOW)
    assert scheduled is not None and scheduled.kind == "schedule"


def test_the_guard_rails_refuse_disabled_paused_cooling_down_and_too_many_turns() -> None:
    spec = retrain(cooldown_s=600, max_turns_per_day=2)
    assert refusal(spec, [], {}, NOW) is None
    assert "enabled is false" in str(refusal(retrain(enabled=False), [], {}, NOW))
    paused = refusal(spec, [], {"paused": True, "by": "ada", "reason": "incident 42"}, NOW)
    assert paused is not None and "paused by ada: incident 42" in paused
    assert refusal(spec, [], {"paused": False, "by": "ada", "reason": "over"}, NOW) is None
    # Cooldown from the end of the last turn, whatever its outcome.
    cooling = refusal(spec, [ended(1, NOW - 900, NOW - 599, "retrain_failed")], {}, NOW)
    assert cooling is not None and "cooldown" in cooling and "599 s ago" in cooling
    assert refusal(spec, [ended(1, NOW - 900, NOW - 601)], {}, NOW) is None
    # At most two turns started in the last 24 hours: one started 25 hours ago no longer counts.
    two = [ended(1, NOW - 20 * 3600, NOW - 19 * 3600), ended(2, NOW - 3600, NOW - 3000)]
    assert "2 turns started in the last 24 h" in str(refusal(spec, two, {}, NOW))
    two[0] = ended(1, NOW - 25 * 3600, NOW - 24.5 * 3600)
    assert refusal(spec, two, {}, NOW) is None


def test_the_store_keeps_turns_the_running_one_the_kill_switch_and_requests(tmp_path: Path) -> None:
    store = loop_store(tmp_path, "d")
    assert store.turns() == [] and store.running() is None and store.take_request() is None
    record = TurnRecord(1, Trigger("drift", "crossed: token_js 0.5", {"token_js": 0.5}), NOW, "p.yaml", "1")
    store.set_running(record)
    assert store.running() == record
    record.ended, record.outcome, record.reason = NOW + 60, "promoted", "all steps passed"
    store.append(record)
    assert store.turns() == [record] and store.running() is None
    store.request_turn("ada", "new data")
    request = store.take_request()
    assert request is not None and request.kind == "manual" and "ada: new data" in request.detail
    assert store.take_request() is None  # taken once
    store.set_paused(True, "ada", "incident")
    assert store.state()["paused"] is True


def pipeline(name: str = "m", alias: str = "challenger", data: bool = True,
             extra_sources: list[dict[str, Any]] = []) -> Any:  # noqa: B006 (never mutated)
    spec: dict[str, Any] = {"promotion": {"alias": alias, "gates": []}}
    if data:
        spec["data"] = {"sources": [{"type": "files", "paths": ["corpus/*.txt"]}, *extra_sources]}
        spec["pretrain"] = {"train": {"max_steps": 2}}
    return parse_manifest({"apiVersion": "kubeforge.io/v1alpha1", "kind": "ModelPipeline", "metadata": {"name": name},
                           "spec": spec})


def test_the_retraining_run_reads_its_own_sources_and_the_captured_traffic() -> None:
    sources = retrain_sources(pipeline(), "s3://b/traffic/d", "prompt", 1000.0)
    assert sources[0]["type"] == "files" and sources[0]["paths"] == ["corpus/*.txt"]
    assert sources[1] == {"type": "served-traffic", "paths": ["s3://b/traffic/d"], "text": "prompt", "until": 1000.0}
    # The next turn replaces the traffic source an earlier turn added (a new `until`, so a new cache key), and
    # keeps one of another capture.
    earlier = pipeline(extra_sources=[sources[1], {"type": "served-traffic", "paths": ["s3://b/traffic/other"]}])
    again = retrain_sources(earlier, "s3://b/traffic/d", "prompt", 2000.0)
    assert [(s["paths"], s.get("until")) for s in again] == [
        (["corpus/*.txt"], None), (["s3://b/traffic/other"], None), (["s3://b/traffic/d"], 2000.0)]
    check_pipeline(pipeline(), "m", "f")
    with pytest.raises(KubeForgeError, match="f: pipeline 'other' registers model 'other', but this deployment serves"):
        check_pipeline(pipeline("other"), "m", "f")
    with pytest.raises(KubeForgeError, match="must promote to challenger"):
        check_pipeline(pipeline(alias="champion"), "m", "f")


@dataclass
class Version:
    version: str
    gates: str | None = None


@dataclass
class FakeRegistry:
    """What a turn reads of MLflow: versions and the aliases."""

    versions_: list[Version] = field(default_factory=lambda: [Version("1", "passed")])
    aliases: dict[str, str] = field(default_factory=lambda: {"champion": "1", "challenger": "1"})
    tracking_uri: str = "sqlite:///x.db"

    def versions(self, model: str) -> list[Version]:
        return list(self.versions_)

    def alias(self, model: str, alias: str) -> Version | None:
        return Version(self.aliases[alias]) if alias in self.aliases else None


def turn_with(tmp_path: Path, run_effect: Any, roll_out: Any) -> tuple[Turn, LoopStore]:
    registry = FakeRegistry()
    store = loop_store(tmp_path, "d")
    turn = Turn(manifest=tmp_path / "p.yaml", pipeline=pipeline(), retrain=retrain(), capture_dir="/t",
                workdir=tmp_path, registry=registry, store=store, roll_out=roll_out,  # type: ignore[arg-type]
                stop=threading.Event())

    def retrain_run(number: int, until: float) -> tuple[int, Path]:
        log = tmp_path / f"run-{number}.log"
        log.write_text("data: ok\npretrain: ok\nthe last line\n")
        return run_effect(registry), log

    turn._retrain = retrain_run  # type: ignore[method-assign]
    return turn, store


def new_challenger(registry: FakeRegistry) -> int:
    registry.versions_.append(Version("2", "passed"))
    registry.aliases["challenger"] = "2"
    return 0


def test_a_new_challenger_goes_to_the_canary_and_its_verdict_ends_the_turn(tmp_path: Path) -> None:
    asked: list[str] = []

    def promote(version: str) -> tuple[bool, str]:
        asked.append(version)
        return True, "all steps passed"

    turn, store = turn_with(tmp_path, new_challenger, promote)
    record = turn.run(Trigger("drift", "crossed"), 1)
    assert asked == ["2"] and record.outcome == "promoted" and record.candidate_version == "2"
    assert record.champion_before == "1" and record.reason == "all steps passed" and record.ended is not None
    assert store.turns() == [record]
    turn, _ = turn_with(tmp_path / "b", new_challenger, lambda version: (False, "error_rate 0.3 > 0.1"))
    assert turn.run(Trigger("manual", "x"), 1).outcome == "rolled_back"


def test_failed_gates_a_failed_run_and_a_failed_rollout_end_the_turn_with_the_reason(tmp_path: Path) -> None:
    def gates_fail(registry: FakeRegistry) -> int:
        registry.versions_.append(Version("2", "failed"))
        return 1  # the promote stage fails the run

    def crashes(registry: FakeRegistry) -> int:
        return 1

    def no_canary(version: str) -> tuple[bool, str]:
        raise AssertionError("no canary without a new challenger")

    record = turn_with(tmp_path / "a", gates_fail, no_canary)[0].run(Trigger("drift", "x"), 1)
    assert record.outcome == "gates_failed" and record.candidate_version == "2" and "failed its promotion gates" in (
        record.reason)
    record = turn_with(tmp_path / "b", crashes, no_canary)[0].run(Trigger("drift", "x"), 1)
    assert record.outcome == "retrain_failed" and record.exit_code == 1 and "the last line" in record.reason

    def refused(version: str) -> tuple[bool, str]:
        raise KubeForgeError("spec.rollout.candidate: version 2 is awaiting approval")

    record = turn_with(tmp_path / "c", new_challenger, refused)[0].run(Trigger("drift", "x"), 1)
    assert record.outcome == "rollout_failed" and "awaiting approval" in record.reason


def deployment(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "kubeforge.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "d"},
            "spec": {"model": "models:/m@champion", **spec}}


CANARY = {"strategy": "canary", "candidate": "models:/m@challenger", "steps": [{"weight": 50}],
          "analysis": {"prometheus": "http://localhost:9090"}}


@pytest.mark.parametrize(("spec", "words"), [
    ({"capture": {}, "monitor": {"thresholds": {"token_js": 0.2}, "retrain": {"pipeline": "p.yaml"}}},
     "set rollout.strategy: canary with candidate: models:/m@challenger"),
    ({"capture": {}, "rollout": {**CANARY, "candidate": "models:/m/7"},
      "monitor": {"thresholds": {"token_js": 0.2}, "retrain": {"pipeline": "p.yaml"}}}, "candidate: models:/m@challenger"),
    ({"monitor": {"thresholds": {"error_rate": 0.1}, "retrain": {"pipeline": "p.yaml"}}, "rollout": CANARY},
     "retrains on the captured traffic; set capture"),
    ({"capture": {}, "rollout": CANARY,
      "monitor": {"thresholds": {"token_js": 0.2}, "retrain": {"pipeline": "p.yaml", "on_drift": False}}},
     "no turn would ever start"),
])
def test_a_loop_that_could_never_end_in_a_canary_is_refused(spec: dict[str, Any], words: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_deployment(deployment(**spec))
    assert words in str(info.value) and "spec.monitor" in str(info.value), str(info.value)


def test_loop_commands_pause_resume_request_and_show_the_turns(tmp_path: Path) -> None:
    runner = CliRunner()
    work = ["--workdir", str(tmp_path)]
    missing = runner.invoke(main, ["loop", "status", "d", *work])
    assert missing.exit_code != 0 and "no retraining loop recorded" in missing.output
    assert runner.invoke(main, ["loop", "pause", "d", "--reason", "incident 42", "--user", "ada", *work]).exit_code == 0
    store = loop_store(tmp_path, "d")
    store.append(ended(1, NOW, NOW + 300, "gates_failed"))
    shown = runner.invoke(main, ["loop", "status", "d", *work], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert "PAUSED by ada: incident 42" in shown.output and "gates_failed" in shown.output and "5.0" in shown.output
    assert runner.invoke(main, ["loop", "resume", "d", "--reason", "over", *work]).exit_code == 0
    assert runner.invoke(main, ["loop", "trigger", "d", "--reason", "new data", "--user", "ada", *work]).exit_code == 0
    listed = json.loads(runner.invoke(main, ["loop", "status", "d", *work, "--output", "json"]).output)
    assert listed["paused"] is False and [t["outcome"] for t in listed["turns"]] == ["gates_failed"]
    request = store.take_request()
    assert request is not None and request.detail == "requested by ada: new data"


def test_alertmanager_alone_is_a_trigger_and_its_alert_names_are_checked() -> None:
    spec = retrain(on_drift=False, alertmanager={"alerts": ["KubeForgeServingErrorRateHigh"]})
    assert spec.alertmanager is not None and spec.alertmanager.port == 9110
    with pytest.raises(ValueError, match="alerts"):
        retrain(alertmanager={"alerts": []})
    with pytest.raises(ValueError, match="alerts"):
        retrain(alertmanager={"alerts": ["not a name"]})


def test_serve_refuses_a_loop_whose_pipeline_is_missing_or_serves_another_model(tmp_path: Path) -> None:
    import yaml

    from kubeforge.serve.loop import prepare_loop

    document = parse_deployment(deployment(capture={}, rollout=CANARY, monitor={
        "thresholds": {"token_js": 0.2}, "retrain": {"pipeline": "retrain.yaml"}}))
    with pytest.raises(KubeForgeError, match=r"spec\.monitor\.retrain\.pipeline: no pipeline manifest at .*retrain\.yaml"):
        prepare_loop(document, tmp_path / "work", tmp_path)
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("text\n")
    manifest = {"apiVersion": "kubeforge.io/v1alpha1", "kind": "ModelPipeline", "metadata": {"name": "other"},
                "spec": {"data": {"sources": [{"type": "files", "paths": ["corpus/*.txt"]}]},
                         "pretrain": {"train": {"max_steps": 2}}, "promotion": {"gates": []}}}
    (tmp_path / "retrain.yaml").write_text(yaml.safe_dump(manifest))
    with pytest.raises(KubeForgeError, match="registers model 'other', but this deployment serves 'm'"):
        prepare_loop(document, tmp_path / "work", tmp_path)
    manifest["metadata"]["name"] = "m"
    (tmp_path / "retrain.yaml").write_text(yaml.safe_dump(manifest))
    path, pipeline, store = prepare_loop(document, tmp_path / "work", tmp_path)
    assert path == (tmp_path / "retrain.yaml").resolve() and pipeline.metadata.name == "m"
    assert store.folder == tmp_path / "work" / "deployments" / "d" / "loop"


def test_a_turn_in_the_operators_status_reads_back_without_the_nulls_a_merge_patch_drops() -> None:
    from kubeforge_operator.loop import Running, loop_state
    from kubeforge_operator.reconciling import _without_nulls

    # No champion yet, no challenger before: the API server stores neither key.
    record = TurnRecord(1, Trigger("drift", "crossed: token_js 0.4", {"token_js": 0.4}), NOW, "m", None,
                        run_log="ModelPipeline team-a/m generation 2")
    running = Running(record, "retraining", 2, 5, None)
    stored = _without_nulls({"loop": {"running": running.to_dict(), "count": 0}})
    assert "champion_before" not in stored["loop"]["running"]["record"]
    turns, back, _ = loop_state(stored)
    assert back == running and turns == []

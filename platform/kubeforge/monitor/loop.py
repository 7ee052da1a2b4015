"""The closed loop of one deployment: a trigger, the guard rails, and a turn (retrain, gates, canary),
each turn one audit record.

A turn runs the deployment's retraining pipeline as its own `kubeforge run` process (its own Ray runtime,
at the priority of serving: a niced runtime's daemons starved behind busy replicas, and Ray gives its node
30 s to start), with the captured traffic added to its data sources. The pipeline's
promotion gates decide: a new `challenger` version is handed to the deployment's canary (`roll_out`), whose
end (promoted or rolled back) ends the turn. A run that fails, or a candidate that fails its gates, ends the
turn with the reason; the deployment keeps serving its champion throughout.

Files, in `<workdir>/deployments/<name>/loop/`: `turns.jsonl` (one JSON record per turn, appended when it
ends), `running.json` (the turn in progress), `state.json` (the kill switch: paused, by whom, why),
`trigger.json` (a person's request for a turn, taken by the serving process within a second) and
`turn-<n>/` (the run's command and log).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kubeforge.errors import KubeForgeError
from kubeforge.registry.audit import CHALLENGER, CHAMPION
from kubeforge.registry.client import Registry
from kubeforge.spec.data import ServedTrafficSource
from kubeforge.spec.monitor import RetrainSpec
from kubeforge.spec.pipeline import ModelPipeline
from kubeforge.stages.data import DATA
from kubeforge.stages.promote import PROMOTE

DAY_S = 24 * 3600.0
STOP_GRACE_S = 30.0
"""How long a retraining run gets to stop after SIGTERM before it is killed."""

OUTCOMES = ("promoted", "rolled_back", "gates_failed", "retrain_failed", "rollout_failed", "interrupted")


@dataclass(frozen=True)
class Trigger:
    kind: str
    """drift | schedule | manual"""
    detail: str
    signals: dict[str, float] = field(default_factory=dict)


@dataclass
class TurnRecord:
    """One turn of the loop, from its trigger to its outcome."""

    turn: int
    trigger: Trigger
    started: float
    pipeline: str
    champion_before: str | None = None
    ended: float | None = None
    outcome: str | None = None
    """One of OUTCOMES once ended."""
    reason: str = ""
    run_log: str | None = None
    exit_code: int | None = None
    candidate_version: str | None = None
    """The version the run registered and gated (passed or not)."""
    champion_after: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TurnRecord:
        return cls(**{**raw, "trigger": Trigger(**raw["trigger"])})


class LoopStore:
    """The loop's files for one deployment."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.turns_path = folder / "turns.jsonl"
        self.state_path = folder / "state.json"
        self.trigger_path = folder / "trigger.json"
        self.running_path = folder / "running.json"

    def turns(self) -> list[TurnRecord]:
        if not self.turns_path.is_file():
            return []
        return [TurnRecord.from_dict(json.loads(line)) for line in self.turns_path.read_text().splitlines() if line]

    def append(self, record: TurnRecord) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.turns_path.open("a") as handle:
            handle.write(json.dumps(record.to_dict(), sort_keys=True) + "\n")
        self.running_path.unlink(missing_ok=True)

    def set_running(self, record: TurnRecord) -> None:
        """The turn in progress, for `kubeforge loop status` (gone once the turn is appended)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.running_path.write_text(json.dumps(record.to_dict(), sort_keys=True) + "\n")

    def running(self) -> TurnRecord | None:
        if not self.running_path.is_file():
            return None
        return TurnRecord.from_dict(json.loads(self.running_path.read_text()))

    def state(self) -> dict[str, Any]:
        return json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}

    def set_paused(self, paused: bool, user: str, reason: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {**self.state(), "paused": paused, "by": user, "reason": reason, "time": time.time()}
        self.state_path.write_text(json.dumps(state) + "\n")

    def request_turn(self, user: str, reason: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.trigger_path.write_text(json.dumps({"user": user, "reason": reason}) + "\n")

    def take_request(self) -> Trigger | None:
        if not self.trigger_path.is_file():
            return None
        raw = json.loads(self.trigger_path.read_text())
        self.trigger_path.unlink()
        return Trigger("manual", f"requested by {raw['user']}: {raw['reason']}")


def loop_store(workdir_root: Path, deployment: str) -> LoopStore:
    return LoopStore(workdir_root / "deployments" / deployment / "loop")


def due_trigger(spec: RetrainSpec, crossed: dict[str, float], since: float, now: float) -> Trigger | None:
    """What starts a turn now, if anything: crossed signals (`crossed`: name -> value), or the schedule,
    counted from `since` (the end of the last turn, or the monitor's start)."""
    if spec.on_drift and crossed:
        names = ", ".join(f"{name} {value:.4g}" for name, value in sorted(crossed.items()))
        return Trigger("drift", f"crossed: {names}", dict(crossed))
    if spec.schedule_s is not None and now - since >= spec.schedule_s:
        return Trigger("schedule", f"{spec.schedule_s:g} s since {'the last turn' if since else 'the start'}")
    return None


def refusal(spec: RetrainSpec, turns: list[TurnRecord], state: dict[str, Any], now: float) -> str | None:
    """Why no turn may start now (the guard rails), or None."""
    if not spec.enabled:
        return "spec.monitor.retrain.enabled is false"
    if state.get("paused"):
        return f"paused by {state.get('by')}: {state.get('reason')} (kubeforge loop resume)"
    if turns and turns[-1].ended is not None and now < turns[-1].ended + spec.cooldown_s:
        return f"cooldown: the last turn ended {now - turns[-1].ended:.0f} s ago (cooldown_s {spec.cooldown_s:g})"
    recent = [t for t in turns if t.started > now - DAY_S]
    if len(recent) >= spec.max_turns_per_day:
        return f"{len(recent)} turns started in the last 24 h (max_turns_per_day {spec.max_turns_per_day})"
    return None


def retrain_sources(pipeline: ModelPipeline, capture_dir: str, text: str, until: float) -> list[dict[str, Any]]:
    """The pipeline's data sources with the traffic captured in `capture_dir` up to `until` added (a
    `--set data.sources=` value, or the loop's edit of a ModelPipeline on Kubernetes). A source of the same
    capture that an earlier turn added is replaced, so turns do not pile up sources."""
    data = DATA.section_of(pipeline.spec)
    if data is None:
        raise KubeForgeError(f"pipeline '{pipeline.metadata.name}': has no data stage to add the captured traffic to")
    existing = [source.model_dump(mode="json", exclude_unset=True) for source in data.sources
                if not (isinstance(source, ServedTrafficSource) and source.paths == (capture_dir,))]
    return [*existing, {"type": "served-traffic", "paths": [capture_dir], "text": text, "until": until}]


@dataclass(frozen=True)
class Retrained:
    """What a finished retraining run left in the registry for the turn."""

    candidate: str | None
    """The version it registered and gated (passed or not)."""
    outcome: str | None
    """`gates_failed` or `retrain_failed`, which end the turn; None: roll `candidate` out."""
    reason: str = ""


def retrained(registry: Registry, model: str, last_before: int, challenger_before: str | None, succeeded: bool,
              failure: str) -> Retrained:
    """Judge a retraining run by the versions of `model` registered after `last_before` (the highest version
    number when the turn started): a gated one that failed ends the turn; a run that failed, or did not move
    `challenger` to a new version, ends it too (`failure` says why the run failed); otherwise the new
    challenger is the candidate."""
    new = [v for v in registry.versions(model) if int(v.version) > last_before and v.gates is not None]
    gated = max(new, key=lambda v: int(v.version)) if new else None
    if gated is not None and gated.gates == "failed":
        return Retrained(gated.version, "gates_failed", f"version {gated.version} failed its promotion gates")
    moved = registry.alias(model, CHALLENGER)
    if not succeeded or moved is None or moved.version == challenger_before or int(moved.version) <= last_before:
        return Retrained(gated.version if gated else None, "retrain_failed",
                         f"the retraining run {failure if not succeeded else 'succeeded'} and moved no new challenger")
    return Retrained(moved.version, None)


def last_version(registry: Registry, model: str) -> int:
    return max((int(v.version) for v in registry.versions(model)), default=0)


def check_pipeline(pipeline: ModelPipeline, model: str, field_name: str) -> None:
    """Refuse a retraining pipeline whose turns could never end in this deployment's canary."""
    if pipeline.metadata.name != model:
        raise KubeForgeError(f"{field_name}: pipeline '{pipeline.metadata.name}' registers model "
                             f"'{pipeline.metadata.name}', but this deployment serves '{model}'")
    promotion = PROMOTE.section_of(pipeline.spec)
    if promotion is None or promotion.alias != CHALLENGER:
        raise KubeForgeError(f"{field_name}: pipeline '{model}' must promote to challenger (spec.promotion.alias: "
                             "challenger): the loop's canary is what makes a version champion")
    if DATA.section_of(pipeline.spec) is None:
        raise KubeForgeError(f"{field_name}: pipeline '{model}' has no data stage to retrain on the captured traffic")


@dataclass(kw_only=True)
class Turn:
    """Runs one turn. `roll_out(version)` runs the deployment's canary of `version` to its end and returns
    (promoted, reason); `stop` set ends the turn early (the retraining run is stopped)."""

    manifest: Path
    pipeline: ModelPipeline
    retrain: RetrainSpec
    capture_dir: str
    workdir: Path
    registry: Registry
    store: LoopStore
    roll_out: Callable[[str], tuple[bool, str]]
    stop: threading.Event

    def run(self, trigger: Trigger, number: int) -> TurnRecord:
        model = self.pipeline.metadata.name
        champion = self.registry.alias(model, CHAMPION)
        record = TurnRecord(number, trigger, time.time(), str(self.manifest),
                            champion.version if champion else None)
        self.store.set_running(record)
        try:
            self._run(record, model)
        except KubeForgeError as exc:
            record.outcome, record.reason = record.outcome or "retrain_failed", str(exc)
        finally:
            record.ended = time.time()
            if record.outcome is None:
                record.outcome, record.reason = "interrupted", "the serving process stopped during the turn"
            after = self.registry.alias(model, CHAMPION)
            record.champion_after = after.version if after else None
            self.store.append(record)
        return record

    def _run(self, record: TurnRecord, model: str) -> None:
        last_before = last_version(self.registry, model)
        challenger = self.registry.alias(model, CHALLENGER)
        code, log = self._retrain(record.turn, record.started)
        record.exit_code, record.run_log = code, str(log)
        if self.stop.is_set():
            return
        judged = retrained(self.registry, model, last_before, challenger.version if challenger else None, code == 0,
                           f"ended with exit status {code} ({_tail(log)})")
        record.candidate_version = judged.candidate
        if judged.outcome is not None:
            record.outcome, record.reason = judged.outcome, f"{judged.reason} (see {log})"
            return
        assert judged.candidate is not None
        try:
            promoted, reason = self.roll_out(judged.candidate)
        except KubeForgeError as exc:
            record.outcome, record.reason = "rollout_failed", f"version {judged.candidate} was not rolled out: {exc}"
            return
        if self.stop.is_set() and not promoted:
            return
        record.outcome = "promoted" if promoted else "rolled_back"
        record.reason = reason

    def _retrain(self, number: int, until: float) -> tuple[int, Path]:
        folder = self.store.folder / f"turn-{number}"
        folder.mkdir(parents=True, exist_ok=True)
        log = folder / "run.log"
        sources = retrain_sources(self.pipeline, self.capture_dir, self.retrain.traffic_text, until)
        command = [sys.executable, "-m", "kubeforge.cli", "run", str(self.manifest), "--workdir", str(self.workdir),
                   "--tracking-uri", self.registry.tracking_uri, "--set", f"data.sources={json.dumps(sources)}"]
        (folder / "command.yaml").write_text(yaml.safe_dump({"command": command}))
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a runtime of its own, not serving's
        with log.open("w") as handle:
            process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True)
            try:
                while process.poll() is None:
                    if self.stop.wait(1.0):
                        _stop(process)
            finally:
                if process.poll() is None:
                    _stop(process)
        return process.returncode, log


def _stop(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _tail(log: Path, lines: int = 3) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return f"no log at {log}"
    return " | ".join(text[-lines:]) or f"empty log {log}"

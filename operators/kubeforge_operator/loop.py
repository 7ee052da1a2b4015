"""The retraining loop of a ModelDeployment on Kubernetes (`spec.monitor.retrain`): the decisions of
`kubeforge.monitor.loop` (triggers, guard rails, the judgment of a retraining run), driven from the
deployment's reconciliation instead of a thread of `kubeforge serve`.

A turn, step by step, each step one reconciliation that saves the turn in `status.loop.running`:

1. **Trigger.** A signal above its threshold (the monitor replica's `kubeforge_monitor_signal`, read back from
   Prometheus), the schedule, or a person's annotation `kubeforge.io/loop-trigger: "<reason>"` (removed once
   looked at). The guard rails (`refusal`) may refuse it: the annotation `kubeforge.io/loop-paused:
   "<reason>"` is the kill switch, beside the manifest's `enabled`, cooldown and turns per day.
2. **Retraining: a new generation of the named ModelPipeline.** Its `spec.data.sources` gets the captured
   traffic up to the trigger (`retrain_sources`, whose `until` changes the data stage's cache key), so the
   pipeline's own reconciler reruns data and every stage after it; the pipeline is annotated with the turn.
   The pipeline stays the user's object: a new generation rather than a new object, because its name is the
   registered model's.
3. **Judgment** once the pipeline's status reports that generation Succeeded or Failed (`retrained`): failed
   gates or a failed run end the turn; a new `challenger` becomes the candidate.
4. **Canary.** The turn pins the candidate in the status (`candidateVersion`, beside the version served now as
   `modelVersion`), and the reconciliation's rollout begins as for any candidate; its end ends the turn.

Every ended turn is a record of `status.loop.turns` (the latest `KEPT_TURNS`) and a Kubernetes-visible line in
the operator's log; the serving never waits on the loop, and a failed turn leaves the champion serving.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

import kopf

from kubeforge import metrics
from kubeforge.errors import KubeForgeError, SpecError
from kubeforge.monitor.drift import Signal
from kubeforge.monitor.loop import (
    Trigger,
    TurnRecord,
    check_pipeline,
    due_trigger,
    last_version,
    refusal,
    retrain_sources,
    retrained,
)
from kubeforge.registry.audit import CHALLENGER, CHAMPION
from kubeforge.registry.client import Registry
from kubeforge.rollout.controller import RolloutRecord
from kubeforge.rollout.prometheus import PrometheusError, query
from kubeforge.spec.deployment import ModelDeployment, parse_model_uri
from kubeforge_operator import kube
from kubeforge_operator.pipeline import manifest_document, validate

ANNOTATION_TRIGGER: Final = "kubeforge.io/loop-trigger"
"""A person's request for a turn; its value is the reason. Removed once looked at."""
ANNOTATION_PAUSED: Final = "kubeforge.io/loop-paused"
"""The kill switch while present; its value is the reason."""
ANNOTATION_TURN: Final = "kubeforge.io/loop-turn"
"""On the retraining ModelPipeline: `<deployment> turn <n>`, the turn that made its generation."""
KEPT_TURNS = 20
"""Turn records kept in the status; the operator's log and the pipelines' MLflow runs keep the rest."""
POLL_S = 10.0
"""How often a deployment with a loop is looked at between events: a Prometheus query for its signals."""


Signals = Callable[[ModelDeployment, str, str], dict[str, float]]
"""(deployment, namespace, Prometheus URL) -> the signals the monitor exports now, by name."""


def prometheus_signals(model: ModelDeployment, namespace: str, prometheus: str) -> dict[str, float]:
    """The monitor replica's signals as Prometheus scraped them (`PrometheusError` when it cannot be asked)."""
    name = model.metadata.name
    selector = f'deployment="{name}",namespace="{namespace}"'
    data = query(prometheus, f"max by (signal) (kubeforge_monitor_signal{{{selector}}})")
    return {series["metric"]["signal"]: float(series["value"][1]) for series in data.get("result") or []
            if series.get("metric", {}).get("signal")}


def crossed(model: ModelDeployment, signals: Mapping[str, float]) -> dict[str, float]:
    assert model.spec.monitor is not None
    return {name: signals[name] for name, threshold in model.spec.monitor.thresholds.items()
            if name in signals and Signal(name, signals[name], threshold, 0, 0).crossed}


@dataclass(frozen=True)
class Running:
    """The turn in progress, as `status.loop.running` keeps it."""

    record: TurnRecord
    phase: str
    """`retraining` (the pipeline's generation runs) or `rolling_out` (the candidate's canary runs)."""
    generation: int | None = None
    """The pipeline's generation this turn made."""
    last_before: int = 0
    """The highest version of the model when the turn started: what the run registers comes after it."""
    challenger_before: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"record": self.record.to_dict(), "phase": self.phase, "pipelineGeneration": self.generation,
                "lastVersionBefore": self.last_before, "challengerBefore": self.challenger_before}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Running:
        return cls(TurnRecord.from_dict(dict(raw["record"])), str(raw["phase"]), raw.get("pipelineGeneration"),
                   int(raw.get("lastVersionBefore") or 0), raw.get("challengerBefore"))


@dataclass(frozen=True)
class LoopStep:
    """What a reconciliation does for the loop: the status to save, the candidate to pin (a turn's new
    challenger), and whether to remove the trigger annotation."""

    status: dict[str, Any]
    candidate: str | None = None
    take_trigger: bool = False


def loop_state(previous: Mapping[str, Any]) -> tuple[list[TurnRecord], Running | None, dict[str, Any]]:
    loop = previous.get("loop") or {}
    try:
        turns = [TurnRecord.from_dict(dict(raw)) for raw in loop.get("turns") or []]
        running = Running.from_dict(loop["running"]) if loop.get("running") else None
    except (KeyError, TypeError, ValueError) as exc:
        raise kopf.PermanentError(f"status.loop: not the loop's record ({exc}); clear it (kubectl patch "
                                  "--subresource=status) to start the loop's history afresh") from exc
    return turns, running, dict(loop)


async def step(
    client: kube.Client, namespace: str, model: ModelDeployment, annotations: Mapping[str, str],
    previous: Mapping[str, Any], saved: RolloutRecord | None, registry: Registry, signals: Signals, now: float,
    logger: kopf.Logger,
) -> LoopStep:
    """One look at the loop: end, advance or start a turn."""
    monitor = model.spec.monitor
    spec = monitor.retrain if monitor is not None else None
    assert monitor is not None and spec is not None
    name, model_name = model.metadata.name, parse_model_uri(model.spec.model)[0]
    turns, running, loop = loop_state(previous)
    loop.setdefault("since", now)
    count = int(loop.get("count") or len(turns))

    def status(running: Running | None, ended: TurnRecord | None = None, **extra: Any) -> dict[str, Any]:
        kept = [*turns, ended] if ended is not None else turns
        metrics.LOOP_TURN_RUNNING.labels(name).set(0 if running is None else 1)
        if ended is not None:
            metrics.LOOP_TURNS.labels(name, ended.outcome or "interrupted").inc()
            logger.info(f"loop: turn {ended.turn} ended: {ended.outcome} ({ended.reason})")
        return {**loop, "count": count, "turns": [t.to_dict() for t in kept[-KEPT_TURNS:]],
                "running": None if running is None else running.to_dict(), **extra}

    async def end(turn: Running, outcome: str, reason: str, candidate: str | None = None) -> LoopStep:
        champion = await asyncio.to_thread(registry.alias, model_name, CHAMPION)
        record = replace(turn.record, ended=now, outcome=outcome, reason=reason,
                         candidate_version=candidate or turn.record.candidate_version,
                         champion_after=champion.version if champion else None)
        return LoopStep(status(None, record))

    if running is not None and running.phase == "retraining":
        pipeline = await client.get(kube.pipeline_url(namespace, spec.pipeline))
        if pipeline is None:
            return await end(running, "retrain_failed", f"ModelPipeline {spec.pipeline} was deleted during the turn")
        state = pipeline.get("status") or {}
        if (state.get("observedGeneration") or 0) < (running.generation or 0) or state.get("phase") not in (
                "Succeeded", "Failed", "Invalid"):
            return LoopStep(status(running))
        judged = await asyncio.to_thread(
            retrained, registry, model_name, running.last_before, running.challenger_before,
            state.get("phase") == "Succeeded", f"ended {state.get('phase')} ({_failure(state)})")
        if judged.outcome is not None:
            return await end(running, judged.outcome, f"{judged.reason} ({running.record.run_log})", judged.candidate)
        logger.info(f"loop: turn {running.record.turn}: version {judged.candidate} passed its gates; its canary "
                    "begins")
        record = replace(running.record, candidate_version=judged.candidate)
        return LoopStep(status(replace(running, record=record, phase="rolling_out")), candidate=judged.candidate)

    if running is not None:  # rolling out: the pinned candidate's rollout ends the turn
        candidate = running.record.candidate_version
        if saved is None or saved.subject.candidate_version != candidate or not saved.done:
            return LoopStep(status(running), candidate=candidate)
        return await end(running, "promoted" if saved.phase == "promoted" else "rolled_back", saved.reason)

    # No turn runs: is one due, and may it start?
    requested = annotations.get(ANNOTATION_TRIGGER)
    trigger: Trigger | None
    if requested is not None:
        trigger = Trigger("manual", f"requested by annotation {ANNOTATION_TRIGGER}: {requested or 'no reason given'}")
    else:
        trigger = await _due(model, namespace, spec, signals, monitor.prometheus, turns, float(loop["since"]), now,
                             logger)
    if trigger is None:
        return LoopStep(status(None))
    paused = annotations.get(ANNOTATION_PAUSED)
    guard = {"paused": True, "by": f"annotation {ANNOTATION_PAUSED}", "reason": paused} if paused is not None else {}
    refused = refusal(spec, turns, guard, now)
    if refused is not None:
        metrics.LOOP_REFUSED.labels(name, trigger.kind).inc()
        if requested is None:  # counted, not recorded: a crossed signal meets the cooldown at every look
            return LoopStep(status(None))
        logger.info(f"loop: {trigger.kind} trigger refused: {refused}")
        return LoopStep(status(None, refused={"time": now, "trigger": trigger.kind, "reason": refused}),
                        take_trigger=True)
    started = await _start(client, namespace, model, model_name, registry, trigger, count + 1, now, logger)
    if isinstance(started, str):
        # The pipeline cannot be rerun (missing, invalid): no turn starts, and the status says why.
        return LoopStep(status(None, problem=started), take_trigger=requested is not None)
    count += 1
    return LoopStep(status(started, problem=None), take_trigger=requested is not None)


async def _due(model: ModelDeployment, namespace: str, spec: Any, signals: Signals, prometheus: str | None,
               turns: list[TurnRecord], since: float, now: float, logger: kopf.Logger) -> Trigger | None:
    found: dict[str, float] = {}
    if spec.on_drift and prometheus is not None:
        try:
            found = crossed(model, await asyncio.to_thread(signals, model, namespace, prometheus))
        except PrometheusError as exc:
            # Blind: no trigger on missing data (the monitor's own metric and alert say so).
            logger.warning(f"loop: the monitor's signals could not be read: {exc}")
    last_end = turns[-1].ended if turns and turns[-1].ended is not None else since
    return due_trigger(spec, found, last_end, now)


async def _start(client: kube.Client, namespace: str, model: ModelDeployment, model_name: str, registry: Registry,
                 trigger: Trigger, number: int, now: float, logger: kopf.Logger) -> Running | str:
    """Make the turn's pipeline generation, or say why it cannot be made."""
    spec, capture = model.spec.monitor.retrain, model.spec.capture  # type: ignore[union-attr]
    assert spec is not None and capture is not None and capture.path is not None
    field = "spec.monitor.retrain.pipeline"
    url = kube.pipeline_url(namespace, spec.pipeline)
    body = await client.get(url)
    if body is None:
        return f"{field}: no ModelPipeline {spec.pipeline} in namespace {namespace}; create it, or name the pipeline " \
               "that registers this deployment's model"
    try:
        pipeline = validate(manifest_document(body))
        check_pipeline(pipeline, model_name, field)
        sources = retrain_sources(pipeline, capture.path, spec.traffic_text, now)
    except SpecError as exc:
        return f"{field}: ModelPipeline {spec.pipeline} is not valid: {exc}"
    except KubeForgeError as exc:
        return str(exc)
    last_before = await asyncio.to_thread(last_version, registry, model_name)
    challenger = await asyncio.to_thread(registry.alias, model_name, CHALLENGER)
    champion = await asyncio.to_thread(registry.alias, model_name, CHAMPION)
    patched = await client.merge_patch(url, {
        "metadata": {"annotations": {ANNOTATION_TURN: f"{model.metadata.name} turn {number}"}},
        "spec": {"data": {"sources": sources}},
    })
    if patched is None:
        return f"{field}: ModelPipeline {spec.pipeline} disappeared while the turn started"
    generation = (patched.get("metadata") or {}).get("generation")
    logger.info(f"loop: turn {number} starts ({trigger.kind}: {trigger.detail}): ModelPipeline {spec.pipeline} "
                f"generation {generation} retrains on the traffic captured until now")
    record = TurnRecord(number, trigger, now, spec.pipeline, champion.version if champion else None,
                        run_log=f"ModelPipeline {namespace}/{spec.pipeline} generation {generation}")
    return Running(record, "retraining", generation, last_before, challenger.version if challenger else None)


def _failure(state: Mapping[str, Any]) -> str:
    for reported in state.get("conditions") or []:
        if isinstance(reported, Mapping) and reported.get("type") in ("Failed", "SpecAccepted") and (
                reported.get("status") == ("True" if reported.get("type") == "Failed" else "False")):
            return str(reported.get("message") or reported.get("reason") or "")
    return f"phase {state.get('phase')}"

"""The rollout controller: drives a canary or an A/B test of a served deployment to its end.

Each `tick(now)` measures what is due (Prometheus), lets the pure `decision` module decide, saves the new
record, and only then makes the world match the record (`reconcile`): the router's candidate weight, the
`champion` alias once promoted, the candidate version's rollout tags. Saving before acting, and acting
idempotently, is what makes a controller that dies anywhere safe to start again: the next start loads
the record and reconciles once more. `kubeforge serve` runs it next to the local application; the
operator of [5/5] keeps the same record in the ModelDeployment's status.

The record is one JSON file per deployment (`RolloutStore`), written atomically.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from kubeforge.errors import KubeForgeError
from kubeforge.rollout import decision
from kubeforge.rollout.decision import Action, CanaryState, CheckResult
from kubeforge.rollout.prometheus import PrometheusError, query_buckets, query_value
from kubeforge.rollout.queries import CANDIDATE, STABLE, ab_queries, builtin_queries
from kubeforge.rollout.stats import ABComparison, compare_error_rates, compare_histograms
from kubeforge.spec.deployment import ABRollout, CanaryRollout, prometheus_url

logger = logging.getLogger("kubeforge.rollout")

Phase = Literal["progressing", "promoted", "rolled_back", "concluded"]
"""`concluded`: an A/B test ended without acting (no significant winner, or a win without `promote_winner`);
the split stays until a person promotes or aborts."""
PHASES: tuple[Phase, ...] = ("progressing", "promoted", "rolled_back", "concluded")
TERMINAL: frozenset[str] = frozenset({"promoted", "rolled_back", "concluded"})

ROLLOUT_USER = "kubeforge-rollout"
"""Who the registry's audit record names for an automatic promotion."""
TAG_RESULT = "kubeforge.rollout"
TAG_REASON = "kubeforge.rollout.reason"
TAG_DEPLOYMENT = "kubeforge.rollout.deployment"
TAG_LIMIT = 5000
"""MLflow's limit on a tag value."""
EVENT_LIMIT = 200
"""Events kept in the record (a long canary of small steps must not grow the file without bound)."""


class Router(Protocol):
    """What the controller changes on the serving side: the candidate's share of new requests."""

    def set_weight(self, weight: int) -> None: ...


class RolloutRegistry(Protocol):
    """The parts of `kubeforge.registry.Registry` the controller uses."""

    def alias(self, model: str, alias: str) -> Any: ...

    def promote(self, model: str, version: str, *, alias: str = ..., reason: str, user: str,
                force: bool = ...) -> Any: ...

    def set_tags(self, model: str, version: str, tags: Mapping[str, str]) -> None: ...


@dataclass(frozen=True)
class Subject:
    """What is rolled out where: the served stable version and the candidate version."""

    deployment: str
    model: str
    stable_version: str
    candidate_model: str
    candidate_version: str

    def to_dict(self) -> dict[str, str]:
        return {"deployment": self.deployment, "model": self.model, "stable_version": self.stable_version,
                "candidate_model": self.candidate_model, "candidate_version": self.candidate_version}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Subject:
        return cls(**{k: str(data[k]) for k in ("deployment", "model", "stable_version", "candidate_model",
                                                "candidate_version")})


@dataclass(frozen=True)
class Event:
    """A change of traffic or phase, for the timeline."""

    time: float
    kind: str
    """"start", "set_weight", "promote", "rollback", "concluded" or "abort"."""
    weight: int
    reason: str


@dataclass(frozen=True)
class RolloutRecord:
    subject: Subject
    strategy: Literal["canary", "ab"]
    started: float
    phase: Phase
    weight: int
    """The candidate's share of traffic (percent) the world must match."""
    reason: str
    canary: CanaryState | None = None
    ab: dict[str, Any] | None = None
    """The A/B comparison once made (`ABComparison` as a dict)."""
    events: tuple[Event, ...] = ()

    @property
    def done(self) -> bool:
        return self.phase in TERMINAL

    def to_dict(self) -> dict[str, Any]:
        return {
            "subject": self.subject.to_dict(),
            "strategy": self.strategy,
            "started": self.started,
            "phase": self.phase,
            "weight": self.weight,
            "reason": self.reason,
            "canary": None if self.canary is None else self.canary.to_dict(),
            "ab": self.ab,
            "events": [vars(e) for e in self.events],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RolloutRecord:
        phase = data["phase"]
        if phase not in PHASES:
            raise ValueError(f"phase: {phase!r} is not one of {', '.join(PHASES)}")
        strategy = data["strategy"]
        if strategy not in ("canary", "ab"):
            raise ValueError(f"strategy: {strategy!r} is not canary or ab")
        return cls(
            subject=Subject.from_dict(data["subject"]),
            strategy=strategy,
            started=float(data["started"]),
            phase=phase,
            weight=int(data["weight"]),
            reason=str(data.get("reason", "")),
            canary=None if data.get("canary") is None else CanaryState.from_dict(data["canary"]),
            ab=data.get("ab"),
            events=tuple(Event(float(e["time"]), str(e["kind"]), int(e["weight"]), str(e["reason"]))
                         for e in data.get("events", [])),
        )

    def with_event(self, time: float, kind: str, reason: str) -> RolloutRecord:
        event = Event(time, kind, self.weight, reason)
        return replace(self, reason=reason, events=(*self.events, event)[-EVENT_LIMIT:])


class RolloutStore:
    """The record and a person's abort request, as files in one folder per deployment."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / "rollout.json"
        self.abort_path = folder / "abort.json"

    def load(self) -> RolloutRecord | None:
        if not self.path.is_file():
            return None
        try:
            return RolloutRecord.from_dict(json.loads(self.path.read_text()))
        except (ValueError, KeyError, TypeError) as exc:
            raise KubeForgeError(f"{self.path}: not a rollout record ({exc}); move it away to start the rollout "
                                 "afresh") from exc

    def save(self, record: RolloutRecord) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record.to_dict(), indent=2, allow_nan=False) + "\n")
        os.replace(tmp, self.path)  # a reader (`kubeforge rollout status`) never sees half a file

    def request_abort(self, reason: str, user: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.abort_path.write_text(json.dumps({"reason": reason, "user": user}) + "\n")

    def take_abort(self) -> str | None:
        """The pending abort request as "reason (by user)", removing it; None without one."""
        if not self.abort_path.is_file():
            return None
        try:
            request = json.loads(self.abort_path.read_text())
            text = f"{request['reason']} (by {request['user']})"
        except (ValueError, KeyError, TypeError):
            text = f"unreadable abort request in {self.abort_path}"
        self.abort_path.unlink()
        return text


def begin(policy: CanaryRollout | ABRollout, subject: Subject, previous: RolloutRecord | None,
          now: float) -> RolloutRecord:
    """The record to run: `previous` when it is a rollout of the same versions (resume, or a finished
    one that is only reconciled), else a new one at the policy's first weight."""
    if previous is not None and previous.subject == subject and previous.strategy == policy.strategy:
        return previous
    if isinstance(policy, CanaryRollout):
        state = decision.start(policy, now)
        record = RolloutRecord(subject, "canary", now, "progressing", state.weight, state.reason, canary=state)
    else:
        reason = f"A/B split at {policy.weight}% for {policy.duration_s:g}s on {policy.metric}"
        record = RolloutRecord(subject, "ab", now, "progressing", policy.weight, reason)
    return record.with_event(now, "start", record.reason)


# --- measuring ---------------------------------------------------------------------------------------


def measure_canary(policy: CanaryRollout, subject: Subject) -> list[CheckResult]:
    """Every check of the analysis, from Prometheus, for the candidate version.

    A query Prometheus cannot answer (unreachable, refused) is judged like no data: inconclusive, with the
    error as its detail; it never passes, and `inconclusive_limit` in a row rolls back."""
    analysis = policy.analysis
    queries = builtin_queries(analysis, subject.candidate_model, subject.candidate_version, CANDIDATE)
    values: dict[str, float | None] = {}
    errors: dict[str, str] = {}
    for name, promql in queries.items():
        try:
            values[name] = query_value(prometheus_url(policy), promql)
        except PrometheusError as exc:
            values[name], errors[name] = None, str(exc)
    results = decision.judge(analysis, values)
    return [replace(r, detail=f"{r.name}: {errors[r.name]}") if r.name in errors else r for r in results]


def measure_ab(policy: ABRollout, subject: Subject, end: float) -> ABComparison:
    """The A/B comparison over the test's window, which ends at `end` (pinned, so a late decision sees
    the same window)."""
    labels = {CANDIDATE: (subject.candidate_model, subject.candidate_version),
              STABLE: (subject.model, subject.stable_version)}
    queries = {v: ab_queries(policy, model, version, v, end=end) for v, (model, version) in labels.items()}
    base = prometheus_url(policy)
    if policy.metric == "error_rate":
        counts = {v: (query_value(base, q["errors"]) or 0.0, query_value(base, q["requests"]) or 0.0)
                  for v, q in queries.items()}
        return compare_error_rates(*counts[CANDIDATE], *counts[STABLE], alpha=policy.alpha,
                                   min_samples=policy.min_samples)
    buckets = {v: query_buckets(base, q["buckets"]) for v, q in queries.items()}
    return compare_histograms(buckets[CANDIDATE], buckets[STABLE], alpha=policy.alpha,
                              min_samples=policy.min_samples, metric=policy.metric)


# --- the controller ----------------------------------------------------------------------------------


Measure = Callable[[CanaryRollout, Subject], Sequence[CheckResult]]
Compare = Callable[[ABRollout, Subject, float], ABComparison]


def step_record(
    policy: CanaryRollout | ABRollout,
    record: RolloutRecord,
    now: float,
    *,
    abort: str | None = None,
    measure: Measure = measure_canary,
    compare: Compare = measure_ab,
) -> RolloutRecord:
    """The record after `now`: an abort request (`abort`, its reason) rolls back; otherwise a due canary
    analysis or A/B comparison is made and decided. Returns `record` itself when nothing changed, so
    callers save and act only on a new object. Measuring is the only I/O, and it is injected."""
    if record.done:
        return record
    if abort is not None:
        if record.canary is not None:
            aborted, action = decision.abort(record.canary, abort)
            record = replace(record, canary=aborted)
        else:
            action = Action("rollback", 0, f"aborted: {abort}")
        return _with_action(replace(record, phase="rolled_back", weight=0), now, action, kind="abort")
    if isinstance(policy, CanaryRollout):
        state = record.canary
        if state is None:
            raise ValueError("a canary rollout's record has no canary state")
        if not decision.analysis_due(policy, state, now):
            return record
        results = list(measure(policy, record.subject))
        state, action = decision.advance(policy, state, now, results)
        logger.info("analysis at step %d: %s -> %s (%s)", state.step + 1, decision.overall(results), action.kind,
                    action.reason)
        return _with_action(replace(record, canary=state, phase=state.phase, weight=state.weight), now, action)
    if not decision.ab_due(policy, record.started, now):
        return record
    comparison = compare(policy, record.subject, record.started + policy.duration_s)
    action = decision.ab_decide(policy, comparison)
    phase: Phase = "concluded"
    if action.kind == "promote":
        phase = "promoted"
    elif action.kind == "rollback":
        phase = "rolled_back"
    new = replace(record, phase=phase, weight=action.weight, ab=_comparison_dict(comparison))
    return _with_action(new, now, action, kind="concluded" if action.kind == "none" else action.kind)


def settle_registry(record: RolloutRecord, registry: RolloutRegistry) -> None:
    """The registry side of a finished rollout, idempotent: `champion` moved to a promoted candidate (once),
    the candidate version tagged with the outcome and its reason."""
    if not record.done:
        return
    subject = record.subject
    if record.phase == "promoted":
        champion = registry.alias(subject.candidate_model, "champion")
        if champion is None or champion.version != subject.candidate_version:
            registry.promote(subject.candidate_model, subject.candidate_version, alias="champion",
                             reason=f"rollout of '{subject.deployment}': {record.reason}", user=ROLLOUT_USER)
    registry.set_tags(subject.candidate_model, subject.candidate_version, {
        TAG_RESULT: record.phase,
        TAG_REASON: record.reason[:TAG_LIMIT],
        TAG_DEPLOYMENT: subject.deployment,
    })


def export_metrics(new: RolloutRecord, old: RolloutRecord | None) -> None:
    """Export the record as metrics. Counters count what changed since `old`; with no `old` (a start or a
    restart) only the gauges are set, so a restart does not count past analyses again."""
    from kubeforge import metrics

    name = new.subject.deployment
    metrics.ROLLOUT_WEIGHT.labels(deployment=name).set(new.weight)
    metrics.ROLLOUT_PHASE.labels(deployment=name).state(new.phase)
    if new.canary is not None:
        metrics.ROLLOUT_STEP.labels(deployment=name).set(new.canary.step + 1)
    if old is None:
        return
    seen = {a.time for a in old.canary.history} if old.canary is not None else set()
    for analysis in new.canary.history if new.canary is not None else ():
        if analysis.time in seen:
            continue
        metrics.ROLLOUT_ANALYSES.labels(deployment=name, verdict=analysis.overall).inc()
        for result in analysis.results:
            if result.value is not None:
                metrics.ROLLOUT_CHECK_VALUE.labels(deployment=name, check=result.name).set(result.value)
    if not old.done and new.done:
        if new.phase == "promoted":
            metrics.ROLLOUT_PROMOTIONS.labels(deployment=name).inc()
        elif new.phase == "rolled_back":
            metrics.ROLLOUT_ROLLBACKS.labels(deployment=name).inc()


def _with_action(record: RolloutRecord, now: float, action: Action, kind: str | None = None) -> RolloutRecord:
    record = replace(record, reason=action.reason)
    if action.kind == "none" and kind is None:
        return record
    return record.with_event(now, kind or action.kind, action.reason)


class RolloutController:
    """Runs one rollout on this machine: `start()` once, then `tick()` until `record.done`, keeping the
    record in a `RolloutStore` and acting through a `Router`.

    `measure` and `compare` default to Prometheus; they are parameters so that the state handling can
    be exercised without a server."""

    def __init__(
        self,
        policy: CanaryRollout | ABRollout,
        subject: Subject,
        router: Router,
        registry: RolloutRegistry,
        store: RolloutStore,
        *,
        measure: Measure = measure_canary,
        compare: Compare = measure_ab,
    ) -> None:
        self.policy, self.subject, self.router, self.registry, self.store = policy, subject, router, registry, store
        self.measure, self.compare = measure, compare
        self.record: RolloutRecord | None = None

    def start(self, now: float) -> RolloutRecord:
        self.record = begin(self.policy, self.subject, self.store.load(), now)
        export_metrics(self.record, None)
        self.store.save(self.record)
        self.reconcile()
        return self.record

    def tick(self, now: float) -> RolloutRecord:
        """Act on an abort request or a due analysis / comparison; otherwise nothing changes."""
        record = self._require_started()
        abort = self.store.take_abort()
        new = step_record(self.policy, record, now, abort=abort, measure=self.measure, compare=self.compare)
        if new is not record:
            self.record = new
            export_metrics(new, record)
            self.store.save(new)
            self.reconcile()
        return new

    def reconcile(self) -> None:
        """Make the router and the registry match the record; safe to repeat."""
        record = self._require_started()
        self.router.set_weight(record.weight)
        settle_registry(record, self.registry)

    def _require_started(self) -> RolloutRecord:
        if self.record is None:
            raise RuntimeError("RolloutController.start() must run before tick() and reconcile()")
        return self.record


def _comparison_dict(comparison: ABComparison) -> dict[str, Any]:
    from dataclasses import asdict

    data = asdict(comparison)
    # JSON has no infinities: a median in the +Inf bucket is written as Prometheus writes it.
    for side in ("candidate", "stable"):
        median = data[side].get("median_le")
        if median is not None and median == float("inf"):
            data[side]["median_le"] = "+Inf"
    return data

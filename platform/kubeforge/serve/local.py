"""`kubeforge serve`: resolve the deployment's models, run the application on local Ray Serve, and drive
its rollout (if any) with `kubeforge.rollout.controller` until it ends.

Rollout records live in `<workdir>/deployments/<name>/rollout.json`. Starting `kubeforge serve` again
with the same stable and candidate versions resumes the rollout where it stopped (the application
restarts at the recorded weight); a finished rollout is not run twice.

With `spec.monitor`, once that rollout has ended the monitor runs beside serving (`kubeforge.monitor.runner`),
and with `spec.monitor.retrain` so does the retraining loop, whose canaries run here too
(`kubeforge.serve.loop`), in `<workdir>/deployments/<name>/loop/`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kubeforge.errors import KubeForgeError
from kubeforge.monitor.check import Monitor
from kubeforge.monitor.loop import LoopStore, Turn
from kubeforge.monitor.runner import MonitorRunner
from kubeforge.monitor.webhook import AlertWebhook
from kubeforge.registry.client import Registry
from kubeforge.rollout.controller import RolloutController, RolloutRecord, RolloutStore, Subject, begin
from kubeforge.rollout.prometheus import PrometheusError, query_value
from kubeforge.rollout.queries import CANDIDATE, STABLE
from kubeforge.serve.app import LORA_BASE, VariantModel, build_app, router_handle
from kubeforge.serve.auth import require_local_source
from kubeforge.serve.loop import LocalCanary, Served, prepare_loop
from kubeforge.serve.resolve import ResolvedAdapter, ResolvedModel, resolve_adapter, resolve_model
from kubeforge.spec.deployment import (
    ABRollout,
    CanaryRollout,
    ModelDeployment,
    parse_model_uri,
    prometheus_field,
    prometheus_url,
)
from kubeforge.spec.monitor import SLO_SIGNALS
from kubeforge.spec.pipeline import ModelPipeline
from kubeforge.workdir import Workdir

POLL_S = 1.0
"""How often the controller looks for a due analysis or an abort request; analyses run every
`analysis.interval_s`, so this only bounds how late one starts."""


@dataclass(frozen=True)
class ServeOptions:
    workdir: Workdir
    registry: Registry
    ray_address: str | None = None
    num_cpus: int | None = None
    host: str = "127.0.0.1"
    exit_when_done: bool = False
    """Stop serving once the rollout has ended (scripts, the demo); without a rollout, return at once."""
    base_dir: Path = Path(".")
    """The manifest's folder: `spec.monitor.retrain.pipeline` is relative to it."""


class ServeRouter:
    """The controller's `Router` for a local application: a Serve handle call on the router replica."""

    def __init__(self, app_name: str) -> None:
        self.app_name = app_name

    def set_weight(self, weight: int) -> None:

        router_handle(self.app_name).set_weight.remote(weight).result()


def rollout_store(workdir: Workdir, deployment: str) -> RolloutStore:
    return RolloutStore(workdir.root / "deployments" / deployment)


def serve_deployment(document: ModelDeployment, options: ServeOptions, say: Callable[[str], None]) -> (
        RolloutRecord | None):
    """Serve `document` until Ctrl-C (or, with `exit_when_done`, until its rollout ends); returns the
    rollout's final record, or None without a rollout."""
    import ray
    from ray import serve

    from kubeforge.runtime import ensure_ray, reap_orphans, sigterm_as_interrupt

    name, spec = document.metadata.name, document.spec
    require_local_source(spec.auth)  # before models are downloaded or Ray starts
    device = "cuda" if spec.resources.gpus_per_replica > 0 else "cpu"
    cache = options.workdir.root / "serve-models"
    lora = spec.lora

    def resolve(uri: str) -> ResolvedModel | ResolvedAdapter:
        if lora is None:
            return resolve_model(uri, options.registry, cache, spec.engine.name, device, spec.engine.dtype)
        return resolve_adapter(uri, options.registry, cache, lora.max_rank)

    monitor = make_monitor(document, options) if spec.monitor is not None else None
    loop = (prepare_loop(document, options.workdir.root, options.base_dir)
            if spec.monitor is not None and spec.monitor.retrain is not None else None)
    stable = resolve(spec.model)
    say(f"stable: {spec.model} -> version {stable.version} ({stable.path})")
    variants = [VariantModel(STABLE, stable.model, stable.version, stable.path)]
    policy = spec.rollout
    candidate: ResolvedModel | ResolvedAdapter | None = None
    if policy is not None:
        candidate = resolve(policy.candidate)
        say(f"candidate: {policy.candidate} -> version {candidate.version} ({candidate.path})")
        if (candidate.model, candidate.version) == (stable.model, stable.version):
            # After a promotion, `@champion` and `@challenger` name the same version until the next pipeline run.
            say(f"nothing to roll out: {policy.candidate} is the version already served; serving it alone")
            policy, candidate, spec = None, None, spec.model_copy(update={"rollout": None})
        else:
            preflight(policy, candidate, options.registry)
            variants.append(VariantModel(CANDIDATE, candidate.model, candidate.version, candidate.path))
    base = None
    if lora is not None:
        adapters = {v: a for v, a in ((STABLE, stable), (CANDIDATE, candidate)) if isinstance(a, ResolvedAdapter)}
        for adapter_name, uri in lora.adapters.items():
            adapter = adapters[adapter_name] = resolve_adapter(uri, options.registry, cache, lora.max_rank)
            say(f"adapter {adapter_name}: {uri} -> version {adapter.version} ({adapter.path})")
            variants.append(VariantModel(adapter_name, adapter.model, adapter.version, adapter.path))
        base = lora_base(adapters, options.registry, cache, device, spec.engine.dtype)
        say(f"base of the adapters: version {base.version} ({base.path})")

    controller: RolloutController | None = None
    weight = 0
    if policy is not None and candidate is not None:
        subject = Subject(name, stable.model, stable.version, candidate.model, candidate.version)
        store = rollout_store(options.workdir, name)
        controller = RolloutController(policy, subject, ServeRouter(name), options.registry, store)
        weight = begin(policy, subject, store.load(), time.time()).weight  # resume at the recorded weight
    # Checks the engine settings before Ray starts.
    app = build_app(variants, spec, weight=weight, base=base, capture_dir=str(options.workdir.traffic(name).resolve()))
    if spec.capture is not None:
        say(f"capturing {spec.capture.sample_rate:.0%} of the traffic (redacted) to "
            f"{spec.capture.path or options.workdir.traffic(name)}")

    def reap() -> None:
        for process in reap_orphans():
            say(f"stopped {process}, left running by a Ray runtime that is gone")

    with sigterm_as_interrupt():
        local = options.ray_address is None and not os.environ.get("RAY_ADDRESS")
        if local:
            reap()
        # A runtime of its own: this process stops what it started, and a runtime that crashed just
        # before (still stopping) must not be joined.
        started = ensure_ray(options.ray_address, options.num_cpus, join_running=False)
    # Again after Ray started: `ray.init` installs a SIGTERM handler of its own, which ends the process.
    with sigterm_as_interrupt():
        try:
            serve.start(http_options={"host": options.host, "port": spec.port})
            serve.run(app, name=name, route_prefix="/")
            if local:
                # Once more: a runtime that crashed just before this start may have still been stopping.
                reap()
            say(f"serving '{name}' at http://{options.host}:{spec.port}/v1 (Ctrl-C stops it)")
            try:
                record = None if controller is None else run_rollout(controller, say)
                if options.exit_when_done:
                    return record
                if monitor is not None:
                    promoted = record is not None and record.phase == "promoted"
                    runner = monitor_runner(document, options, monitor, loop, candidate if promoted else stable,
                                            promoted, resolve, say)
                    with runner.running(), alert_webhook(document, options, runner, say):
                        while True:
                            time.sleep(3600)
                while True:
                    time.sleep(3600)
            finally:
                for extra in loop_applications(name):
                    serve.delete(extra)
                serve.delete(name)
        finally:
            if started:
                # Serve's proxy (HAProxy, a child of an actor) is stopped by Serve, not by Ray's shutdown.
                serve.shutdown()
                ray.shutdown()


def monitor_runner(document: ModelDeployment, options: ServeOptions, monitor: Monitor,
                   loop: tuple[Path, ModelPipeline, LoopStore] | None, served: ResolvedModel | ResolvedAdapter | None,
                   promoted: bool, resolve: Callable[[str], ResolvedModel | ResolvedAdapter],
                   say: Callable[[str], None]) -> MonitorRunner:
    """The monitor of the running application, with the retraining loop when the manifest asks for it."""

    name, retrain = document.metadata.name, monitor.spec.retrain
    # After a promotion the candidate variant serves everything (spec.monitor refuses lora: no adapters here).
    assert isinstance(served, ResolvedModel)
    state = Served(served)
    turn = None
    if loop is not None and retrain is not None:
        if promoted:
            # The loop's next version takes the candidate slot: the promoted one becomes stable first.
            router_handle(name).promote_candidate.remote().result()
        manifest, pipeline, store = loop
        assert monitor.capture_dir is not None  # spec.monitor.retrain requires spec.capture
        stop = threading.Event()

        def resolve_model_version(uri: str) -> ResolvedModel:
            resolved = resolve(uri)
            assert isinstance(resolved, ResolvedModel)
            return resolved

        canary = LocalCanary(document, state, ServeRouter(name), options.registry, rollout_store(options.workdir, name),
                             resolve_model_version, stop, say,
                             lambda policy, candidate: preflight(policy, candidate, options.registry))
        turn = (store, Turn(manifest=manifest, pipeline=pipeline, retrain=retrain,
                            capture_dir=monitor.capture_dir, workdir=options.workdir.root,
                            registry=options.registry, store=store, roll_out=canary, stop=stop))
        say(f"retraining loop: {manifest} on the captured traffic (kubeforge loop status {name})")
    say(f"monitoring: every {monitor.spec.interval_s:g} s (kubeforge_monitor_* metrics)")
    return MonitorRunner(name, monitor, lambda: (state.model.version, state.model.path), turn, say)


def alert_webhook(document: ModelDeployment, options: ServeOptions, runner: MonitorRunner,
                  say: Callable[[str], None]) -> contextlib.AbstractContextManager[object]:
    """Alertmanager's webhook receiver while serving, when the loop listens for alerts."""
    monitor = document.spec.monitor
    trigger = monitor.retrain.alertmanager if monitor is not None and monitor.retrain is not None else None
    if trigger is None:
        return contextlib.nullcontext()
    model, _ = parse_model_uri(document.spec.model)
    webhook = AlertWebhook(document.metadata.name, model, trigger.alerts, runner.request, options.host, trigger.port)
    say(f"retraining loop: Alertmanager's notifications of {', '.join(trigger.alerts)} at {webhook.url}")
    return webhook


def loop_applications(deployment: str) -> list[str]:
    """The applications the retraining loop added beside `deployment`'s (`<deployment>-v<version>`)."""
    from ray import serve

    try:
        applications = serve.status().applications
    except Exception:  # Serve already gone: nothing of the loop's to delete
        return []
    return [app for app in applications if app.startswith(f"{deployment}-v") and app[len(deployment) + 2:].isdigit()]


def make_monitor(document: ModelDeployment, options: ServeOptions) -> Monitor:
    """The deployment's monitor, or one error naming the field it lacks."""
    spec, monitor = document.spec, document.spec.monitor
    assert monitor is not None
    prometheus = monitor.prometheus
    if prometheus is None and spec.rollout is not None:
        prometheus = prometheus_field(spec.rollout)[1]
    slo = [name for name, _ in monitor.thresholds.items() if name in SLO_SIGNALS]
    if slo and prometheus is None:
        raise KubeForgeError(f"spec.monitor.prometheus: required for {', '.join(slo)} (the address of the Prometheus "
                             "that scrapes this deployment, e.g. http://localhost:9090)")
    capture = spec.capture.path if spec.capture is not None and spec.capture.path else str(
        options.workdir.traffic(document.metadata.name).resolve())
    if monitor.training_data:
        from kubeforge.data.sources import input_files

        input_files(monitor.training_data, options.base_dir, "spec.monitor.training_data")  # a corpus with no file
    model, _ = parse_model_uri(spec.model)
    return Monitor(monitor, model, capture, prometheus, base_dir=options.base_dir)


def run_rollout(controller: RolloutController, say: Callable[[str], None]) -> RolloutRecord:
    record = controller.start(time.time())
    say(f"rollout {record.strategy}: {record.phase}, candidate at {record.weight}% ({record.reason})")
    seen = len(record.events)
    while not record.done:
        time.sleep(POLL_S)
        record = controller.tick(time.time())
        for event in record.events[seen:]:
            say(f"rollout: {event.kind} -> candidate at {event.weight}% ({event.reason})")
        seen = len(record.events)
    say(f"rollout ended: {record.phase} ({record.reason})")
    return record


def lora_base(adapters: dict[str, ResolvedAdapter], registry: Registry, cache: Path, device: str,
              dtype: str = "auto") -> VariantModel:
    """The one version that every adapter was fine-tuned from, resolved: what the replicas serve them over."""
    bases = {(a.model, a.base_version) for a in adapters.values()}
    if len(bases) != 1:
        described = "; ".join(f"{variant} {a.uri} is version {a.version}, fine-tuned from version {a.base_version} "
                              f"of {a.model}" for variant, a in adapters.items())
        raise KubeForgeError(f"spec.lora: adapters served together must be fine-tuned from one base version "
                             f"({described}); serve them in separate deployments, or without spec.lora")
    ((model, version),) = bases
    base = resolve_model(f"models:/{model}/{version}", registry, cache, "vllm", device, dtype)
    return VariantModel(LORA_BASE, base.model, base.version, base.path)


def preflight(policy: CanaryRollout | ABRollout, candidate: ResolvedModel | ResolvedAdapter,
              registry: Registry) -> None:
    """Refuse a rollout that could only end badly: a candidate that must not become champion, or a
    Prometheus that cannot be asked (every analysis would be inconclusive until the rollout rolls back)."""
    info = registry.version(candidate.model, candidate.version)
    blocked = None
    if info.gates == "failed":
        blocked = "failed its promotion gates"
    elif info.approval in ("pending", "rejected"):
        blocked = "is awaiting approval" if info.approval == "pending" else "was rejected at approval"
    if blocked:
        raise KubeForgeError(
            f"spec.rollout.candidate: {candidate.uri} (version {candidate.version}) {blocked}, and a successful "
            "rollout would make it champion; roll out another version"
        )
    address = prometheus_url(policy)
    try:
        query_value(address, "vector(1)")
    except PrometheusError as exc:
        raise KubeForgeError(f"{prometheus_field(policy)[0]}: {exc}; start Prometheus scraping this deployment "
                             "first") from None

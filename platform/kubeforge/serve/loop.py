"""The retraining loop of `kubeforge serve` (`spec.monitor.retrain`): what a turn needs of the running
deployment, the canary of a new version.

Redeploying the application would restart every replica (Ray Serve gives each `serve.run` new versions,
and a rolling update stops a replica before it starts its successor), so a turn's new version is served
as an application of its own (`<deployment>-v<version>`, one model server, no route) that the router
reaches by handle. The canary then runs as any rollout does (`kubeforge.rollout.controller`, Prometheus
analyses, `kubeforge rollout status|abort`). Promoted, the version becomes the router's stable variant in
one step, and the application of the version it replaced, if the loop made it, is deleted; rolled back, it
is detached and deleted. The replica the deployment started with is part of the main application and stays
(idle after the first promotion) until `kubeforge serve` restarts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kubeforge.errors import KubeForgeError
from kubeforge.monitor.loop import LoopStore, check_pipeline, loop_store
from kubeforge.registry.client import Registry
from kubeforge.rollout.controller import RolloutController, RolloutStore, Router, Subject
from kubeforge.rollout.queries import CANDIDATE
from kubeforge.serve.app import VariantModel, build_variant_app, router_handle
from kubeforge.serve.resolve import ResolvedModel
from kubeforge.spec.deployment import CanaryRollout, ModelDeployment, parse_model_uri, prometheus_url
from kubeforge.spec.pipeline import ModelPipeline

POLL_S = 1.0


@dataclass
class Served:
    """The version the stable variant serves now, and the loop's application that serves it (None for the
    version the deployment started with, which lives in the main application)."""

    model: ResolvedModel
    app: str | None = None


@dataclass
class LocalCanary:
    """`roll_out(version)` for `Turn`: the deployment's canary of `version` on the running application."""

    document: ModelDeployment
    served: Served
    router: Router
    registry: Registry
    store: RolloutStore
    resolve: Callable[[str], ResolvedModel]
    stop: threading.Event
    say: Callable[[str], None]
    preflight: Callable[[CanaryRollout, ResolvedModel], None]

    def __call__(self, version: str) -> tuple[bool, str]:
        from ray import serve

        name, spec = self.document.metadata.name, self.document.spec
        policy = spec.rollout
        assert isinstance(policy, CanaryRollout)  # spec.monitor.retrain requires it
        model, _ = parse_model_uri(spec.model)
        candidate = self.resolve(f"models:/{model}/{version}")
        self.preflight(policy, candidate)
        app = f"{name}-v{version}"
        self.say(f"loop: serving version {version} as application {app} beside '{name}'")
        serve.run(build_variant_app(VariantModel(CANDIDATE, candidate.model, candidate.version, candidate.path),
                                    spec), name=app, route_prefix=None)
        router = router_handle(name)
        router.attach_candidate.remote(app, f"model-{CANDIDATE}", candidate.model, candidate.version).result()
        stable = self.served.model
        subject = Subject(name, stable.model, stable.version, candidate.model, candidate.version)
        controller = RolloutController(policy, subject, self.router, self.registry, self.store)
        record = controller.start(time.time())
        self.say(f"rollout canary: candidate version {version} at {record.weight}% ({record.reason})")
        seen = len(record.events)
        while not record.done:
            if self.stop.wait(POLL_S):
                # The record stays; restarted, `kubeforge serve` resumes this rollout from spec.rollout.
                return False, "the serving process stopped during the canary"
            record = controller.tick(time.time())
            for event in record.events[seen:]:
                self.say(f"rollout: {event.kind} -> candidate at {event.weight}% ({event.reason})")
            seen = len(record.events)
        if record.phase == "promoted":
            router.promote_candidate.remote().result()
            replaced, self.served.model, self.served.app = self.served.app, candidate, app
            if replaced is not None:
                serve.delete(replaced)
        else:
            router.detach_candidate.remote().result()
            serve.delete(app)
        return record.phase == "promoted", record.reason


def prepare_loop(document: ModelDeployment, workdir_root: Path, base_dir: Path) -> tuple[
        Path, ModelPipeline, LoopStore]:
    """The retraining pipeline's manifest (checked against the deployment) and the loop's store; one error
    naming `spec.monitor.retrain.pipeline` when it cannot be used."""
    from kubeforge.spec.load import load_manifest

    monitor = document.spec.monitor
    assert monitor is not None and monitor.retrain is not None
    field = "spec.monitor.retrain.pipeline"
    path = (base_dir / monitor.retrain.pipeline).resolve()
    if not path.is_file():
        raise KubeForgeError(f"{field}: no pipeline manifest at {path}")
    try:
        pipeline = load_manifest(path)
    except KubeForgeError as exc:
        raise KubeForgeError(f"{field}: {path} is not a valid pipeline: {exc}") from None
    model, _ = parse_model_uri(document.spec.model)
    check_pipeline(pipeline, model, field)
    assert isinstance(document.spec.rollout, CanaryRollout)  # spec.monitor.retrain requires a canary
    prometheus_url(document.spec.rollout)  # its analyses need one: refused now, not after a retraining run
    return path, pipeline, loop_store(workdir_root, document.metadata.name)


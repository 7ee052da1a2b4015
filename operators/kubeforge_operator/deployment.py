"""Reconciling a ModelDeployment: validate it, pin its model versions, serve them from one KubeRay
RayService, and drive its rollout with the same pure decision code `kubeforge serve` uses.

What is served is pinned: `spec.model` and `spec.rollout.candidate` are resolved through the MLflow
registry once per generation of the spec and kept in `status.modelVersion` / `status.candidateVersion`,
so an alias that moves later (a promotion, a new pipeline run) changes nothing until the spec does.

The rollout record (`kubeforge.rollout.controller.RolloutRecord`) lives in `status.rollout`. Every
reconciliation, which a kopf timer repeats every `POLL_S` while a rollout runs, steps it
(`step_record`: an abort request, or an analysis when one is due), saves a changed record to the
status, and only then makes the world match it: the router's weight in the RayService's serveConfigV2
(which Ray Serve applies in place), and once the rollout has ended the registry (`settle_registry`:
`champion` moved on promotion, the candidate tagged). Saving before acting is what lets a reconciliation
that dies in between be finished by the next one: acting from the record is idempotent.

A person aborts a running rollout with an annotation, which the operator removes once it has acted:

    kubectl annotate modeldeployment quickstart kubeforge.io/rollout-abort="latency regression in eu"
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Final

import kopf

from kubeforge.errors import Problem, SpecError
from kubeforge.filesystems import is_uri
from kubeforge.registry.audit import RegistryError
from kubeforge.registry.client import Registry, VersionInfo
from kubeforge.rollout.controller import (
    Compare,
    Measure,
    RolloutRecord,
    Subject,
    begin,
    export_metrics,
    measure_ab,
    measure_canary,
    settle_registry,
    step_record,
)
from kubeforge.rollout.queries import CANDIDATE, STABLE
from kubeforge.spec.deployment import ModelDeployment, parse_model_uri, prometheus_field, with_prometheus
from kubeforge.spec.load import parse_deployment
from kubeforge.spec.monitor import SLO_SIGNALS
from kubeforge.spec.pipeline import API_VERSION
from kubeforge_operator import kube, loop, metrics
from kubeforge_operator.config import PREFIX, OperatorConfig
from kubeforge_operator.errors import FieldError, retry_semantics
from kubeforge_operator.owner import Owner
from kubeforge_operator.pipeline import manifest_document
from kubeforge_operator.rayservice import (
    ANNOTATION_SPEC_HASH,
    deployment_status,
    pod_token_secret,
    rayservice,
    rayservice_name,
    rayservice_ready,
    serve_weight,
    unresolved_status,
)
from kubeforge_operator.reconciling import object_lock, write_invalid, write_status

KIND: Final = "ModelDeployment"
PLURAL = "modeldeployments"
ANNOTATION_ABORT = "kubeforge.io/rollout-abort"
"""A person's request to roll the running rollout back; its value is the reason."""
POLL_S = 1.0
"""How often a running rollout is looked at. Analyses run every `analysis.interval_s` of the spec, so
this only bounds how late one starts (as `kubeforge serve`'s POLL_S); a look at a rollout with nothing
due makes two GET requests and no write."""
RESOLVE_RETRY_S = 30.0
"""A model URI that does not resolve (an alias a pipeline has not set yet, MLflow unreachable) is tried
again after this long."""
MEMO_KEY = "measurements"
"""Where in kopf's memo a test puts its `Measurements`; absent, analyses query Prometheus."""



@dataclass(frozen=True)
class Measurements:
    """How analyses are made: Prometheus by default (the spec's `analysis.prometheus`)."""

    measure: Measure = measure_canary
    compare: Compare = measure_ab
    signals: loop.Signals = loop.prometheus_signals
    """The monitor's signals, which the retraining loop reads (`kubeforge_operator.loop`)."""


def deployment_document(body: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest as the user wrote it, without the abort request (an instruction to the operator,
    not part of what is served)."""
    document = manifest_document(body)
    annotations = {k: v for k, v in (document["metadata"].get("annotations") or {}).items() if k != ANNOTATION_ABORT}
    document["metadata"].pop("annotations", None)
    if annotations:
        document["metadata"]["annotations"] = annotations
    return document


def serving_document(document: Mapping[str, Any], model: ModelDeployment) -> dict[str, Any]:
    """The manifest the RayService's application receives: without annotations, whose edits must not
    redeploy a running application (serveConfigV2's args change redeploys it), and with the Prometheus its
    monitor asks (`validate` defaults it)."""
    metadata = {k: v for k, v in document["metadata"].items() if k != "annotations"}
    spec = dict(document["spec"])
    if model.spec.monitor is not None:
        spec["monitor"] = {**spec["monitor"], "prometheus": model.spec.monitor.prometheus}
    return {**document, "metadata": metadata, "spec": spec}


def validate(document: Mapping[str, Any], prometheus: str | None = None) -> ModelDeployment:
    """The parsed deployment, the only parse of `document` in a reconciliation, its rollout's Prometheus
    address defaulting to `prometheus` (the operator's); `SpecError` whose problems each start with their
    field."""
    model = parse_deployment(dict(document), source=f"{KIND} {document['metadata'].get('name')}")
    try:
        pod_token_secret(model.spec.auth)
    except FieldError as exc:
        raise SpecError([exc.problem]) from None
    capture, monitor = model.spec.capture, model.spec.monitor
    if capture is not None and not (capture.path and is_uri(capture.path)):
        raise SpecError([Problem("spec.capture.path", "on a cluster the router's pod keeps no files; set an "
                                 f"object-store URI (s3://bucket/prefix) it can write to (got {capture.path!r})")])
    for index, source in enumerate(monitor.training_data if monitor is not None else ()):
        local = [path for path in getattr(source, "paths", ()) if not is_uri(path)]
        if local:
            raise SpecError([Problem(f"spec.monitor.training_data[{index}].paths", (
                f"{', '.join(local)}: the monitor's pod on the cluster has no such files; name object-store URIs "
                "(s3://bucket/prefix/*.jsonl)"))])
    if monitor is not None and monitor.retrain is not None and monitor.retrain.alertmanager is not None:
        # Refused rather than ignored: the operator listens for no webhook. It reads the monitor's signals from
        # Prometheus itself (on_drift), the same series the KubeForgeTrafficDrift alert fires on.
        raise SpecError([Problem("spec.monitor.retrain.alertmanager", "only `kubeforge serve` listens for "
                                 "Alertmanager; on Kubernetes the operator reads the monitor's signals from "
                                 "Prometheus (on_drift), so drop alertmanager")])
    rollout = model.spec.rollout
    updates: dict[str, Any] = {}
    if rollout is not None and prometheus_field(rollout)[1] is None:
        if prometheus is None:
            raise SpecError([Problem(prometheus_field(rollout)[0], (
                "required: the operator has no Prometheus address to analyse rollouts with (the chart's "
                f"monitoring.prometheusUrl, {PREFIX}PROMETHEUS_URL)"))])
        updates["rollout"] = rollout = with_prometheus(rollout, prometheus)
    if monitor is not None and monitor.prometheus is None:
        # The monitor asks the rollout's Prometheus (as in `kubeforge serve`), else the operator's; the loop
        # reads the signals back from it.
        address = prometheus_field(rollout)[1] if rollout is not None else prometheus
        if address is not None:
            updates["monitor"] = monitor.model_copy(update={"prometheus": address})
        elif monitor.retrain is not None or any(name in SLO_SIGNALS for name, _ in monitor.thresholds.items()):
            raise SpecError([Problem("spec.monitor.prometheus", (
                "required: the operator has no Prometheus address to read the monitor's signals from (the chart's "
                f"monitoring.prometheusUrl, {PREFIX}PROMETHEUS_URL)"))])
    if not updates:
        return model
    return model.model_copy(update={"spec": model.spec.model_copy(update=updates)})


class Unresolved(Exception):
    """A model URI of the spec did not resolve; `field` is the spec field that holds it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


Version = tuple[str, str]
"""(registered model, version)."""


@dataclass(frozen=True)
class Pinned:
    """The versions one generation of the spec serves."""

    stable: Version
    candidate: Version | None
    """None without a rollout, or when it is the version already served (after a promotion `@champion`
    and `@challenger` coincide)."""
    base: Version | None = None
    """Under spec.lora: the version every adapter was fine-tuned from, which the replicas serve them over."""
    adapters: dict[str, Version] = field(default_factory=dict)
    """Under spec.lora: the further adapters (spec.lora.adapters) by name."""


def resolve(registry: Registry, model: ModelDeployment) -> Pinned:
    """The versions the spec names now."""
    spec = model.spec
    uris = {"spec.model": spec.model}
    # Under a retraining loop the candidate is what a turn pins (`loop`), never whatever `@challenger` is now.
    if spec.rollout is not None and (spec.monitor is None or spec.monitor.retrain is None):
        uris["spec.rollout.candidate"] = spec.rollout.candidate
    if spec.lora is not None:
        uris |= {f"spec.lora.adapters.{name}": uri for name, uri in spec.lora.adapters.items()}
    infos = {where: _resolve_one(registry, uri, where) for where, uri in uris.items()}
    versions = {where: (info.model, info.version) for where, info in infos.items()}
    stable, candidate = versions["spec.model"], versions.get("spec.rollout.candidate")
    if candidate == stable:
        candidate = None
        del infos["spec.rollout.candidate"]
    if spec.lora is None:
        return Pinned(stable, candidate)
    bases: dict[str, Version] = {}
    for where, info in infos.items():
        if info.lora_adapter is None or info.parent_version is None:
            raise Unresolved(where, f"version {info.version} of {info.model} carries no LoRA adapter over a "
                                         "registered base (tags kubeforge.lora_adapter and kubeforge.parent_version, "
                                         "which a fine-tuning with method lora or qlora registers); serve it without "
                                         "spec.lora")
        bases[where] = (info.model, info.parent_version)
    if len(set(bases.values())) != 1:
        described = "; ".join(f"{name}: version {versions[name][1]} from version {base[1]} of {base[0]}"
                              for name, base in bases.items())
        raise Unresolved("spec.lora", f"adapters served together must be fine-tuned from one base version "
                                      f"({described})")
    adapters = {name: versions[f"spec.lora.adapters.{name}"] for name in spec.lora.adapters}
    return Pinned(stable, candidate, bases["spec.model"], adapters)


def _resolve_one(registry: Registry, uri: str, where: str) -> VersionInfo:
    name, ref = parse_model_uri(uri)
    try:
        return registry.version(name, ref)
    except RegistryError as exc:
        raise Unresolved(where, str(exc)) from exc


def pinned(model: ModelDeployment, previous: Mapping[str, Any], generation: int | None) -> Pinned | None:
    """The versions the status pinned for this generation of the spec, or None when it pinned none."""
    if generation is None or previous.get("observedGeneration") != generation or not previous.get("modelVersion"):
        return None
    spec = model.spec
    name = parse_model_uri(spec.model)[0]
    stable = (name, str(previous["modelVersion"]))
    candidate_version = previous.get("candidateVersion")
    candidate = None
    if spec.rollout is not None and candidate_version:
        candidate = (parse_model_uri(spec.rollout.candidate)[0], str(candidate_version))
    if spec.lora is None:
        return Pinned(stable, candidate)
    adapters = previous.get("adapterVersions") or {}
    if not previous.get("baseVersion") or set(adapters) != set(spec.lora.adapters):
        return None
    return Pinned(stable, candidate, (name, str(previous["baseVersion"])),
                  {key: (parse_model_uri(spec.lora.adapters[key])[0], str(v)) for key, v in adapters.items()})


def stored_record(previous: Mapping[str, Any]) -> RolloutRecord | None:
    raw = previous.get("rollout")
    if not raw:
        return None
    try:
        return RolloutRecord.from_dict(raw)
    except (ValueError, KeyError, TypeError) as exc:
        # Starting afresh would run analyses and maybe a promotion twice; a person decides.
        raise kopf.PermanentError(f"status.rollout: not a rollout record ({exc}); clear it (kubectl patch "
                                  "--subresource=status) to start the rollout afresh") from exc


def rollout_running(status: Mapping[str, Any], **_: Any) -> bool:
    """The timer's filter: a rollout is under way, or its end is saved but not yet acted on (the phase
    moves off RollingOut only once the RayService and the registry match the record)."""
    return status.get("phase") == "RollingOut" and (status.get("rollout") or {}).get("phase") != "concluded"


def loop_configured(spec: Mapping[str, Any], **_: Any) -> bool:
    """The loop timer's filter: the deployment has a retraining loop to look at every `loop.POLL_S`."""
    return bool((spec.get("monitor") or {}).get("retrain"))


async def reconcile(
    namespace: str,
    name: str,
    *,
    config: OperatorConfig,
    settings: kopf.OperatorSettings,
    logger: kopf.Logger,
    measurements: Measurements | None = None,
) -> None:
    """Bring one deployment a step forward and write its status; safe to repeat at any time."""
    with metrics.observed(KIND), retry_semantics():
        async with object_lock(KIND, namespace, name):
            await _reconcile(namespace, name, config, kube.Client(settings, logger), logger,
                             measurements or Measurements())


async def _reconcile(
    namespace: str, name: str, config: OperatorConfig, client: kube.Client, logger: kopf.Logger,
    measurements: Measurements,
) -> None:
    url = kube.deployment_url(namespace, name)
    body = await client.get(url)
    if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
        return  # gone or going: the garbage collector removes its RayService (ownerReferences)
    meta = body["metadata"]
    previous = body.get("status") or {}
    generation = meta.get("generation")
    now = datetime.now(UTC)
    document = deployment_document(body)
    status_url = kube.deployment_url(namespace, name, "status")
    try:
        model = validate(document, config.prometheus_url)
    except SpecError as exc:
        await write_invalid(client, status_url, previous, exc, now=now, generation=generation, logger=logger)
        return
    try:
        tracking_uri = config.serving_tracking_uri()
    except FieldError as exc:
        # Raised here rather than left to retry_semantics, so the error metric counts it as it always has.
        raise kopf.PermanentError(str(exc)) from None
    registry = Registry(tracking_uri)
    versions = pinned(model, previous, generation)
    if versions is None:
        try:
            versions = await asyncio.to_thread(resolve, registry, model)
        except Unresolved as exc:
            await write_status(client, status_url, previous, unresolved_status(
                exc.field, exc.message, previous=previous, now=now, generation=generation))
            raise kopf.TemporaryError(str(exc), delay=RESOLVE_RETRY_S) from None
        logger.info(f"resolved {model.spec.model} to version {versions.stable[1]}"
                    + (f", the candidate to version {versions.candidate[1]}" if versions.candidate else "")
                    + (f", their base to version {versions.base[1]}" if versions.base else ""))
    stable, candidate = versions.stable, versions.candidate
    owner = Owner(name=name, namespace=namespace, uid=meta["uid"], kind=KIND)
    rayservice_url = kube.rayservices_url(namespace, rayservice_name(name))
    current: Mapping[str, Any] | None = await client.get(rayservice_url)

    # The retraining loop may start, advance or end a turn, and pin a turn's new challenger as the candidate.
    saved = stored_record(previous)
    turn: loop.LoopStep | None = None
    if model.spec.monitor is not None and model.spec.monitor.retrain is not None:
        turn = await loop.step(client, namespace, model, meta.get("annotations") or {}, previous, saved, registry,
                               measurements.signals, now.timestamp(), logger)
        if turn.candidate is not None and versions.candidate != (stable[0], turn.candidate):
            # The turn's canary (pinned once, and again should an edit of the spec have resolved the pins afresh):
            # against the version answering requests now, a promoted candidate's after an earlier turn.
            served = str(previous.get("servedVersion") or stable[1])
            versions = replace(versions, stable=(stable[0], served), candidate=(stable[0], turn.candidate))
            stable, candidate = versions.stable, versions.candidate
        if turn.take_trigger:
            await client.merge_patch(url, {"metadata": {"annotations": {loop.ANNOTATION_TRIGGER: None}}})

    # The rollout: resume the stored record (same versions) or begin one, then step it.
    record: RolloutRecord | None = None
    policy = model.spec.rollout if candidate is not None else None
    abort = (meta.get("annotations") or {}).get(ANNOTATION_ABORT)
    if policy is not None and candidate is not None:
        subject = Subject(name, stable[0], stable[1], candidate[0], candidate[1])
        record = begin(policy, subject, saved, now.timestamp())
        if record is not saved:
            logger.info(f"rollout of version {candidate[1]} begins: {record.reason}")
            export_metrics(record, None)
        ready, _ = rayservice_ready(current)
        # Analyses wait for KubeRay to report the application ready: measured before, a candidate still
        # downloading its model would count as inconclusive until the rollout rolls back.
        if ready or abort:
            stepped = await asyncio.to_thread(
                step_record, policy, record, now.timestamp(), abort=_abort_reason(abort),
                measure=measurements.measure, compare=measurements.compare,
            )
            if stepped is not record:
                logger.info(f"rollout: {stepped.phase}, candidate at {stepped.weight}% ({stepped.reason})")
                export_metrics(stepped, record)
                record = stepped
        if record is not saved:
            await write_status(client, status_url, previous, {"rollout": record.to_dict()})
    if abort is not None:
        # Taken once acted on (or when there is nothing to abort), so it cannot abort a later rollout.
        if record is None or record.done:
            logger.info(f"{ANNOTATION_ABORT}: no rollout running; request removed")
        await client.merge_patch(url, {"metadata": {"annotations": {ANNOTATION_ABORT: None}}})

    # The world after the record: the RayService at the record's weight, then the registry.
    variants = [{"variant": STABLE, "model": stable[0], "version": stable[1]}]
    if candidate is not None:
        variants.append({"variant": CANDIDATE, "model": candidate[0], "version": candidate[1]})
    variants += [{"variant": name, "model": m, "version": v} for name, (m, v) in versions.adapters.items()]
    base = None if versions.base is None else {"model": versions.base[0], "version": versions.base[1]}
    promoted = record is not None and record.phase == "promoted" and candidate is not None
    served_version = candidate[1] if promoted and candidate is not None else stable[1]
    desired = rayservice(model, serving_document(document, model), variants, 0 if record is None else record.weight,
                         owner, config, base, monitored=served_version)
    current = await _ensure_rayservice(client, desired, current, owner, logger)
    if record is not None and record.done:
        await asyncio.to_thread(settle_registry, record, registry)
    status = deployment_status(
        owner=owner, port=model.spec.port, stable_version=stable[1],
        candidate_version=None if candidate is None else candidate[1], record=record, rayservice_body=current,
        base_version=None if versions.base is None else versions.base[1],
        adapter_versions={name: v for name, (_, v) in versions.adapters.items()} or None,
        previous=previous, now=now, generation=generation,
    )
    if turn is not None:
        status["loop"] = turn.status
    await write_status(client, status_url, previous, status)


def _abort_reason(annotation: str | None) -> str | None:
    if annotation is None:
        return None
    return f"{annotation.strip() or 'no reason given'} (annotation {ANNOTATION_ABORT})"


async def _ensure_rayservice(
    client: kube.Client, desired: Mapping[str, Any], current: Mapping[str, Any] | None, owner: Owner,
    logger: kopf.Logger,
) -> Mapping[str, Any]:
    """Create the RayService, or patch the existing one in place when the wanted spec changed."""
    meta = desired["metadata"]
    url = kube.rayservices_url(meta["namespace"], meta["name"])
    if current is None:
        if await client.create(kube.rayservices_url(meta["namespace"]), desired):
            logger.info(f"created RayService {meta['name']} (candidate weight {serve_weight(desired)}%)")
            return desired
        current = await client.get(url)  # created by a reconciliation that raced this one
        if current is None:
            raise kopf.TemporaryError(f"RayService {meta['name']}: conflict on create, then not found", delay=1.0)
    refs = (current.get("metadata") or {}).get("ownerReferences") or []
    if not any(ref.get("uid") == owner.uid for ref in refs):
        raise kopf.PermanentError(f"RayService {meta['name']} exists and is not owned by this ModelDeployment; "
                                  "delete or rename it")
    wanted = meta["annotations"][ANNOTATION_SPEC_HASH]
    if ((current.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_SPEC_HASH) == wanted:
        return current
    # A merge patch replaces what we set and keeps what KubeRay defaulted. A change of serveConfigV2
    # alone (a new weight) is applied by KubeRay to the running cluster: Ray Serve reconfigures the router.
    patched = await client.merge_patch(url, {
        "metadata": {"labels": meta["labels"], "annotations": {ANNOTATION_SPEC_HASH: wanted}},
        "spec": desired["spec"],
    })
    if patched is None:
        raise kopf.TemporaryError(f"RayService {meta['name']} disappeared while being patched", delay=1.0)
    logger.info(f"patched RayService {meta['name']} (candidate weight {serve_weight(desired)}%)")
    return patched


async def rayservice_changed(
    rayservice: Mapping[str, Any], *, config: OperatorConfig, settings: kopf.OperatorSettings,
    logger: kopf.Logger, measurements: Measurements | None = None,
) -> None:
    """A deployment's RayService changed (KubeRay reported it ready, say): reconcile its owner now."""
    meta = rayservice.get("metadata") or {}
    owner = next((ref for ref in meta.get("ownerReferences") or []
                  if ref.get("kind") == KIND and ref.get("apiVersion") == API_VERSION), None)
    if owner is None or not meta.get("namespace"):
        return  # labelled by someone else; not ours to act on
    try:
        await reconcile(meta["namespace"], owner["name"], config=config, settings=settings, logger=logger,
                        measurements=measurements)
    except kopf.TemporaryError as exc:
        # kopf does not retry event handlers; the deployment's own handlers and timer are the backstop.
        logger.info(f"reconciling ModelDeployment {owner['name']} after a RayService event: {exc}")

"""Reconciling a ModelPipeline: validate it, keep its manifest ConfigMap, run its stages as RayJobs.

Every entry point here ends in `reconcile`, which reads the pipeline and its RayJobs afresh and is
idempotent: RayJob names are deterministic per stage and attempt, so two reconciliations that race
(a pipeline event and a RayJob event) create the same object once and the loser sees a conflict it
ignores. Within one process a lock per pipeline keeps them from interleaving at all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import kopf

from kubeforge.errors import SpecError
from kubeforge.spec.load import parse_manifest
from kubeforge.spec.pipeline import API_VERSION, ModelPipeline
from kubeforge_operator import kube, metrics
from kubeforge_operator.config import OperatorConfig
from kubeforge_operator.errors import FieldError, retry_semantics
from kubeforge_operator.owner import Owner
from kubeforge_operator.rayjob import (
    LABEL_PIPELINE,
    StageRun,
    cluster_problems,
    configmap_name,
    manifest_configmap,
    next_step,
    pipeline_status,
    require_cluster,
    runs_to_look_up,
    stage_rayjob,
    stage_views,
    superseded,
)
from kubeforge_operator.reconciling import object_lock, write_invalid, write_status
from kubeforge_operator.stage_runs import MlflowUnavailable, find_stage_runs

KIND = "ModelPipeline"
PLURAL = "modelpipelines"
# Annotations of tools, not of the user: recorded on MLflow runs and in the ConfigMap they would
# change with every kopf bookkeeping write, and kubectl's holds a copy of the whole object.
TOOL_ANNOTATION_PREFIXES = ("kopf.kubeforge.io/", "kopf.zalando.org/", "kubectl.kubernetes.io/")
MAX_WAIT_IN_WATCH_S = 300.0
"""Longest retry delay a RayJob event waits out itself; longer ones are left to the pipeline handler."""
MLFLOW_RETRY_S = 30.0
"""A succeeded stage whose MLflow run could not be looked up (MLflow unreachable) is looked up again
after this long; without a retry the last stage's run would never reach the status."""



def manifest_document(body: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest as the user wrote it: what `kubeforge.spec` validates and the stages read.

    Server-set metadata (uid, resourceVersion, managedFields, finalizers...) is not part of it, and
    neither are the annotations tools keep on the object."""
    meta = body.get("metadata") or {}
    metadata: dict[str, Any] = {"name": meta.get("name")}
    if meta.get("namespace"):
        metadata["namespace"] = meta["namespace"]
    if meta.get("labels"):
        metadata["labels"] = dict(meta["labels"])
    annotations = {
        k: v for k, v in (meta.get("annotations") or {}).items() if not k.startswith(TOOL_ANNOTATION_PREFIXES)
    }
    if annotations:
        metadata["annotations"] = annotations
    return {
        "apiVersion": body.get("apiVersion", API_VERSION),
        "kind": body.get("kind", KIND),
        "metadata": metadata,
        "spec": dict(body.get("spec") or {}),
    }


def validate(document: Mapping[str, Any]) -> ModelPipeline:
    """The parsed pipeline; `SpecError` listing every problem, each starting with its field."""
    pipeline = parse_manifest(dict(document), source=f"{KIND} {document['metadata'].get('name')}")
    try:
        require_cluster(pipeline)
    except FieldError as exc:
        raise SpecError([exc.problem]) from None
    problems = cluster_problems(pipeline)
    if problems:
        raise SpecError(problems)
    return pipeline


async def reconcile(
    namespace: str, name: str, *, config: OperatorConfig, settings: kopf.OperatorSettings, logger: kopf.Logger
) -> None:
    """Bring one pipeline a step forward and write its status.

    Raises `kopf.TemporaryError(delay=...)` while a failed stage waits for its next attempt, so the
    handler that called this runs again when the attempt is due."""
    with metrics.observed(KIND), retry_semantics():
        async with object_lock(KIND, namespace, name):
            await _reconcile(namespace, name, config, kube.Client(settings, logger), logger)


async def _reconcile(
    namespace: str, name: str, config: OperatorConfig, client: kube.Client, logger: kopf.Logger
) -> None:
    body = await client.get(kube.pipeline_url(namespace, name))
    if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
        return  # gone or going: the deletion handler owns it now
    meta = body["metadata"]
    previous = body.get("status") or {}
    generation = meta.get("generation")
    now = datetime.now(UTC)
    document = manifest_document(body)
    status_url = kube.pipeline_url(namespace, name, "status")
    try:
        pipeline = validate(document)
    except SpecError as exc:
        await write_invalid(client, status_url, previous, exc, now=now, generation=generation, logger=logger)
        return

    owner = Owner(name=name, namespace=namespace, uid=meta["uid"])
    await _ensure_configmap(client, manifest_configmap(document, owner), logger)
    rayjobs = await owned_rayjobs(client, owner)
    for stale in superseded(pipeline, rayjobs):
        if await client.delete(kube.rayjobs_url(namespace, stale)):
            logger.info(f"deleted RayJob {stale}: the edited spec changed its stage")
    views = stage_views(pipeline, rayjobs, previous, now)
    step = next_step(views, now)
    if step.stage is not None:
        rayjob = stage_rayjob(pipeline, step.stage, owner, config, attempt=step.attempt, generation=generation)
        if await client.create(kube.rayjobs_url(namespace), rayjob):
            logger.info(f"created RayJob {rayjob['metadata']['name']} (stage {step.stage}, attempt {step.attempt})")
        rayjobs.append(rayjob)
    found, unavailable = await _stage_runs(config, owner, runs_to_look_up(views, previous))
    status = pipeline_status(pipeline, rayjobs, previous=previous, now=now, generation=generation, found=found)
    await write_status(client, status_url, previous, status)
    if step.wait_s is not None:  # the next reconciliation looks MLflow up again too
        raise kopf.TemporaryError(f"next attempt in {step.wait_s:.0f}s", delay=max(step.wait_s, 0.1))
    if unavailable is not None:
        raise kopf.TemporaryError(f"stage runs not looked up: {unavailable}", delay=MLFLOW_RETRY_S)


async def _stage_runs(
    config: OperatorConfig, owner: Owner, wanted: dict[str, str]
) -> tuple[dict[str, StageRun], str | None]:
    """The MLflow runs of the `wanted` stages, and why none could be looked up (None when they could).
    Without a tracking URI the stages log to SQLite in the work volume, which the operator cannot read."""
    if not wanted or not config.mlflow_tracking_uri:
        return {}, None
    try:
        return await asyncio.to_thread(
            find_stage_runs, config.mlflow_tracking_uri, owner.name, owner.uid, wanted), None
    except MlflowUnavailable as exc:
        return {}, str(exc)


async def owned_rayjobs(client: kube.Client, owner: Owner) -> list[dict[str, Any]]:
    jobs = await client.list(kube.rayjobs_url(owner.namespace), {LABEL_PIPELINE: owner.name})
    # A label anyone can set is not proof of ownership; the owner's uid is (and a pipeline deleted and
    # created again under the same name must not adopt its predecessor's RayJobs).
    return [job for job in jobs if any(ref.get("uid") == owner.uid
                                       for ref in (job.get("metadata") or {}).get("ownerReferences") or [])]


async def _ensure_configmap(client: kube.Client, configmap: Mapping[str, Any], logger: kopf.Logger) -> None:
    meta = configmap["metadata"]
    url = kube.configmaps_url(meta["namespace"])
    if await client.create(url, configmap):
        logger.info(f"created ConfigMap {meta['name']}")
        return
    current = await client.get(kube.configmaps_url(meta["namespace"], meta["name"]))
    if current is not None and current.get("data") != configmap["data"]:
        await client.merge_patch(kube.configmaps_url(meta["namespace"], meta["name"]), {"data": configmap["data"]})
        logger.info(f"updated ConfigMap {meta['name']} to the edited manifest")


async def rayjob_changed(
    rayjob: Mapping[str, Any], *, config: OperatorConfig, settings: kopf.OperatorSettings, logger: kopf.Logger
) -> None:
    """A RayJob of a pipeline changed: reconcile its owner now instead of at the next pipeline event."""
    meta = rayjob.get("metadata") or {}
    owner = next((ref for ref in meta.get("ownerReferences") or []
                  if ref.get("kind") == KIND and ref.get("apiVersion") == API_VERSION), None)
    if owner is None or not meta.get("namespace"):
        return  # labelled by someone else; not ours to act on
    for _ in range(2):
        try:
            await reconcile(meta["namespace"], owner["name"], config=config, settings=settings, logger=logger)
            return
        except kopf.TemporaryError as exc:
            # kopf does not retry event handlers. A short wait (a retry delay) is waited out here, once;
            # the pipeline's own handler, which raised the same delay, is the backstop for longer ones.
            if exc.delay is None or exc.delay > MAX_WAIT_IN_WATCH_S:
                return
            await asyncio.sleep(exc.delay)


async def delete_children(
    namespace: str, name: str, uid: str, *, settings: kopf.OperatorSettings, logger: kopf.Logger
) -> None:
    """The pipeline's finalizer: delete its RayJobs and manifest ConfigMap before it goes.

    Their ownerReferences would have the garbage collector do it eventually; deleting them here stops
    running stages at once and leaves nothing behind when the pipeline is gone."""
    client = kube.Client(settings, logger)
    with metrics.observed(KIND), retry_semantics():
        owner = Owner(name=name, namespace=namespace, uid=uid)
        for job in await owned_rayjobs(client, owner):
            if await client.delete(kube.rayjobs_url(namespace, job["metadata"]["name"])):
                logger.info(f"deleted RayJob {job['metadata']['name']}")
        configmap = await client.get(kube.configmaps_url(namespace, configmap_name(name)))
        owned = configmap is not None and any(
            ref.get("uid") == uid for ref in configmap["metadata"].get("ownerReferences") or []
        )
        if owned and await client.delete(kube.configmaps_url(namespace, configmap_name(name))):
            logger.info(f"deleted ConfigMap {configmap_name(name)}")

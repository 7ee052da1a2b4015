"""The RayJobs of a ModelPipeline: one per stage attempt, the manifest ConfigMap they read, and the
pipeline's status as their states say it.

Pure: nothing here performs I/O or reads the clock. `pipeline.py` reads the RayJobs and passes `now`
in, so every decision the operator takes for a pipeline (what to create next, when a retry is due,
what the status says) is a function of its inputs and is tested as one.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import yaml

from kubeforge import stages
from kubeforge.errors import Problem
from kubeforge.secrets import has_password, redact_url
from kubeforge.spec.cluster import MANIFEST_MOUNT, WORKDIR_MOUNT, ClusterSpec
from kubeforge.spec.pipeline import ModelPipeline
from kubeforge.stages import PodSize
from kubeforge_operator.conditions import (
    condition,
    format_time,
    keep_transition_times,
    parse_time,
    spec_accepted,
)
from kubeforge_operator.config import OperatorConfig
from kubeforge_operator.errors import FieldError
from kubeforge_operator.owner import MANAGED_BY, Owner
from kubeforge_operator.pods import (
    LABEL_METRICS,
    METRICS_STAGE,
    RAY_VERSION,
    cpu_quantity,
    pod_template,
    scheduling,
    secret_env,
    submitter_template,
)

LABEL_PIPELINE = "kubeforge.io/pipeline"
LABEL_STAGE = "kubeforge.io/stage"
LABEL_ATTEMPT = "kubeforge.io/attempt"
LABEL_STAGE_KEY = "kubeforge.io/stage-key"
"""The stage's cache key when its RayJob was made (`ModelPipeline.stage_keys`): a RayJob counts for a stage
only while the manifest still gives the stage that key, so an edit reruns exactly the stages it changes."""
LABEL_GENERATION = "kubeforge.io/generation"
"""The pipeline's metadata.generation when the RayJob was made: which edit of the spec its output is from."""
REPORT_TAG_PREFIX = "kubeforge.rayjob."
"""A stage's job tags the MLflow run that produced its output `kubeforge.rayjob.<RayJob name>` =
<pipeline uid> (`jobs/stage.py --report-tag`), which is how the operator finds that run (and the version
it registered) without access to the work volume. The uid tells apart a pipeline deleted and created
again under the same name, whose RayJobs have the same names."""

MANIFEST_DIR = MANIFEST_MOUNT
MANIFEST_KEY = "manifest.yaml"
WORKDIR = WORKDIR_MOUNT
STAGE_METRICS_PORT = 9108
STAGE_METRICS_PORT_NAME = "stage-metrics"
# KubeRay refuses longer RayJob names: it appends 6 characters for the RayCluster, whose Services
# append up to 10 more, all within a 63-character DNS label (ray-operator utils.MaxRayJobNameLength).
MAX_RAYJOB_NAME = 47
KEY_IN_NAME = 6

StagePhase = Literal["Pending", "Running", "Succeeded", "Skipped", "Failed"]


# --- object names ---------------------------------------------------------------------------------

def rayjob_name(pipeline: str, stage: str, key: str, attempt: int) -> str:
    """`<pipeline>-<stage>-<key>-<attempt>`: the `attempt`-th RayJob of `stage` for its cache key `key` (its
    first characters, as a ReplicaSet is named after its pod template's hash), so an edited stage gets new
    names and undoing the edit finds the old RayJobs again. Shortened with a hash of the pipeline's name
    when KubeRay's limit requires it, and prefixed when the name starts with a digit (DNS-1035)."""
    suffix = f"-{stage}-{key[:KEY_IN_NAME]}-{attempt}"
    prefix = pipeline if pipeline[0].isalpha() else f"kf-{pipeline}"
    if len(prefix) + len(suffix) <= MAX_RAYJOB_NAME:
        return prefix + suffix
    digest = hashlib.sha256(pipeline.encode()).hexdigest()[:6]
    keep = MAX_RAYJOB_NAME - len(suffix) - len(digest) - 1
    return f"{prefix[:keep].rstrip('-')}-{digest}{suffix}"


def configmap_name(pipeline: str) -> str:
    return f"{pipeline}-manifest"  # ConfigMap names may be 253 characters long


# --- the manifest ConfigMap -----------------------------------------------------------------------

def manifest_configmap(manifest: Mapping[str, Any], owner: Owner) -> dict[str, Any]:
    """The ConfigMap every stage reads its manifest from: exactly the document the operator validated."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": configmap_name(owner.name),
            "namespace": owner.namespace,
            "labels": {LABEL_PIPELINE: owner.name, **MANAGED_BY},
            "ownerReferences": [owner.reference()],
        },
        "data": {MANIFEST_KEY: render_manifest(manifest)},
    }


def render_manifest(manifest: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(manifest), sort_keys=False, allow_unicode=True)


# --- the RayJob of a stage ------------------------------------------------------------------------

def stage_size(pipeline: ModelPipeline, stage: str) -> PodSize:
    """Worker pods of a stage's Ray cluster, as the stage registry derives them from the stage's section."""
    section = pipeline.section(stage)
    if section is None:
        raise KeyError(f"pipeline {pipeline.metadata.name} has no {stage} section")
    return stages.get(stage).pod_size(section)


def stage_image(stage: str, cluster: ClusterSpec, config: OperatorConfig) -> str:
    """`spec.cluster.image` when set, else the operator's image for the stage's environment."""
    if cluster.image:
        return cluster.image
    return config.quantize_image if stages.get(stage).image == "quantize" else config.stage_image


def report_tag(rayjob: str) -> str:
    """The MLflow run tag by which the stage run of RayJob `rayjob` is found (see REPORT_TAG_PREFIX)."""
    return REPORT_TAG_PREFIX + rayjob


def entrypoint(stage: str, config: OperatorConfig, rayjob: str, owner_uid: str) -> str:
    # Relative paths of the manifest name files on the work volume (the ConfigMap's folder holds nothing else).
    args = ["python", "jobs/stage.py", stage, "--manifest", f"{MANIFEST_DIR}/{MANIFEST_KEY}", "--workdir", WORKDIR,
            "--base-dir", WORKDIR]
    if config.mlflow_tracking_uri:
        args += ["--tracking-uri", config.mlflow_tracking_uri]
    args += ["--metrics-port", str(STAGE_METRICS_PORT), "--report-tag", f"{report_tag(rayjob)}={owner_uid}"]
    return " ".join(_quote(a) for a in args)


def stage_rayjob(
    pipeline: ModelPipeline, stage: str, owner: Owner, config: OperatorConfig, attempt: int = 1,
    generation: int | None = None,
) -> dict[str, Any]:
    """The KubeRay RayJob that runs `stage` of `pipeline` (its `attempt`-th try of the stage as the spec now
    has it), made for the spec's `generation`."""
    cluster = require_cluster(pipeline)
    if stage not in pipeline.stage_names():
        names = ", ".join(pipeline.stage_names())
        raise KeyError(f"{stage!r} is not a stage of pipeline {owner.name} (stages: {names})")
    size = stage_size(pipeline, stage)
    image = stage_image(stage, cluster, config)
    key = pipeline.stage_keys()[stage]
    name = rayjob_name(owner.name, stage, key, attempt)
    labels = {LABEL_PIPELINE: owner.name, LABEL_STAGE: stage, LABEL_ATTEMPT: str(attempt), LABEL_STAGE_KEY: key,
              **MANAGED_BY}
    if generation is not None:
        labels[LABEL_GENERATION] = str(generation)
    work = {"name": "work", "persistentVolumeClaim": {"claimName": cluster.workdir_claim}}
    manifest = {
        "name": "manifest",
        "configMap": {"name": configmap_name(owner.name), "items": [{"key": MANIFEST_KEY, "path": MANIFEST_KEY}]},
    }
    head_resources = {"cpu": cpu_quantity(cluster.head_cpus), "memory": cluster.head_memory}
    worker_resources: dict[str, str] = {"cpu": cpu_quantity(size.cpus_per_worker), "memory": cluster.worker_memory}
    if size.gpus_per_worker:
        worker_resources["nvidia.com/gpu"] = str(size.gpus_per_worker)
    # The driver runs on the head, or on a worker when it takes the GPU (below): that pod serves its metrics.
    driver_on_worker = bool(size.gpus_per_worker) and stages.get(stage).gpu_runs_in == "driver"
    metrics_port = [{"name": STAGE_METRICS_PORT_NAME, "containerPort": STAGE_METRICS_PORT, "protocol": "TCP"}]
    driver_labels = {**labels, LABEL_METRICS: METRICS_STAGE}
    # Every pod may run the driver's entrypoint (`--manifest`) and open the sources: all get the manifest,
    # the work volume and the store's variables.
    volumes: list[dict[str, Any]] = [manifest, work, *(
        {"name": v.name, "persistentVolumeClaim": {"claimName": v.claim, "readOnly": v.read_only}}
        for v in cluster.volumes)]
    mounts: list[dict[str, Any]] = [{"name": "manifest", "mountPath": MANIFEST_DIR, "readOnly": True},
                                    {"name": "work", "mountPath": WORKDIR},
                                    *({"name": v.name, "mountPath": v.mount_path, "readOnly": v.read_only}
                                      for v in cluster.volumes)]
    # The operator's Secret is optional (see secret_env); those the manifest names are not.
    env_from = [*secret_env(config.stage_env_secret), *({"secretRef": {"name": s}} for s in cluster.env_secrets)]
    head = pod_template(
        "ray-head", image, head_resources, scheduling(cluster), labels if driver_on_worker else driver_labels,
        volumes=volumes, mounts=mounts, ports=[] if driver_on_worker else metrics_port, env_from=env_from,
    )
    worker = pod_template(
        "ray-worker", image, worker_resources, scheduling(cluster), driver_labels if driver_on_worker else labels,
        volumes=volumes, mounts=mounts, ports=metrics_port if driver_on_worker else [], env_from=env_from,
    )
    spec: dict[str, Any] = {
        "entrypoint": entrypoint(stage, config, name, owner.uid),
        # Retries are the operator's (spec.cluster.retries), each a fresh RayJob with a fresh cluster.
        "backoffLimit": 0,
        # KubeRay deletes the Ray cluster (its pods, GPUs included) ttl_s after the job ends; the RayJob and its
        # status stay, which is what the operator reads.
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": cluster.ttl_s,
        "submitterPodTemplate": submitter_template(image, cluster, labels),
        "rayClusterSpec": {
            "rayVersion": RAY_VERSION,
            "headGroupSpec": {
                # The head runs the stage's driver only; its training or data work goes to the workers.
                "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                "template": head,
            },
            "workerGroupSpecs": [
                {
                    "groupName": "workers",
                    "replicas": size.workers,
                    "minReplicas": size.workers,
                    "maxReplicas": size.workers,
                    "rayStartParams": {},
                    "template": worker,
                }
            ],
        },
    }
    if driver_on_worker:
        # `ray job submit --entrypoint-num-gpus`: Ray runs the driver on a node with a free GPU (a worker
        # pod; the head has none) and sets its CUDA_VISIBLE_DEVICES.
        spec["entrypointNumGpus"] = size.gpus_per_worker
    if cluster.active_deadline_s is not None:
        spec["activeDeadlineSeconds"] = cluster.active_deadline_s
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": name,
            "namespace": owner.namespace,
            "labels": labels,
            "ownerReferences": [owner.reference()],
        },
        "spec": spec,
    }


def require_cluster(pipeline: ModelPipeline) -> ClusterSpec:
    """The pipeline's `spec.cluster`, which running on Kubernetes needs; `FieldError` naming it otherwise.

    The one place this rule lives: `pipeline.validate` turns the error into the Invalid status before
    anything is created, and `stage_rayjob` and `stage_views` read the ClusterSpec through it."""
    if pipeline.spec.cluster is None:
        raise FieldError("spec.cluster", "required to run on Kubernetes (at least spec.cluster.workdir_claim)")
    return pipeline.spec.cluster


def cluster_problems(pipeline: ModelPipeline) -> list[Problem]:
    """What keeps a valid manifest from running on a cluster: absolute local paths on no volume the stage
    pods mount, and credentials written in plain text (the ModelPipeline, its ConfigMap, the RayJobs and
    MLflow would all hold them)."""
    cluster = require_cluster(pipeline)
    problems = [Problem(field, f"'{path}' is on no volume the stage pods mount: name it relative to the work "
                               f"volume ({WORKDIR}), or mount its claim with spec.cluster.volumes")
                for field, path in pipeline.local_paths() if path.startswith("/") and not cluster.holds(path)]
    tune = pipeline.section("tune")
    if tune is not None and tune.storage is not None and has_password(tune.storage):
        problems.append(Problem("spec.tune.storage", (
            f"'{redact_url(tune.storage)}' holds a password, which would be stored in plain text: put the URL in a "
            "Secret named in spec.cluster.env_secrets and name its key in spec.tune.storage_env")))
    return problems


def _quote(arg: str) -> str:
    # KubeRay passes the entrypoint to a shell; only a tracking URI could hold characters that matter.
    return arg if re.fullmatch(r"[\w@%+=:,./-]+", arg) else "'" + arg.replace("'", "'\"'\"'") + "'"


# --- what the RayJobs say -------------------------------------------------------------------------

JobState = Literal["Pending", "Running", "Succeeded", "Failed"]


def rayjob_state(rayjob: Mapping[str, Any]) -> JobState:
    """A RayJob's outcome, from KubeRay's two status fields.

    jobStatus is the Ray job's (PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED); jobDeploymentStatus is
    KubeRay's (Initializing, Running, Complete, Failed, ValidationFailed...), which alone says that
    the deadline passed or the cluster never came up."""
    status = rayjob.get("status") or {}
    job = status.get("jobStatus") or ""
    deployment = status.get("jobDeploymentStatus") or ""
    if job == "SUCCEEDED":
        return "Succeeded"
    if job in ("FAILED", "STOPPED") or deployment in ("Failed", "ValidationFailed"):
        return "Failed"
    if job == "RUNNING":
        return "Running"
    return "Pending"


def _label(rayjob: Mapping[str, Any], key: str) -> str:
    return str(((rayjob.get("metadata") or {}).get("labels") or {}).get(key, ""))


def _attempt(rayjob: Mapping[str, Any]) -> int:
    raw = _label(rayjob, LABEL_ATTEMPT)
    return int(raw) if raw.isdigit() else 0


@dataclass(frozen=True)
class StageView:
    """One stage as the RayJobs made for its current cache key show it, with what the operator should do."""

    name: str
    phase: StagePhase
    attempts: int
    """RayJobs made for the stage as the spec now has it (an edit that changes the stage starts again at 0)."""
    latest: Mapping[str, Any] | None
    message: str
    completion: datetime | None
    retry_at: datetime | None
    """When the next attempt is due (a failed attempt with retries left)."""


def stage_views(
    pipeline: ModelPipeline, rayjobs: Sequence[Mapping[str, Any]], previous: Mapping[str, Any], now: datetime
) -> list[StageView]:
    """Every stage in execution order. Stages run one at a time: a stage after one that is not done
    is Pending, and every stage after one that failed for good is Skipped.

    Only the RayJobs made for a stage's current cache key count: after an edit, a stage whose section or
    inputs changed is Pending again, and the others keep their outputs."""
    cluster = require_cluster(pipeline)
    keys = pipeline.stage_keys()
    previous_stages = previous.get("stages") or {}
    views: list[StageView] = []
    blocked_by: str | None = None
    for name in pipeline.stage_names():
        jobs = sorted((job for job in rayjobs if _label(job, LABEL_STAGE) == name
                       and _label(job, LABEL_STAGE_KEY) == keys[name]), key=_attempt)
        latest = jobs[-1] if jobs else None
        attempts = _attempt(latest) if latest else 0
        if blocked_by is not None and latest is None:
            views.append(StageView(name, "Skipped", 0, None, f"not run: stage {blocked_by} failed", None, None))
            continue
        if latest is None:
            views.append(StageView(name, "Pending", 0, None, "", None, None))
            continue
        state = rayjob_state(latest)
        message = str((latest.get("status") or {}).get("message") or "")
        completion = None
        if state in ("Succeeded", "Failed"):
            completion = parse_time((latest.get("status") or {}).get("endTime"))
            earlier = previous_stages.get(name) or {}
            if completion is None and earlier.get("rayJob") == latest["metadata"]["name"]:
                completion = parse_time(earlier.get("completionTime"))
            # First seen finished without an end time: it finished no later than now.
            completion = completion or now
        if state != "Failed":
            views.append(StageView(name, state, attempts, latest, message, completion, None))
            continue
        why = f"attempt {attempts} failed" + (f": {message}" if message else "")
        if attempts <= cluster.retries:
            retry_at = (completion or now) + timedelta(seconds=cluster.retry_delay_s)
            views.append(StageView(name, "Pending", attempts, latest,
                                   f"{why}; attempt {attempts + 1} of {cluster.retries + 1} starts at "
                                   f"{format_time(retry_at)}", completion, retry_at))
        else:
            views.append(StageView(name, "Failed", attempts, latest,
                                   f"{why}; no retries left ({cluster.retries})", completion, None))
            blocked_by = name
    return views


def superseded(pipeline: ModelPipeline, rayjobs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The unfinished RayJobs that an edit of the spec made pointless: their stage is no longer in the
    manifest, or has another cache key now. Deleting them stops work (and frees GPUs) whose output
    nothing would read; finished ones stay, and count again if an edit brings their key back."""
    keys = pipeline.stage_keys()
    return sorted(job["metadata"]["name"] for job in rayjobs
                  if keys.get(_label(job, LABEL_STAGE)) != _label(job, LABEL_STAGE_KEY)
                  and rayjob_state(job) in ("Pending", "Running"))


@dataclass(frozen=True)
class NextStep:
    """What to do now: create `stage`'s attempt, wait `wait_s` seconds for a retry, or nothing."""

    stage: str | None = None
    attempt: int = 0
    wait_s: float | None = None


def next_step(views: Sequence[StageView], now: datetime) -> NextStep:
    for view in views:
        if view.phase == "Succeeded":
            continue
        if view.phase in ("Failed", "Skipped"):
            return NextStep()
        if view.latest is None:
            return NextStep(view.name, 1)
        if view.retry_at is not None:
            if now >= view.retry_at:
                return NextStep(view.name, view.attempts + 1)
            return NextStep(wait_s=(view.retry_at - now).total_seconds())
        return NextStep()  # its RayJob is pending or running: its next status change wakes us
    return NextStep()


@dataclass(frozen=True)
class StageRun:
    """What MLflow says a succeeded stage produced: its run and the model version it registered."""

    run_id: str
    model_version: str | None = None


def runs_to_look_up(views: Sequence[StageView], previous: Mapping[str, Any]) -> dict[str, str]:
    """{stage: RayJob name} of the succeeded stages whose MLflow run the status does not hold yet."""
    previous_stages = previous.get("stages") or {}
    wanted = {}
    for view in views:
        if view.phase != "Succeeded" or view.latest is None:
            continue
        rayjob = view.latest["metadata"]["name"]
        earlier = previous_stages.get(view.name) or {}
        if earlier.get("rayJob") != rayjob or not earlier.get("mlflowRunId"):
            wanted[view.name] = rayjob
    return wanted


def pipeline_status(
    pipeline: ModelPipeline,
    rayjobs: Sequence[Mapping[str, Any]],
    *,
    previous: Mapping[str, Any],
    now: datetime,
    generation: int | None,
    found: Mapping[str, StageRun] | None = None,
) -> dict[str, Any]:
    """The ModelPipeline's status (schema: kubeforge.spec.crd) from its RayJobs, the stage runs `found`
    in MLflow (`runs_to_look_up`) and the status before, which keeps what was found earlier."""
    views = stage_views(pipeline, rayjobs, previous, now)
    previous_stages = previous.get("stages") or {}
    stages: dict[str, Any] = {}
    model_version: str | None = None
    current: str | None = None
    for view in views:
        entry: dict[str, Any] = {"phase": view.phase, "attempts": view.attempts}
        if view.message:
            entry["message"] = view.message
        if view.latest is not None:
            meta = view.latest.get("metadata") or {}
            observed = view.latest.get("status") or {}
            entry["rayJob"] = meta.get("name")
            entry["stageKey"] = _label(view.latest, LABEL_STAGE_KEY)
            if _label(view.latest, LABEL_GENERATION).isdigit():
                entry["generation"] = int(_label(view.latest, LABEL_GENERATION))
            started = observed.get("startTime") or meta.get("creationTimestamp")
            if started:
                entry["startTime"] = started
            if view.completion is not None:
                entry["completionTime"] = format_time(view.completion)
            run = (found or {}).get(view.name)
            earlier = previous_stages.get(view.name) or {}
            if run is not None:
                entry["mlflowRunId"] = run.run_id
                if run.model_version:
                    entry["modelVersion"] = run.model_version
            elif view.phase == "Succeeded" and earlier.get("rayJob") == entry["rayJob"]:
                entry.update({k: earlier[k] for k in ("mlflowRunId", "modelVersion") if earlier.get(k)})
            # The pipeline's model is the one its last model stage registered.
            model_version = entry.get("modelVersion") or model_version
            current = view.name
        stages[view.name] = entry
    phases = [view.phase for view in views]
    phase = (
        "Failed" if "Failed" in phases
        else "Succeeded" if all(p == "Succeeded" for p in phases)
        else "Running" if current is not None
        else "Pending"
    )
    conditions = [
        spec_accepted(generation),
        condition("Complete", "True" if phase == "Succeeded" else "False", phase,
                  "every stage succeeded" if phase == "Succeeded" else f"pipeline is {phase}", generation),
        condition("Failed", "True" if phase == "Failed" else "False", phase,
                  next((f"stage {v.name}: {v.message}" for v in views if v.phase == "Failed"), "no stage failed"),
                  generation),
    ]
    for view in views:
        truth = {"Succeeded": "True", "Failed": "False", "Skipped": "False"}.get(view.phase, "Unknown")
        conditions.append(condition(f"{view.name.capitalize()}Succeeded", truth, view.phase,
                                    view.message or f"stage {view.name} is {view.phase}", generation))
    # Every key is written, None when unset: the status is merge-patched, and a value left out would stay.
    status: dict[str, Any] = {
        "phase": phase,
        "stages": stages,
        "currentStage": current,
        "modelVersion": model_version,
        "conditions": keep_transition_times(conditions, previous, now),
    }
    if generation is not None:
        status["observedGeneration"] = generation
    return status

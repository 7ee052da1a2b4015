"""Pure functions from manifests to Kubernetes objects, and from observed RayJobs to a status.

Nothing here performs I/O or reads the clock: `pipeline.py` passes `now` in, so every decision the
operator takes (what to create next, when a retry is due, what the status says) is a function of its
inputs and is tested as one.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import yaml

from kubeforge.rollout.controller import RolloutRecord
from kubeforge.serve.cluster import ROUTER_DEPLOYMENT, serve_config
from kubeforge.serve.ingress import SERVE_INGRESS_ENV
from kubeforge.spec.cluster import ClusterSpec
from kubeforge.spec.deployment import DeploymentSpec
from kubeforge.spec.load import parse_deployment
from kubeforge.spec.pipeline import API_VERSION, ModelPipeline
from kubeforge_operator.config import OperatorConfig

LABEL_PIPELINE = "kubeforge.io/pipeline"
LABEL_STAGE = "kubeforge.io/stage"
LABEL_ATTEMPT = "kubeforge.io/attempt"
MANAGED_BY = {"app.kubernetes.io/managed-by": "kubeforge-operator"}
REPORT_TAG_PREFIX = "kubeforge.rayjob."
"""A stage's job tags the MLflow run that produced its output `kubeforge.rayjob.<RayJob name>` =
<pipeline uid> (`jobs/*.py --report-tag`), which is how the operator finds that run (and the version
it registered) without access to the work volume. The uid tells apart a pipeline deleted and created
again under the same name, whose RayJobs have the same names."""

MANIFEST_DIR = "/etc/kubeforge"
MANIFEST_KEY = "manifest.yaml"
WORKDIR = "/kubeforge/work"
STAGE_METRICS_PORT = 9108
RAY_VERSION = "2.60.0"  # pyproject pins ray==2.60.0; KubeRay must know which Ray the image runs
# KubeRay refuses longer RayJob names: it appends 6 characters for the RayCluster, whose Services
# append up to 10 more, all within a 63-character DNS label (ray-operator utils.MaxRayJobNameLength).
MAX_RAYJOB_NAME = 47
# Non-root, no privilege escalation, no capabilities: the pod security "restricted" profile.
RUN_AS = 1000
_CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
_POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": RUN_AS,
    "runAsGroup": RUN_AS,
    # The work volume is written by every pod: fsGroup makes it writable by the non-root user.
    "fsGroup": RUN_AS,
    "seccompProfile": {"type": "RuntimeDefault"},
}
SUBMITTER_RESOURCES = {"cpu": "500m", "memory": "512Mi"}

StagePhase = Literal["Pending", "Running", "Succeeded", "Skipped", "Failed"]


@dataclass(frozen=True)
class Owner:
    """The ModelPipeline or ModelDeployment that owns what the operator creates for it."""

    name: str
    namespace: str
    uid: str
    kind: Literal["ModelPipeline", "ModelDeployment"] = "ModelPipeline"

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": self.kind,
            "name": self.name,
            "uid": self.uid,
            # Kubernetes deletes the children with the pipeline even if the operator is not running.
            "controller": True,
            "blockOwnerDeletion": True,
        }


# --- object names ---------------------------------------------------------------------------------

def rayjob_name(pipeline: str, stage: str, attempt: int) -> str:
    """`<pipeline>-<stage>-<attempt>`, shortened with a hash of the pipeline's name when KubeRay's limit
    requires it, and prefixed when the pipeline's name starts with a digit (RayJob names are DNS-1035)."""
    suffix = f"-{stage}-{attempt}"
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

@dataclass(frozen=True)
class StageSize:
    workers: int
    cpus_per_worker: float
    gpus_per_worker: int


def stage_size(pipeline: ModelPipeline, stage: str) -> StageSize:
    """Worker pods of a stage's Ray cluster, from the stage's own section."""
    spec = pipeline.spec
    if stage in ("pretrain", "finetune"):
        section = spec.pretrain if stage == "pretrain" else spec.finetune
        if section is None:
            raise KeyError(stage)
        resources = section.resources
        return StageSize(resources.workers, resources.cpus_per_worker, 1 if resources.use_gpu else 0)
    if stage == "tune":
        if spec.tune is None:
            raise KeyError(stage)
        # A pod per concurrent trial; a GPU fraction still needs a whole device on the pod.
        return StageSize(spec.tune.max_concurrent, spec.tune.cpus_per_trial, math.ceil(spec.tune.gpus_per_trial))
    if stage in ("evaluate", "quantize"):
        section_ = spec.evaluate if stage == "evaluate" else spec.quantize
        if section_ is None:
            raise KeyError(stage)
        return StageSize(1, 1.0, 1 if section_.use_gpu else 0)
    if stage in ("data", "promote"):
        return StageSize(1, 1.0, 0)
    raise KeyError(stage)


def report_tag(rayjob: str) -> str:
    """The MLflow run tag by which the stage run of RayJob `rayjob` is found (see REPORT_TAG_PREFIX)."""
    return REPORT_TAG_PREFIX + rayjob


def entrypoint(stage: str, config: OperatorConfig, rayjob: str, owner_uid: str) -> str:
    args = ["python", f"jobs/{stage}.py", "--manifest", f"{MANIFEST_DIR}/{MANIFEST_KEY}", "--workdir", WORKDIR]
    if config.mlflow_tracking_uri:
        args += ["--tracking-uri", config.mlflow_tracking_uri]
    args += ["--metrics-port", str(STAGE_METRICS_PORT), "--report-tag", f"{report_tag(rayjob)}={owner_uid}"]
    return " ".join(_quote(a) for a in args)


def stage_rayjob(
    pipeline: ModelPipeline, stage: str, owner: Owner, config: OperatorConfig, attempt: int = 1
) -> dict[str, Any]:
    """The KubeRay RayJob that runs `stage` of `pipeline` (its `attempt`-th try)."""
    cluster = require_cluster(pipeline)
    if stage not in pipeline.stage_names():
        stages = ", ".join(pipeline.stage_names())
        raise KeyError(f"{stage!r} is not a stage of pipeline {owner.name} (stages: {stages})")
    size = stage_size(pipeline, stage)
    image = cluster.image or (config.quantize_image if stage == "quantize" else config.stage_image)
    labels = {LABEL_PIPELINE: owner.name, LABEL_STAGE: stage, LABEL_ATTEMPT: str(attempt), **MANAGED_BY}
    work = {"name": "work", "persistentVolumeClaim": {"claimName": cluster.workdir_claim}}
    manifest = {
        "name": "manifest",
        "configMap": {"name": configmap_name(owner.name), "items": [{"key": MANIFEST_KEY, "path": MANIFEST_KEY}]},
    }
    head_resources = {"cpu": _cpu(cluster.head_cpus), "memory": cluster.head_memory}
    worker_resources: dict[str, str] = {"cpu": _cpu(size.cpus_per_worker), "memory": cluster.worker_memory}
    if size.gpus_per_worker:
        worker_resources["nvidia.com/gpu"] = str(size.gpus_per_worker)
    head = _pod_template(
        "ray-head", image, head_resources, _scheduling(cluster), labels,
        volumes=[manifest, work],
        mounts=[{"name": "manifest", "mountPath": MANIFEST_DIR, "readOnly": True},
                {"name": "work", "mountPath": WORKDIR}],
        ports=[{"name": "stage-metrics", "containerPort": STAGE_METRICS_PORT, "protocol": "TCP"}],
    )
    worker = _pod_template(
        "ray-worker", image, worker_resources, _scheduling(cluster), labels,
        volumes=[work], mounts=[{"name": "work", "mountPath": WORKDIR}], ports=[],
    )
    spec: dict[str, Any] = {
        "entrypoint": entrypoint(stage, config, rayjob_name(owner.name, stage, attempt), owner.uid),
        # Retries are the operator's (spec.cluster.retries), each a fresh RayJob with a fresh cluster.
        "backoffLimit": 0,
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": cluster.ttl_s,
        "submitterPodTemplate": _submitter_template(image, cluster, labels),
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
    if cluster.active_deadline_s is not None:
        spec["activeDeadlineSeconds"] = cluster.active_deadline_s
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": rayjob_name(owner.name, stage, attempt),
            "namespace": owner.namespace,
            "labels": labels,
            "ownerReferences": [owner.reference()],
        },
        "spec": spec,
    }


def require_cluster(pipeline: ModelPipeline) -> ClusterSpec:
    if pipeline.spec.cluster is None:
        raise ValueError("spec.cluster: required to run on Kubernetes (at least spec.cluster.workdir_claim)")
    return pipeline.spec.cluster


def _scheduling(cluster: ClusterSpec) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if cluster.node_selector:
        out["nodeSelector"] = dict(cluster.node_selector)
    if cluster.tolerations:
        out["tolerations"] = [_toleration(t) for t in cluster.tolerations]
    if cluster.service_account:
        out["serviceAccountName"] = cluster.service_account
    return out


def _toleration(toleration: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"operator": toleration.operator}
    for field, key in (("key", "key"), ("value", "value"), ("effect", "effect"),
                       ("toleration_seconds", "tolerationSeconds")):
        value = getattr(toleration, field)
        if value is not None:
            out[key] = value
    return out


def _pod_template(
    container: str,
    image: str,
    resources: Mapping[str, str],
    scheduling: Mapping[str, Any],
    labels: Mapping[str, str],
    volumes: list[dict[str, Any]],
    mounts: list[dict[str, Any]],
    ports: list[dict[str, Any]],
    env: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    main: dict[str, Any] = {
        "name": container,
        "image": image,
        # Ray, Python and the libraries write caches under HOME; the root filesystem is read-only.
        "env": [{"name": "HOME", "value": "/tmp"}, *(dict(e) for e in env)],
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "securityContext": dict(_CONTAINER_SECURITY),
        "volumeMounts": [*mounts, {"name": "tmp", "mountPath": "/tmp"}, {"name": "shm", "mountPath": "/dev/shm"}],
    }
    if ports:
        main["ports"] = ports
    return {
        "metadata": {"labels": dict(labels)},
        "spec": {
            **scheduling,
            "securityContext": dict(_POD_SECURITY),
            "containers": [main],
            "volumes": [
                *volumes,
                # Ray's session files and spilled objects.
                {"name": "tmp", "emptyDir": {}},
                # Ray's object store lives in shared memory; the container runtime's default is 64 MiB.
                {"name": "shm", "emptyDir": {"medium": "Memory"}},
            ],
        },
    }


def _submitter_template(image: str, cluster: ClusterSpec, labels: Mapping[str, str]) -> dict[str, Any]:
    """The pod running `ray job submit` (KubeRay fills in the command); hardened like the others."""
    return {
        "metadata": {"labels": dict(labels)},
        "spec": {
            **_scheduling(cluster),
            "restartPolicy": "Never",
            "securityContext": dict(_POD_SECURITY),
            "containers": [
                {
                    "name": "ray-job-submitter",
                    "image": image,
                    "env": [{"name": "HOME", "value": "/tmp"}],
                    "resources": {"requests": dict(SUBMITTER_RESOURCES), "limits": dict(SUBMITTER_RESOURCES)},
                    "securityContext": dict(_CONTAINER_SECURITY),
                    "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                }
            ],
            "volumes": [{"name": "tmp", "emptyDir": {}}],
        },
    }


def _cpu(cpus: float) -> str:
    return str(int(cpus)) if float(cpus).is_integer() else f"{round(cpus * 1000)}m"


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


def _attempt(rayjob: Mapping[str, Any]) -> int:
    raw = ((rayjob.get("metadata") or {}).get("labels") or {}).get(LABEL_ATTEMPT, "")
    return int(raw) if str(raw).isdigit() else 0


@dataclass(frozen=True)
class StageView:
    """One stage as the RayJobs show it, with what the operator should do about it."""

    name: str
    phase: StagePhase
    attempts: int
    latest: Mapping[str, Any] | None
    message: str
    completion: datetime | None
    retry_at: datetime | None
    """When the next attempt is due (a failed attempt with retries left)."""


def stage_views(
    pipeline: ModelPipeline, rayjobs: Sequence[Mapping[str, Any]], previous: Mapping[str, Any], now: datetime
) -> list[StageView]:
    """Every stage in execution order. Stages run one at a time: a stage after one that is not done
    is Pending, and every stage after one that failed for good is Skipped."""
    cluster = require_cluster(pipeline)
    by_stage: dict[str, list[Mapping[str, Any]]] = {}
    for job in rayjobs:
        stage = ((job.get("metadata") or {}).get("labels") or {}).get(LABEL_STAGE)
        if stage:
            by_stage.setdefault(stage, []).append(job)
    previous_stages = previous.get("stages") or {}
    views: list[StageView] = []
    blocked_by: str | None = None
    for name in pipeline.stage_names():
        jobs = sorted(by_stage.get(name, []), key=_attempt)
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
            completion = _parse_time((latest.get("status") or {}).get("endTime"))
            earlier = previous_stages.get(name) or {}
            if completion is None and earlier.get("rayJob") == latest["metadata"]["name"]:
                completion = _parse_time(earlier.get("completionTime"))
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
                                   f"{_format_time(retry_at)}", completion, retry_at))
        else:
            views.append(StageView(name, "Failed", attempts, latest,
                                   f"{why}; no retries left ({cluster.retries})", completion, None))
            blocked_by = name
    return views


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
            started = observed.get("startTime") or meta.get("creationTimestamp")
            if started:
                entry["startTime"] = started
            if view.completion is not None:
                entry["completionTime"] = _format_time(view.completion)
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
        _condition("Valid", "True", "SpecAccepted", "kubeforge.spec accepted the spec", generation),
        _condition("Complete", "True" if phase == "Succeeded" else "False", phase,
                   "every stage succeeded" if phase == "Succeeded" else f"pipeline is {phase}", generation),
        _condition("Failed", "True" if phase == "Failed" else "False", phase,
                   next((f"stage {v.name}: {v.message}" for v in views if v.phase == "Failed"), "no stage failed"),
                   generation),
    ]
    for view in views:
        truth = {"Succeeded": "True", "Failed": "False", "Skipped": "False"}.get(view.phase, "Unknown")
        conditions.append(_condition(f"{view.name.capitalize()}Succeeded", truth, view.phase,
                                     view.message or f"stage {view.name} is {view.phase}", generation))
    status: dict[str, Any] = {
        "phase": phase,
        "stages": stages,
        "conditions": _keep_transition_times(conditions, previous, now),
    }
    if current is not None:
        status["currentStage"] = current
    if model_version:
        status["modelVersion"] = model_version
    if generation is not None:
        status["observedGeneration"] = generation
    return status


def invalid_status(
    problems: Sequence[str], *, previous: Mapping[str, Any], now: datetime, generation: int | None
) -> dict[str, Any]:
    """The status of a spec kubeforge.spec rejects: each problem starts with the field at fault."""
    message = "; ".join(problems)
    status: dict[str, Any] = {
        "phase": "Invalid",
        "conditions": _keep_transition_times(
            [_condition("Valid", "False", "InvalidSpec", message, generation)], previous, now
        ),
    }
    if generation is not None:
        status["observedGeneration"] = generation
    return status


def _condition(kind: str, status: str, reason: str, message: str, generation: int | None) -> dict[str, Any]:
    condition: dict[str, Any] = {"type": kind, "status": status, "reason": reason, "message": message[:32768]}
    if generation is not None:
        condition["observedGeneration"] = generation
    return condition


def _keep_transition_times(
    conditions: list[dict[str, Any]], previous: Mapping[str, Any], now: datetime
) -> list[dict[str, Any]]:
    """lastTransitionTime moves only when a condition's status does, as Kubernetes conventions ask."""
    before = {c.get("type"): c for c in previous.get("conditions") or [] if isinstance(c, Mapping)}
    out = []
    for condition in conditions:
        old = before.get(condition["type"])
        if old is not None and old.get("status") == condition["status"] and old.get("lastTransitionTime"):
            out.append({**condition, "lastTransitionTime": old["lastTransitionTime"]})
        else:
            out.append({**condition, "lastTransitionTime": _format_time(now)})
    return out


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _format_time(value: datetime) -> str:
    return value.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- the RayService of a ModelDeployment ------------------------------------------------------------

LABEL_DEPLOYMENT = "kubeforge.io/deployment"
ANNOTATION_SPEC_HASH = "kubeforge.io/spec-hash"
"""Hash of the RayService spec the operator last wrote: it patches only when the wanted spec differs,
so fields KubeRay or an admission webhook default are not fought over."""
# KubeRay refuses longer RayService names: it appends 6 characters for the RayCluster, whose
# "-serve-svc" Service must fit a 63-character DNS label (ray-operator utils.MaxRayServiceNameLength).
MAX_RAYSERVICE_NAME = 47
SERVE_HEAD_CPUS = 1
"""The head runs Ray's GCS, the Serve controller, an HTTP proxy and the router (0.1 CPU): one CPU, and
it advertises that CPU to Ray so the router is placed there rather than on a replica's pod."""
SERVE_HEAD_MEMORY = "4Gi"
SERVE_TOKEN_ENV = "KUBEFORGE_SERVE_TOKEN"
"""The variable of every RayService pod that holds spec.auth.token_secret's token (a secretKeyRef)."""
REPLICA_MEMORY_GI = 8
"""Host memory of a replica's pod besides a CPU KV cache: the engine process, the model's weights while
loading, and the download of the pinned version. The manifest has no memory setting to take it from."""


def rayservice_name(deployment: str) -> str:
    """The deployment's own name when KubeRay accepts it; otherwise shortened with a hash of the name
    (and prefixed when it starts with a digit: RayService names are DNS-1035 labels)."""
    name = deployment if deployment[0].isalpha() else f"kf-{deployment}"
    if len(name) <= MAX_RAYSERVICE_NAME:
        return name
    digest = hashlib.sha256(deployment.encode()).hexdigest()[:6]
    return f"{name[:MAX_RAYSERVICE_NAME - 7].rstrip('-')}-{digest}"


@dataclass(frozen=True)
class ReplicaPods:
    """Worker pods of a deployment's Ray cluster: one per variant replica, so that a replica's CPUs and
    GPUs are a pod's requests and the Kubernetes scheduler, not Ray, finds room for it."""

    replicas: int
    min_replicas: int
    max_replicas: int
    autoscaling: bool
    resources: dict[str, str]


def replica_pods(spec: DeploymentSpec, variants: int) -> ReplicaPods:
    resources = spec.resources
    memory = REPLICA_MEMORY_GI
    if resources.gpus_per_replica == 0 and spec.engine.kv_cache_gb:
        # On CPU vLLM keeps its KV cache (VLLM_CPU_KVCACHE_SPACE) in host memory.
        memory += math.ceil(spec.engine.kv_cache_gb)
    pod: dict[str, str] = {"cpu": _cpu(resources.cpus_per_replica), "memory": f"{memory}Gi"}
    if resources.gpus_per_replica > 0:
        # A fraction of a GPU still needs a whole device on the pod.
        pod["nvidia.com/gpu"] = str(math.ceil(resources.gpus_per_replica))
    if spec.autoscaling is not None:
        low, high = spec.autoscaling.min_replicas * variants, spec.autoscaling.max_replicas * variants
        return ReplicaPods(low, low, high, True, pod)
    count = spec.replicas * variants
    return ReplicaPods(count, count, count, False, pod)


def rayservice(
    document: Mapping[str, Any],
    variants: Sequence[Mapping[str, str]],
    weight: int,
    owner: Owner,
    config: OperatorConfig,
) -> dict[str, Any]:
    """The KubeRay RayService serving `document` (a validated ModelDeployment manifest): its variants
    (`[{variant, model, version}]`, versions already resolved) behind the router, the candidate at
    `weight` percent. Only serveConfigV2 depends on `weight`, so a new weight is applied in place."""
    tracking_uri = config.serving_tracking_uri()
    model = parse_deployment(dict(document), source=f"ModelDeployment {owner.name}")
    spec = model.spec
    name = rayservice_name(owner.name)
    env: list[dict[str, Any]] = [{"name": "MLFLOW_TRACKING_URI", "value": tracking_uri}]
    # HAProxy in front of the router replica instead of Serve's Python proxy (kubeforge.serve.ingress);
    # Ray reads these when it starts on each pod.
    env += [{"name": k, "value": v} for k, v in SERVE_INGRESS_ENV.items()]
    if spec.auth is not None:
        if spec.auth.token_secret is None:
            raise ValueError("spec.auth: only token_secret has a source in the RayService pods; use it")
        # The pods reference the Secret (the operator never reads it), and the application is told to read
        # the token from that variable, as `kubeforge serve` reads a token_env.
        secret = spec.auth.token_secret
        env.append({"name": SERVE_TOKEN_ENV,
                    "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.key}}})
        document = {**document, "spec": {**document["spec"], "auth": {"token_env": SERVE_TOKEN_ENV}}}
    config_v2 = serve_config(owner.name, document, [dict(v) for v in variants], weight)
    # Ray Serve's proxy listens on 127.0.0.1 unless told otherwise, and spec.port is the user's choice.
    config_v2 = {"http_options": {"host": "0.0.0.0", "port": spec.port}, **config_v2}
    labels = {LABEL_DEPLOYMENT: owner.name, **MANAGED_BY}
    # KubeRay's serve Service targets the container port named "serve".
    serve_port = {"name": "serve", "containerPort": spec.port, "protocol": "TCP"}
    head = _pod_template(
        "ray-head", config.stage_image,
        {"cpu": _cpu(SERVE_HEAD_CPUS), "memory": SERVE_HEAD_MEMORY}, {}, labels,
        volumes=[], mounts=[], ports=[serve_port], env=env,
    )
    pods = replica_pods(spec, len(variants))
    worker = _pod_template(
        "ray-worker", config.stage_image, pods.resources, {}, labels,
        volumes=[], mounts=[], ports=[serve_port], env=env,
    )
    cluster: dict[str, Any] = {
        "rayVersion": RAY_VERSION,
        "headGroupSpec": {
            "rayStartParams": {"num-cpus": str(SERVE_HEAD_CPUS), "dashboard-host": "0.0.0.0"},
            "template": head,
        },
        "workerGroupSpecs": [{
            "groupName": "replicas",
            "replicas": pods.replicas,
            "minReplicas": pods.min_replicas,
            "maxReplicas": pods.max_replicas,
            "rayStartParams": {},
            "template": worker,
        }],
    }
    if pods.autoscaling:
        # Ray Serve's autoscaler asks for replicas; Ray's autoscaler turns them into pods within the bounds.
        cluster["enableInTreeAutoscaling"] = True
    body_spec = {
        "serveConfigV2": yaml.safe_dump(config_v2, sort_keys=False, allow_unicode=True),
        "rayClusterConfig": cluster,
    }
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {
            "name": name,
            "namespace": owner.namespace,
            "labels": labels,
            "annotations": {ANNOTATION_SPEC_HASH: spec_hash(body_spec)},
            "ownerReferences": [owner.reference()],
        },
        "spec": body_spec,
    }


def spec_hash(spec: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def serve_weight(rayservice_body: Mapping[str, Any]) -> int | None:
    """The router's weight in a RayService's serveConfigV2, or None when it has none."""
    raw = (rayservice_body.get("spec") or {}).get("serveConfigV2")
    try:
        config = yaml.safe_load(raw) if isinstance(raw, str) else None
        for app in (config or {}).get("applications") or []:
            for deployment in app.get("deployments") or []:
                if deployment.get("name") == ROUTER_DEPLOYMENT:
                    return int(deployment["user_config"]["weight"])
    except (yaml.YAMLError, AttributeError, KeyError, TypeError, ValueError):
        return None
    return None


def rayservice_ready(rayservice_body: Mapping[str, Any] | None) -> tuple[bool, str]:
    """Whether KubeRay says the application serves, and why not: its `Ready` condition (KubeRay >= 1.3),
    else the older `serviceStatus: Running`."""
    if rayservice_body is None:
        return False, "the RayService does not exist yet"
    status = rayservice_body.get("status") or {}
    for condition in status.get("conditions") or []:
        if isinstance(condition, Mapping) and condition.get("type") == "Ready":
            ready = condition.get("status") == "True"
            why = condition.get("message") or condition.get("reason") or ""
            return ready, str(why or ("KubeRay reports the application ready" if ready else "not ready"))
    if status.get("serviceStatus") == "Running":
        return True, "KubeRay reports serviceStatus Running"
    return False, "KubeRay has not reported the application ready yet"


_ROLLOUT_PHASES = {"promoted": "Promoted", "rolled_back": "RolledBack"}


def deployment_status(
    *,
    owner: Owner,
    port: int,
    stable_version: str,
    candidate_version: str | None,
    record: RolloutRecord | None,
    rayservice_body: Mapping[str, Any] | None,
    previous: Mapping[str, Any],
    now: datetime,
    generation: int | None,
) -> dict[str, Any]:
    """The ModelDeployment's status (schema: kubeforge.spec.crd) from its resolved versions, its rollout
    record and what KubeRay says of its RayService. Keys set to None are removed by the merge patch."""
    ready, why = rayservice_ready(rayservice_body)
    name = rayservice_name(owner.name)
    if record is None:
        phase = "Serving" if ready else "Deploying"
    elif record.phase in _ROLLOUT_PHASES:
        phase = _ROLLOUT_PHASES[record.phase]
    else:
        # "progressing", or an A/B test that concluded without acting: the split still stands.
        phase = "RollingOut" if ready else "Deploying"
    progressing = record is not None and record.phase == "progressing"
    conditions = [
        _condition("Valid", "True", "SpecAccepted", "kubeforge.spec accepted the spec", generation),
        _condition("Ready", "True" if ready else "False", "RayServiceReady" if ready else "RayServiceNotReady",
                   f"RayService {name}: {why}", generation),
        _condition("Progressing", "True" if progressing else "False",
                   {"progressing": "RolloutProgressing", "promoted": "Promoted", "rolled_back": "RolledBack",
                    "concluded": "Concluded"}[record.phase] if record is not None else "NoRollout",
                   record.reason if record is not None else "no rollout: the stable version serves alone",
                   generation),
    ]
    promoted = record is not None and record.phase == "promoted" and candidate_version is not None
    status: dict[str, Any] = {
        "phase": phase,
        # The versions pinned for this generation (what `pinned` reads back), not only what is served:
        "modelVersion": stable_version,
        "candidateVersion": candidate_version,
        # What answers requests for the model: after a promotion the candidate takes them all (weight 100).
        "servedVersion": candidate_version if promoted else stable_version,
        "rayService": name,
        "rollout": None if record is None else record.to_dict(),
        "weight": 0 if record is None else record.weight,
        # KubeRay's Service for the serve port of whichever cluster is active.
        "url": f"http://{name}-serve-svc.{owner.namespace}.svc:{port}/v1",
        "conditions": _keep_transition_times(conditions, previous, now),
    }
    if generation is not None:
        status["observedGeneration"] = generation
    return status


def unresolved_status(
    field: str, message: str, *, previous: Mapping[str, Any], now: datetime, generation: int | None
) -> dict[str, Any]:
    """The status while a model URI cannot be resolved (an alias not set yet, MLflow unreachable)."""
    conditions = [
        _condition("Valid", "True", "SpecAccepted", "kubeforge.spec accepted the spec", generation),
        _condition("Ready", "False", "ModelNotResolved", f"{field}: {message}", generation),
    ]
    return {"phase": previous.get("phase") or "Pending",
            "conditions": _keep_transition_times(conditions, previous, now)}

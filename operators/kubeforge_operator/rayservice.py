"""The RayService of a ModelDeployment: its name, its replica pods, the RayService itself with the
router's weight in serveConfigV2, what KubeRay says of it, and the deployment's status.

Pure: nothing here performs I/O or reads the clock. `deployment.py` resolves the versions, steps the
rollout, reads the RayService and passes `now` in.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import yaml

from kubeforge.rollout.controller import RolloutRecord
from kubeforge.runtime import SERVE_INGRESS_ENV
from kubeforge.serve.app import MONITOR_CPUS
from kubeforge.serve.cluster import ROUTER_DEPLOYMENT, serve_config
from kubeforge.spec.deployment import (
    ABRollout,
    AuthSpec,
    DeploymentSpec,
    ModelDeployment,
    SecretKeyRef,
    tensor_parallel_size,
)
from kubeforge_operator.conditions import condition, keep_transition_times, spec_accepted
from kubeforge_operator.config import OperatorConfig
from kubeforge_operator.errors import FieldError
from kubeforge_operator.owner import MANAGED_BY, Owner
from kubeforge_operator.pods import LABEL_METRICS, METRICS_ROUTER, RAY_VERSION, cpu_quantity, pod_template, secret_env

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
SERVE_HEAD_MEMORY_GI = 4
SERVE_TOKEN_ENV = "KUBEFORGE_SERVE_TOKEN"
"""The variable of every RayService pod that holds spec.auth.token_secret's token (a secretKeyRef)."""
REPLICA_MEMORY_GI = 8
"""Host memory of a replica's pod besides a CPU KV cache: the engine process, the model's weights while
loading, and the download of the pinned version. The manifest has no memory setting to take it from."""
_USE_SECRET = "use spec.auth.token_secret: {name, key} of a Secret in the deployment's namespace"


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
    pod: dict[str, str] = {"cpu": cpu_quantity(resources.cpus_per_replica), "memory": f"{memory}Gi"}
    if resources.gpus_per_replica >= 1:
        # Whole GPUs are vLLM's tensor parallel workers: the replica holds them all (num_gpus), so its one
        # pod has them all.
        pod["nvidia.com/gpu"] = str(tensor_parallel_size(resources.gpus_per_replica))
    elif resources.gpus_per_replica > 0:
        # A share of a GPU still needs a whole device on the pod (vLLM keeps to the share of its memory).
        pod["nvidia.com/gpu"] = "1"
    if spec.autoscaling is not None:
        low, high = spec.autoscaling.min_replicas * variants, spec.autoscaling.max_replicas * variants
        return ReplicaPods(low, low, high, True, pod)
    count = spec.replicas * variants
    return ReplicaPods(count, count, count, False, pod)


def pod_token_secret(auth: AuthSpec | None) -> SecretKeyRef | None:
    """The Secret whose key every RayService pod gets as SERVE_TOKEN_ENV (None without auth); `FieldError`
    naming a token source the pods do not have.

    The router reads its token from its own process: on Kubernetes only a Secret the pods reference can
    put it there, and serving without the authentication the manifest asks for is not an option. The one
    place this rule lives: `deployment.validate` turns the error into the Invalid status, and `rayservice`
    reads the Secret through it."""
    if auth is None:
        return None
    if auth.token_env is not None:
        raise FieldError("spec.auth.token_env", f"the RayService pods have no variable {auth.token_env}; {_USE_SECRET}")
    if auth.token_file is not None:
        raise FieldError("spec.auth.token_file", f"the RayService pods have no file {auth.token_file}; {_USE_SECRET}")
    return auth.token_secret


def rayservice(
    deployment: ModelDeployment,
    document: Mapping[str, Any],
    variants: Sequence[Mapping[str, str]],
    weight: int,
    owner: Owner,
    config: OperatorConfig,
    base: Mapping[str, str] | None = None,
    monitored: str | None = None,
) -> dict[str, Any]:
    """The KubeRay RayService serving `deployment`, parsed from `document` (the manifest as its application
    receives it): its variants (`[{variant, model, version}]`, versions already resolved) behind the
    router, the candidate at `weight` percent. Only serveConfigV2 depends on `weight`, so a new weight is
    applied in place. Under spec.lora the variants are adapters over `base` ({model, version}), all on the
    same replicas, and only serveConfigV2's user_config depends on them (`kubeforge.serve.cluster`). With
    spec.monitor, `monitored` is the version whose traffic its replica reads, which runs on the head."""
    tracking_uri = config.serving_tracking_uri()
    spec = deployment.spec
    name = rayservice_name(owner.name)
    # The URI carries no credentials (OperatorConfig refuses them): MLflow's own variables come with the stage
    # Secret, which the replica pods take too.
    env: list[dict[str, Any]] = [{"name": "MLFLOW_TRACKING_URI", "value": tracking_uri}]
    # HAProxy in front of the router replica instead of Serve's Python proxy (kubeforge.runtime);
    # Ray reads these when it starts on each pod.
    env += [{"name": k, "value": v} for k, v in SERVE_INGRESS_ENV.items()]
    secret = pod_token_secret(spec.auth)
    if secret is not None:
        # The pods reference the Secret (the operator never reads it), and the application is told to read
        # the token from that variable, as `kubeforge serve` reads a token_env.
        env.append({"name": SERVE_TOKEN_ENV,
                    "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.key}}})
        document = {**document, "spec": {**document["spec"], "auth": {"token_env": SERVE_TOKEN_ENV}}}
    sticky = spec.rollout.sticky_header if isinstance(spec.rollout, ABRollout) else None
    config_v2 = serve_config(owner.name, document, [dict(v) for v in variants], weight,
                             None if base is None else dict(base), sticky, monitored)
    # Ray Serve's proxy listens on 127.0.0.1 unless told otherwise, and spec.port is the user's choice.
    config_v2 = {"http_options": {"host": "0.0.0.0", "port": spec.port}, **config_v2}
    labels = {LABEL_DEPLOYMENT: owner.name, **MANAGED_BY}
    # KubeRay's serve Service targets the container port named "serve".
    serve_port = {"name": "serve", "containerPort": spec.port, "protocol": "TCP"}
    # The router's /metrics is scraped through the head's proxy only (LABEL_METRICS).
    # The monitor's replica scores prompts with the served model on CPU: the head gets its CPU and a replica's memory.
    head_cpus = SERVE_HEAD_CPUS + (MONITOR_CPUS if spec.monitor is not None else 0)
    head_memory = SERVE_HEAD_MEMORY_GI + (REPLICA_MEMORY_GI if spec.monitor is not None else 0)
    head = pod_template(
        "ray-head", config.stage_image, {"cpu": cpu_quantity(head_cpus), "memory": f"{head_memory}Gi"}, {},
        {**labels, LABEL_METRICS: METRICS_ROUTER},
        volumes=[], mounts=[], ports=[serve_port], env=env, env_from=secret_env(config.stage_env_secret),
    )
    pods = replica_pods(spec, 1 if base is not None else len(variants))
    worker = pod_template(
        "ray-worker", config.stage_image, pods.resources, {}, labels,
        volumes=[], mounts=[], ports=[serve_port], env=env, env_from=secret_env(config.stage_env_secret),
    )
    cluster: dict[str, Any] = {
        "rayVersion": RAY_VERSION,
        "headGroupSpec": {
            "rayStartParams": {"num-cpus": str(head_cpus), "dashboard-host": "0.0.0.0"},
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
    for reported in status.get("conditions") or []:
        if isinstance(reported, Mapping) and reported.get("type") == "Ready":
            ready = reported.get("status") == "True"
            why = reported.get("message") or reported.get("reason") or ""
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
    base_version: str | None = None,
    adapter_versions: Mapping[str, str] | None = None,
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
        spec_accepted(generation),
        condition("Ready", "True" if ready else "False", "RayServiceReady" if ready else "RayServiceNotReady",
                  f"RayService {name}: {why}", generation),
        condition("Progressing", "True" if progressing else "False",
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
        "baseVersion": base_version,
        "adapterVersions": None if adapter_versions is None else dict(adapter_versions),
        # What answers requests for the model: after a promotion the candidate takes them all (weight 100).
        "servedVersion": candidate_version if promoted else stable_version,
        "rayService": name,
        "rollout": None if record is None else record.to_dict(),
        "weight": 0 if record is None else record.weight,
        # KubeRay's Service for the serve port of whichever cluster is active.
        "url": f"http://{name}-serve-svc.{owner.namespace}.svc:{port}/v1",
        "conditions": keep_transition_times(conditions, previous, now),
    }
    if generation is not None:
        status["observedGeneration"] = generation
    return status


def unresolved_status(
    field: str, message: str, *, previous: Mapping[str, Any], now: datetime, generation: int | None
) -> dict[str, Any]:
    """The status while a model URI cannot be resolved (an alias not set yet, MLflow unreachable)."""
    conditions = [
        spec_accepted(generation),
        condition("Ready", "False", "ModelNotResolved", f"{field}: {message}", generation),
    ]
    return {"phase": previous.get("phase") or "Pending",
            "conditions": keep_transition_times(conditions, previous, now)}

"""The pods of the Ray clusters the operator creates, RayJob and RayService alike: one hardened template
(the pod security "restricted" profile, requests equal to limits, Ray's scratch and shared-memory
volumes), the scheduling of `spec.cluster`, and the pod that submits a RayJob's job.

Pure: `rayjob` and `rayservice` call these and put the result into their objects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kubeforge.spec.cluster import ClusterSpec, Toleration

LABEL_METRICS = "kubeforge.io/metrics"
"""On the pods Prometheus scrapes (the chart's PodMonitors select them by it), what they serve: a stage job's
driver (METRICS_STAGE, port `stage-metrics`) or a RayService's router (METRICS_ROUTER, `/metrics` on port
`serve`). One pod per Ray cluster: the router's metrics, reached through any pod's proxy, would count twice."""
METRICS_STAGE = "stage"
METRICS_ROUTER = "router"
RAY_VERSION = "2.60.0"  # pyproject pins ray==2.60.0; KubeRay must know which Ray the image runs
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


def pod_template(
    container: str,
    image: str,
    resources: Mapping[str, str],
    scheduling: Mapping[str, Any],
    labels: Mapping[str, str],
    volumes: list[dict[str, Any]],
    mounts: list[dict[str, Any]],
    ports: list[dict[str, Any]],
    env: Sequence[Mapping[str, Any]] = (),
    env_from: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """A Ray head or worker pod: one container `container` of `image`, with exactly `resources`."""
    main: dict[str, Any] = {
        "name": container,
        "image": image,
        # Ray, Python and the libraries write caches under HOME; the root filesystem is read-only.
        "env": [{"name": "HOME", "value": "/tmp"}, *(dict(e) for e in env)],
        **({"envFrom": [dict(e) for e in env_from]} if env_from else {}),
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


def submitter_template(image: str, cluster: ClusterSpec, labels: Mapping[str, str]) -> dict[str, Any]:
    """The pod running `ray job submit` (KubeRay fills in the command); hardened like the others."""
    return {
        "metadata": {"labels": dict(labels)},
        "spec": {
            **scheduling(cluster),
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


def secret_env(secret: str | None) -> list[dict[str, Any]]:
    """`envFrom` of a container that takes every key of Secret `secret` as a variable, when there is one.

    Optional: the operator's Secret serves the pipelines that read an object store, and a namespace
    without it still runs the others (a stage that needs the variables then says which are missing)."""
    return [{"secretRef": {"name": secret, "optional": True}}] if secret else []


def scheduling(cluster: ClusterSpec) -> dict[str, Any]:
    """The pod spec fields of `spec.cluster` that place a pod: node selector, tolerations, service account."""
    out: dict[str, Any] = {}
    if cluster.node_selector:
        out["nodeSelector"] = dict(cluster.node_selector)
    if cluster.tolerations:
        out["tolerations"] = [_toleration(t) for t in cluster.tolerations]
    if cluster.service_account:
        out["serviceAccountName"] = cluster.service_account
    return out


def _toleration(toleration: Toleration) -> dict[str, Any]:
    out: dict[str, Any] = {"operator": toleration.operator}
    for field, key in (("key", "key"), ("value", "value"), ("effect", "effect"),
                       ("toleration_seconds", "tolerationSeconds")):
        value = getattr(toleration, field)
        if value is not None:
            out[key] = value
    return out


def cpu_quantity(cpus: float) -> str:
    """A Kubernetes CPU quantity: whole CPUs as an integer, fractions in millicores."""
    return str(int(cpus)) if float(cpus).is_integer() else f"{round(cpus * 1000)}m"

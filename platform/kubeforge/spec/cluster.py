"""`spec.cluster`: how the KubeForge operator runs the stages on Kubernetes.

It describes Kubernetes objects, so only the operator applies it: `kubeforge run` validates it and runs
every stage on the local Ray runtime. The operator reads it to build one KubeRay `RayJob` per stage;
each stage's own `resources` section (workers, CPUs per worker, GPUs) sizes that RayJob's worker group.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, model_validator

from kubeforge.spec.base import StrictModel

# Kubernetes' own limits: a label-style key (optionally prefixed by a DNS subdomain) and value.
_LABEL_KEY = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
_LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# A memory quantity as Kubernetes writes it (512Mi, 8Gi, 1e9); the API server rejects anything else.
_MEMORY = r"^[0-9]+(\.[0-9]+)?(([KMGTPE]i)|[kMGTPE]|([eE][0-9]+))?$"

DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

WORKDIR_MOUNT = "/kubeforge/work"
"""Where every stage pod mounts the work volume; relative paths of a manifest resolve under it on a cluster."""
MANIFEST_MOUNT = "/etc/kubeforge"
"""Where every stage pod mounts the manifest's ConfigMap."""
# What the pods mount already (kubeforge_operator.pods): a volume of the spec may not take these names or paths.
RESERVED_VOLUMES = {"work": WORKDIR_MOUNT, "manifest": MANIFEST_MOUNT, "tmp": "/tmp", "shm": "/dev/shm"}

LabelKey = Annotated[str, Field(min_length=1, max_length=316, pattern=_LABEL_KEY)]
Memory = Annotated[str, Field(pattern=_MEMORY)]


class Toleration(StrictModel):
    """A Kubernetes toleration of the stage pods (head and workers), e.g. for tainted GPU nodes.

    Read by the operator only; `kubeforge run` schedules nothing."""

    key: LabelKey | None = None
    """Taint key; null with operator `Exists` tolerates every taint."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """`Equal`: the taint's value must equal `value`. `Exists`: any value."""
    value: Annotated[str, Field(max_length=63, pattern=_LABEL_VALUE)] | None = None
    """Taint value to match (operator `Equal` only)."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to match; null matches every effect."""
    toleration_seconds: Annotated[int, Field(ge=0)] | None = None
    """How long a pod stays bound after a NoExecute taint appears; null means forever (effect NoExecute only)."""

    @model_validator(mode="after")
    def _consistent(self) -> Toleration:
        if self.operator == "Exists" and self.value is not None:
            raise ValueError("value: operator 'Exists' matches any value; remove value or use operator 'Equal'")
        if self.operator == "Equal" and self.key is None:
            raise ValueError("key: operator 'Equal' needs a taint key (use operator 'Exists' to tolerate every taint)")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("toleration_seconds: only applies to effect 'NoExecute'")
        return self


class ClaimVolume(StrictModel):
    """A PersistentVolumeClaim (same namespace) mounted in every stage pod: a data set, a model cache."""

    name: Annotated[str, Field(max_length=63, pattern=DNS1123_LABEL)]
    claim: Annotated[str, Field(min_length=1, max_length=253, pattern=DNS1123_SUBDOMAIN)]
    mount_path: Annotated[str, Field(pattern=r"^/")]
    """Absolute path in the pods; a manifest's paths under it (data sources, base_model...) read the claim."""
    read_only: bool = True


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


class ClusterSpec(StrictModel):
    """How the KubeForge operator runs this pipeline on Kubernetes: one KubeRay RayJob per stage.

    The operator requires this section (a pipeline without it is reported Invalid) and reads nothing
    else about Kubernetes objects. `kubeforge run` validates it but has no pods to apply it to: it runs
    on the local Ray runtime, with `.kubeforge/` as its work directory. Worker count, CPUs and GPUs per
    worker come from each stage's `resources` section (tune: max_concurrent, cpus_per_trial, gpus_per_trial)."""

    workdir_claim: Annotated[str, Field(min_length=1, max_length=253, pattern=DNS1123_SUBDOMAIN)]
    """ReadWriteMany PersistentVolumeClaim (same namespace) mounted at /kubeforge/work in every stage's
    head and worker pods: the work directory the stages hand their outputs over in."""
    image: Annotated[str, Field(min_length=1)] | None = None
    """Image of every stage's pods; null means the operator's stage image (the quantize stage: its
    quantize image). It must hold KubeForge at the operator's version, and `jobs/` in its working directory."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Node labels the stage pods (head and workers) must run on, e.g. a GPU node pool."""
    tolerations: list[Toleration] = Field(default_factory=list)
    """Taints of the nodes the stage pods may run on."""
    service_account: Annotated[str, Field(max_length=253, pattern=DNS1123_SUBDOMAIN)] | None = None
    """ServiceAccount of the stage pods (e.g. for object-store credentials); null means the namespace's default."""
    active_deadline_s: Annotated[int, Field(gt=0)] | None = None
    """Each RayJob fails when it has run this long (KubeRay activeDeadlineSeconds); null means no limit."""
    retries: Annotated[int, Field(ge=0)] = 2
    """RayJobs created again for a stage after a failed one, before the pipeline fails."""
    retry_delay_s: Annotated[int, Field(ge=0)] = 30
    """Seconds between a stage's failed RayJob finishing and its next attempt starting."""
    ttl_s: Annotated[int, Field(ge=0)] = 0
    """Seconds KubeRay keeps a finished stage's Ray cluster (its pods, GPUs included, and their logs) before
    deleting it (KubeRay's ttlSecondsAfterFinished); 0 releases them as soon as the job ends. The RayJob and
    its status stay either way, and the stage's logs are in its folder of the work volume and in MLflow.
    Raise it to inspect a stage's pods after it ended."""
    head_cpus: Annotated[float, Field(gt=0)] = 1.0
    """CPUs of each RayJob's head pod (requests and limits). The head runs the stage's driver, not its workers."""
    head_memory: Memory = "4Gi"
    """Memory of each RayJob's head pod (requests and limits), e.g. 4Gi."""
    worker_memory: Memory = "8Gi"
    """Memory of each worker pod (requests and limits), e.g. 8Gi."""
    volumes: list[ClaimVolume] = Field(default_factory=list)
    """Further claims every stage pod mounts, e.g. a data set or a model cache; a manifest's absolute paths
    must lie on one of them or on the work volume."""
    env_secrets: list[Annotated[str, Field(max_length=253, pattern=DNS1123_SUBDOMAIN)]] = Field(default_factory=list)
    """Secrets (same namespace) whose keys become environment variables of every stage pod: credentials a
    manifest must not hold in plain text, such as tune.storage_env's URL or MLflow's MLFLOW_TRACKING_PASSWORD."""

    @model_validator(mode="after")
    def _volumes_fit(self) -> ClusterSpec:
        taken = dict(RESERVED_VOLUMES)
        for i, volume in enumerate(self.volumes):
            if volume.name in taken:
                raise ValueError(f"volumes[{i}].name: {volume.name!r} is taken (by {taken[volume.name]})")
            clash = next((path for path in taken.values()
                          if _within(volume.mount_path, path) or _within(path, volume.mount_path)), None)
            if clash is not None:
                raise ValueError(f"volumes[{i}].mount_path: {volume.mount_path} overlaps {clash}, which the pods "
                                 "mount already")
            taken[volume.name] = volume.mount_path
        return self

    def holds(self, path: str) -> bool:
        """Whether an absolute `path` lies on a volume the stage pods mount (the work volume or `volumes`)."""
        return any(_within(path, folder) for folder in (WORKDIR_MOUNT, *(v.mount_path for v in self.volumes)))

    # Checked here rather than with constrained key types: those become patternProperties, which a
    # structural CRD schema cannot hold.
    @model_validator(mode="after")
    def _node_labels_are_labels(self) -> ClusterSpec:
        for key, value in self.node_selector.items():
            if len(key) > 316 or not re.fullmatch(_LABEL_KEY, key):
                raise ValueError(f"node_selector: {key!r} is not a Kubernetes label key")
            if len(value) > 63 or not re.fullmatch(_LABEL_VALUE, value):
                raise ValueError(f"node_selector: the value of {key!r} is not a Kubernetes label value (got {value!r})")
        return self

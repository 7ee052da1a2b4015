"""The operator's configuration: KUBEFORGE_OPERATOR_* environment variables, read and checked once.

The Helm chart (charts/kubeforge/templates/operator-deployment.yaml) sets every one of them.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import kopf

from kubeforge.errors import KubeForgeError
from kubeforge.secrets import has_password, redact_url
from kubeforge_operator.errors import FieldError

PREFIX = "KUBEFORGE_OPERATOR_"
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


class ConfigError(KubeForgeError):
    """An environment variable is missing or malformed; the message starts with its name."""


@dataclass(frozen=True)
class OperatorConfig:
    stage_image: str
    """Image of the RayJobs of every stage but quantize (KUBEFORGE_OPERATOR_STAGE_IMAGE, required)."""
    quantize_image: str
    """Image of the quantize stage's RayJob: it carries the llm-compressor environment (_QUANTIZE_IMAGE, required)."""
    namespaces: tuple[str, ...] = ()
    """Namespaces to watch (_NAMESPACES, comma-separated); empty means every namespace."""
    peering: str | None = None
    """kopf peering object the replicas share (_PEERING); none means standalone: one replica only."""
    mlflow_tracking_uri: str | None = None
    """MLflow tracking URI handed to every stage (_MLFLOW_TRACKING_URI); none: SQLite in the work volume."""
    metrics_port: int = 9090
    """Port of the Prometheus /metrics endpoint (_METRICS_PORT)."""
    health_port: int = 8080
    """Port of kopf's liveness endpoint /healthz (_HEALTH_PORT)."""
    log_format: Literal["plain", "json"] = "plain"
    """kopf's log format (_LOG_FORMAT)."""
    prometheus_url: str | None = None
    """The Prometheus that scrapes the deployments, for rollouts whose manifest names none (_PROMETHEUS_URL)."""
    stage_env_secret: str | None = None
    """Secret, in each pipeline's namespace, whose keys become environment variables of every stage pod
    (_STAGE_ENV_SECRET): object-store credentials and endpoint such as AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL. Optional in the pods: a namespace without it runs its stages
    without them."""

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces

    def serving_tracking_uri(self) -> str:
        """The MLflow tracking URI, which serving a ModelDeployment cannot do without; `FieldError` naming the
        variable when it is unset. Checked when a deployment needs it, not at startup: pipelines run without
        one (their stages log to SQLite in the work volume)."""
        if not self.mlflow_tracking_uri:
            raise FieldError(f"{PREFIX}MLFLOW_TRACKING_URI",
                             "required to serve ModelDeployments (versions are resolved in, and replicas download them "
                             "from, that MLflow)")
        return self.mlflow_tracking_uri

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        """Raises `ConfigError` naming the first bad variable."""
        env = os.environ if env is None else env

        def get(name: str) -> str:
            return env.get(PREFIX + name, "").strip()

        def required(name: str) -> str:
            value = get(name)
            if not value:
                raise ConfigError(f"{PREFIX}{name}: required (an image reference such as ghcr.io/org/image:tag)")
            return value

        def port(name: str, default: int) -> int:
            raw = get(name)
            if not raw:
                return default
            if not raw.isdigit() or not 1 <= int(raw) <= 65535:
                raise ConfigError(f"{PREFIX}{name}: must be a port number 1-65535 (got {raw!r})")
            return int(raw)

        namespaces = tuple(n.strip() for n in get("NAMESPACES").split(",") if n.strip())
        for namespace in namespaces:
            if len(namespace) > 63 or not _DNS1123_LABEL.fullmatch(namespace):
                raise ConfigError(f"{PREFIX}NAMESPACES: {namespace!r} is not a namespace name (DNS-1123 label)")
        peering = get("PEERING") or None
        if peering is not None and (len(peering) > 253 or not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", peering)):
            raise ConfigError(f"{PREFIX}PEERING: {peering!r} is not a Kubernetes object name")
        log_format = get("LOG_FORMAT") or "plain"
        if log_format not in ("plain", "json"):
            raise ConfigError(f"{PREFIX}LOG_FORMAT: must be plain or json (got {log_format!r})")
        stage_env_secret = get("STAGE_ENV_SECRET") or None
        if stage_env_secret is not None and (
            len(stage_env_secret) > 253 or not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", stage_env_secret)
        ):
            raise ConfigError(f"{PREFIX}STAGE_ENV_SECRET: {stage_env_secret!r} is not a Secret name")
        if has_password(get("MLFLOW_TRACKING_URI")):
            # The tracking URI is written into every stage and serving pod's spec: no credentials in it.
            raise ConfigError(f"{PREFIX}MLFLOW_TRACKING_URI: {redact_url(get('MLFLOW_TRACKING_URI'))} holds a "
                              "password; give MLflow's MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD from a "
                              "Secret instead (operator.extraEnv for the operator, the stage Secret for the pods)")
        prometheus_url = get("PROMETHEUS_URL") or None
        if prometheus_url is not None and not re.fullmatch(r"https?://\S+", prometheus_url):
            raise ConfigError(f"{PREFIX}PROMETHEUS_URL: must be an http(s) URL (got {prometheus_url!r})")
        metrics_port, health_port = port("METRICS_PORT", 9090), port("HEALTH_PORT", 8080)
        if metrics_port == health_port:
            raise ConfigError(f"{PREFIX}HEALTH_PORT: must differ from {PREFIX}METRICS_PORT ({metrics_port})")
        return cls(
            stage_image=required("STAGE_IMAGE"),
            quantize_image=required("QUANTIZE_IMAGE"),
            namespaces=namespaces,
            peering=peering,
            mlflow_tracking_uri=get("MLFLOW_TRACKING_URI") or None,
            metrics_port=metrics_port,
            health_port=health_port,
            log_format="json" if log_format == "json" else "plain",
            stage_env_secret=stage_env_secret,
            prometheus_url=prometheus_url,
        )


KOPF_PREFIX = "kopf.kubeforge.io"
FINALIZER = "kubeforge.io/finalizer"


def configure_kopf(settings: kopf.OperatorSettings) -> kopf.OperatorSettings:
    """kopf's bookkeeping in annotations under our own prefix, nothing in `status`.

    kopf's default also writes `status.kopf`, which the ModelPipeline CRD's structural status schema
    would prune (and which `kubectl get -o yaml` readers would mistake for pipeline state)."""
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=KOPF_PREFIX, key="last-handled-configuration"
    )
    # Handler outcomes go to the log; Kubernetes events only for warnings and errors, so a pipeline's
    # `kubectl describe` is not flooded by one event per reconciliation.
    settings.posting.level = logging.WARNING
    # kopf peering freezes every operator when two share the highest priority, so replicas of one
    # Deployment (same settings) must differ: a random priority makes exactly one of them active, and
    # the next-highest takes over when it goes away.
    settings.peering.priority = secrets.randbelow(1_000_000) + 1
    return settings
